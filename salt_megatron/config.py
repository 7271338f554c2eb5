"""Typed configuration, built once from the validated flags: what the SALT method and the batch layout are.

The train step reads these, never the argparse namespace.  Room for more: an adaptive switch, per-token weights or
a teacher cache add fields here, not flags read deep inside the step.
"""

from __future__ import annotations

import dataclasses

from salt_megatron.schedule import SaltSchedule


@dataclasses.dataclass(frozen=True)
class KDDataSelection:
    """SALT_DS: the KD phase draws its samples from the windows the teacher scored highest."""

    mode: str  # "top" | "band" (salt_megatron.data.selection.MODES)
    fraction: float  # share of the scored windows kept
    skip_fraction: float  # band: share of the very top skipped first
    select_by: str  # the score column ranked by (salt_megatron.data.scores.SCORE_NAMES)
    scored_data_path: tuple | None  # the scored dataset or blend, as --data-path words; None: the training data


@dataclasses.dataclass(frozen=True)
class SaltConfig:
    """The SALT method as configured: with ``schedule`` None the run is a baseline (no teacher)."""

    schedule: SaltSchedule | None = None
    teacher_load: str | None = None
    teacher_cache: str | None = None  # the KD phase reads the teacher's top-K from this cache instead
    temperature: float = 1.0
    scale_kd_by_temperature_squared: bool = True
    kernel_impl: str = "auto"  # salt_megatron.kd.IMPLS
    fuse_ce_with_kd: bool = True  # CE from the KD pass where it can be (salt_loss)
    fused_linear: bool = False  # the KD-phase loss from the output layers' inputs (kd.fused_linear)
    data_selection: KDDataSelection | None = None
    token_weighting: str = "none"  # salt_megatron.kd.token_weights.TOKEN_WEIGHTINGS: ω per token
    token_topk: int = 10  # k of teacher_topk

    @property
    def uses_teacher(self) -> bool:
        return self.schedule is not None

    @property
    def auto_switch(self) -> bool:
        """KD ends when the student catches up with the teacher (``--kd-transition auto``)."""
        return self.schedule is not None and self.schedule.transition == "auto"

    def kd_weight(self, step: int, ended_at: int | None = None) -> float:
        """ω at ``step`` (``ended_at``: where the auto switch ended KD); 0 for a baseline."""
        return self.schedule.weight(step, ended_at) if self.schedule is not None else 0.0

    def teacher_needed(self, step: int, ended_at: int | None = None) -> bool:
        return self.schedule is not None and self.schedule.teacher_needed(step, ended_at)

    @classmethod
    def from_args(cls, args) -> "SaltConfig":
        """From validated ``pretrain`` flags (``salt_megatron.training.arguments``)."""
        schedule = None
        if args.teacher_load or args.teacher_cache:
            schedule = SaltSchedule(kd_weight=args.kd_weight, kd_steps=args.kd_steps, transition=args.kd_transition,
                                    decay_steps=args.kd_decay_steps, auto_window=args.kd_auto_window,
                                    auto_margin=args.kd_auto_margin)
        selection = None
        if args.kd_data_selection != "none":
            selection = KDDataSelection(mode=args.kd_data_selection, fraction=args.kd_select_fraction,
                                        skip_fraction=args.kd_select_skip_fraction, select_by=args.kd_select_by,
                                        scored_data_path=args.kd_scored_data_path and tuple(args.kd_scored_data_path))
        return cls(schedule=schedule, teacher_load=args.teacher_load, teacher_cache=args.teacher_cache,
                   temperature=args.kd_temperature,
                   scale_kd_by_temperature_squared=not args.kd_no_temperature_squared, kernel_impl=args.kd_impl,
                   fused_linear=args.kd_fused_linear, data_selection=selection,
                   token_weighting=args.kd_token_weighting, token_topk=args.kd_token_topk)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How a global batch is cut: Megatron's micro-batch x data-parallel x accumulation layout."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    seq_length: int

    def __post_init__(self):
        step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % step:
            raise ValueError(f"global batch size {self.global_batch_size} is not a multiple of micro batch size "
                             f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size}")

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each data-parallel rank runs per step (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @classmethod
    def from_args(cls, args) -> "BatchConfig":
        return cls(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                   data_parallel_size=args.data_parallel_size, seq_length=args.seq_length)
