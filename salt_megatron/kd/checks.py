"""The rules for the KD op's arguments, defined once: the op, the ω schedule and the CLI flags all call these."""

from __future__ import annotations

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_kd_weight(kd_weight: float, name: str = "kd_weight") -> None:
    """ω, the weight of the KD term: in [0, 1]."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {kd_weight}")


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """τ, the softmax temperature of the soft labels: > 0."""
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary shard)")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) keep fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
