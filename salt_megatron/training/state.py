"""What a training run holds once it is set up (``salt_megatron.training.setup``), and the state that a checkpoint
carries from step to step."""

from __future__ import annotations

import dataclasses

from salt_megatron.config import BatchConfig, SaltConfig
from salt_megatron.model import GPTArchitecture


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    consumed_samples: int = 0
    # --kd-transition auto: student CE - teacher CE of each KD step so far (the last window's), and the step from
    # which the switch turned KD off (None: not yet)
    kd_gaps: list = dataclasses.field(default_factory=list)
    kd_ended_at: int | None = None


@dataclasses.dataclass
class Data:
    train: object  # GPTDataset
    valid: object | None  # GPTDataset, or None (no validation split)
    kd: object | None  # SALT_DS: the selected windows the KD phase draws from (None: the ordinary data)
    extra_valid: dict = dataclasses.field(default_factory=dict)  # --extra-valid-data-path: {name: GPTDataset}
    # which windows each evaluation reads: {"val_windows" / "val_windows_NAME": hash of their tokens}
    eval_windows: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """Everything the loop and the step need, built once."""

    args: object  # the validated flags: the loop's cadence (iterations, intervals, --save) and the checkpoint record
    salt: SaltConfig
    batch: BatchConfig
    arch: GPTArchitecture
    backend: object  # salt_megatron.training.backends.MegatronBackend | DeepSpeedBackend
    scheduler: object  # megatron-core OptimizerParamScheduler
    teacher: object | None  # salt_megatron.teacher.Teacher while it is needed on this rank
    data: Data
    tokenizer: object
    writer: object  # salt_megatron.training.metrics.MetricsWriter
    state: TrainState = dataclasses.field(default_factory=TrainState)
    init_fingerprint: list | None = None  # the logits fingerprint of the random init (refuses untrained teachers)
    record: dict = dataclasses.field(default_factory=dict)  # what the run is, checked by a resume (consistency)
    overrides: list = dataclasses.field(default_factory=list)  # settings changed on resume, by override flags
    resume_path: str | None = None  # the checkpoint the run resumed from (the latest good one until it saves)
