"""The float64 reference of the KD op on the gathered vocabulary: what every KD test and benchmark compares with.

Plain PyTorch in float64, no chunking, no tensor parallelism, no kernels: the definition, not an implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                 vocab_size: int | None = None) -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per row, float64, over the first ``vocab_size`` columns (the rest is padding).

    A teacher probability of 0 contributes 0 (its log-ratio is not evaluated).
    """
    s = student.double()[..., :vocab_size] / temperature
    t = teacher.double()[..., :vocab_size] / temperature
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def reference_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                   vocab_size: int | None = None, grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """d KL / d student, float64, full width with zeros on padding: (softmax(s/τ) - softmax(t/τ))/τ · grad_out."""
    s = student.double()[..., :vocab_size] / temperature
    t = teacher.double()[..., :vocab_size] / temperature
    g = (F.softmax(s, -1) - F.softmax(t, -1)) / temperature
    if grad_out is not None:
        g = g * grad_out.double().to(g.device)[..., None]
    full = torch.zeros(student.shape, dtype=torch.float64, device=student.device)
    full[..., : g.shape[-1]] = g
    return full
