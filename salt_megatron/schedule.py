"""The SALT schedule: the KD weight ω as a function of the training step.

Phase 1 (steps ``[0, kd_steps)``): the loss is ``(1-ω)·CE + ω·KD`` with ω = ``kd_weight`` (ω0).
Transition:
  * ``step``   – ω0 until ``kd_steps``, then 0 (the paper's SALT; n_KD ≈ 17% of training).
  * ``linear`` – ω0 until ``kd_steps - decay_steps``, then linearly down to 0 at ``kd_steps``.
  * ``cosine`` – as linear, with a half-cosine ramp.
  * ``auto``   – ω0 from step 0 until the student has caught up with the teacher on the KD batches: the student's
                 CE minus the teacher's CE on the same batch (teacher logits the step computes anyway), averaged over
                 the last ``auto_window`` KD steps, is at most ``auto_margin`` nats.  From the next step on ω is 0 for
                 good (``ended_at``, kept in the run's state and checkpoints); ``kd_steps`` is the latest it ends.
From ``kd_steps`` on ω is exactly 0 and the teacher is not run (``teacher_needed`` is False).
``kd_steps == train_iters`` is the RKD baseline (KD for the whole run).
"""

from __future__ import annotations

import dataclasses
import math

from salt_megatron.kd.checks import check_kd_weight

TRANSITIONS = ("step", "linear", "cosine", "auto")


@dataclasses.dataclass(frozen=True)
class SaltSchedule:
    kd_weight: float  # ω0
    kd_steps: int  # n_KD: ω is 0 from this step on
    transition: str = "step"
    decay_steps: int | None = None  # length of the linear/cosine ramp; default: the whole KD phase
    auto_window: int = 20  # auto: KD steps averaged
    auto_margin: float = 0.0  # auto: switch once student CE - teacher CE (nats) is at most this

    def __post_init__(self):
        check_kd_weight(self.kd_weight)
        if self.kd_steps < 0:
            raise ValueError(f"kd_steps must be >= 0, got {self.kd_steps}")
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, got {self.transition!r}")
        if self.decay_steps is not None and not 0 < self.decay_steps <= max(self.kd_steps, 1):
            raise ValueError(f"decay_steps must be in [1, kd_steps={self.kd_steps}], got {self.decay_steps}")
        if self.auto_window < 1 or not math.isfinite(self.auto_margin):
            raise ValueError(f"auto_window must be >= 1 and auto_margin finite, got {self.auto_window}, "
                             f"{self.auto_margin}")

    @property
    def ramp_steps(self) -> int:
        return self.kd_steps if self.decay_steps is None else self.decay_steps

    def weight(self, step: int, ended_at: int | None = None) -> float:
        """ω at ``step`` (0-based: the step about to be taken); ``ended_at``: the step the auto switch ended KD."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kd_weight == 0.0 or step >= self.kd_steps or (ended_at is not None and step >= ended_at):
            return 0.0
        if self.transition in ("step", "auto"):
            return self.kd_weight
        ramp_start = self.kd_steps - self.ramp_steps
        if step < ramp_start:
            return self.kd_weight
        # progress in (0, 1]: the last KD step has progress (ramp-1)/ramp ... never exactly 1 inside the phase
        progress = (step - ramp_start) / self.ramp_steps
        if self.transition == "linear":
            return self.kd_weight * (1.0 - progress)
        return self.kd_weight * 0.5 * (1.0 + math.cos(math.pi * progress))

    def teacher_needed(self, step: int, ended_at: int | None = None) -> bool:
        """Whether the teacher must run at ``step`` (exactly when ω > 0)."""
        return self.weight(step, ended_at) > 0.0

    def auto_switch_due(self, gaps: list[float]) -> bool:
        """auto: whether the last ``auto_window`` gaps (student CE - teacher CE, one per KD step) average at most
        ``auto_margin``."""
        if self.transition != "auto" or len(gaps) < self.auto_window:
            return False
        recent = gaps[-self.auto_window:]
        return sum(recent) / len(recent) <= self.auto_margin

    def last_teacher_step(self) -> int | None:
        """The last step at which ω > 0, or None if the teacher is never used."""
        if self.kd_weight == 0.0 or self.kd_steps == 0:
            return None
        return self.kd_steps - 1

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "SaltSchedule":
        return cls(**state)
