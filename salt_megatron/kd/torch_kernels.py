"""The KD kernels in plain PyTorch: the reference implementation of the kernel protocol (any device, any dtype).

Rows are processed in chunks of at most ``_CHUNK_ELEMENTS`` fp32 elements per temporary (16 MiB on CPU), so the
working set stays small next to the logits whatever N and V are.  On a GPU each chunk costs ~10 kernel launches,
so its chunks are larger (128 MiB temporaries); the fused CUDA kernel needs none of this.
"""

from __future__ import annotations

import dataclasses

import torch

from salt_megatron.kd.checks import compute_dtype

_CHUNK_ELEMENTS = 1 << 22
_CHUNK_ELEMENTS_CUDA = 1 << 25


def _row_chunks(num_rows: int, width: int, device: torch.device):
    budget = _CHUNK_ELEMENTS_CUDA if device.type == "cuda" else _CHUNK_ELEMENTS
    step = max(1, budget // max(width, 1))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


def local_row_stats(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                    with_ce_sum: bool = False) -> torch.Tensor:
    """Per-row statistics of one vocabulary shard, fp32 ``[N, 5]``, or ``[N, 6]`` with ``with_ce_sum`` (the
    student's Σ exp(s - max_s) at τ = 1 as a sixth column; see ``salt_megatron.kd.protocol``).

    Everything is relative to the row maxima of the raw logits: ``x - max_x`` is exact near the maximum, and the
    partial KL never subtracts two large numbers, which keeps ±1e4 logits accurate in fp32.  The maxima of a shard
    are combined across TP ranks afterwards.  ``student``/``teacher``: ``[N, W]``, the valid columns only.
    """
    n, w = student.shape
    compute = compute_dtype(student)
    stats = torch.empty(n, 6 if with_ce_sum else 5, dtype=compute, device=student.device)
    if w == 0:  # this rank holds only padding: it contributes nothing
        stats.zero_()
        stats[:, 0:3:2] = float("-inf")  # the maxima (basic slicing: a tuple index would synchronise a GPU)
        return stats
    inv_t = 1.0 / temperature
    for lo, hi in _row_chunks(n, w, student.device):
        s = student[lo:hi].to(compute)
        t = teacher[lo:hi].to(compute)
        m_s = s.amax(dim=-1, keepdim=True)
        m_t = t.amax(dim=-1, keepdim=True)
        stats[lo:hi, 0] = m_s.squeeze(-1)
        stats[lo:hi, 2] = m_t.squeeze(-1)
        # a shard row that is all -inf has max -inf: shift it by 0 instead (-inf - -inf is NaN); its sums are 0
        m_s = torch.where(torch.isfinite(m_s), m_s, torch.zeros_like(m_s))
        m_t = torch.where(torch.isfinite(m_t), m_t, torch.zeros_like(m_t))
        a_s = s - m_s
        if with_ce_sum:  # CE's sum at τ = 1, before the shift is scaled by 1/τ
            stats[lo:hi, 5] = a_s.exp().sum(dim=-1)
        a_s.mul_(inv_t)  # log of the unnormalised student probabilities, <= 0
        a_t = (t - m_t).mul_(inv_t)
        p_t = a_t.exp()
        stats[lo:hi, 1] = a_s.exp().sum(dim=-1)
        stats[lo:hi, 3] = p_t.sum(dim=-1)
        # 0·(±inf) (teacher -inf where the student is finite, or both -inf) is a zero contribution: nansum.
        stats[lo:hi, 4] = torch.nansum(p_t.mul_(a_t.sub_(a_s)), dim=-1)
    return stats


def local_student_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    max_s: torch.Tensor,
    log_sum_s: torch.Tensor,
    max_t: torch.Tensor,
    log_sum_t: torch.Tensor,
    grad_rows: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
    teacher_grad_rows: torch.Tensor | None = None,
    ce_log_sum_s: torch.Tensor | None = None,
    ce_grad_rows: torch.Tensor | None = None,
) -> None:
    """Write ``(q·g - p·g_t)/τ [+ q1·g_ce]`` into ``out`` (student dtype), chunk by chunk; ``g_t`` defaults to ``g``.

    ``q = exp((s - max_s)/τ - log_sum_s)`` = softmax(s/τ) with the global row max and log-sum-exp, same for p;
    ``g`` = ``grad_rows``, ``g_t`` = ``teacher_grad_rows`` (weighting the terms apart folds a CE gradient in at
    τ = 1); ``q1 = exp(s - max_s - ce_log_sum_s)`` = softmax(s) at τ = 1, weighted by ``ce_grad_rows`` (the CE
    gradient at τ ≠ 1, less the one-hot the caller subtracts).
    """
    if (ce_log_sum_s is None) != (ce_grad_rows is None):
        raise ValueError("ce_log_sum_s and ce_grad_rows go together")
    n, w = student.shape
    inv_t = 1.0 / temperature
    compute = compute_dtype(student)
    for lo, hi in _row_chunks(n, w, student.device):
        q = torch.sub(student[lo:hi].to(compute), max_s[lo:hi, None]).mul_(inv_t).sub_(log_sum_s[lo:hi, None]).exp_()
        p = torch.sub(teacher[lo:hi].to(compute), max_t[lo:hi, None]).mul_(inv_t).sub_(log_sum_t[lo:hi, None]).exp_()
        if teacher_grad_rows is None:
            q.sub_(p).mul_((grad_rows[lo:hi] * inv_t)[:, None])
        else:
            q.mul_((grad_rows[lo:hi] * inv_t)[:, None]).sub_(p.mul_((teacher_grad_rows[lo:hi] * inv_t)[:, None]))
        if ce_grad_rows is not None:
            shift = (max_s[lo:hi] + ce_log_sum_s[lo:hi])[:, None]
            q.add_(torch.sub(student[lo:hi].to(compute), shift).exp_().mul_(ce_grad_rows[lo:hi, None].to(compute)))
        out[lo:hi].copy_(q)


@dataclasses.dataclass(frozen=True)
class TorchKernels:
    """The PyTorch kernel set: no row index (callers pass the kept rows), split gradient weights."""

    name: str = "torch"
    supports_row_index: bool = False
    supports_split_grad: bool = True

    @staticmethod
    def row_stats(student, teacher, temperature, with_ce_sum=False):
        return local_row_stats(student, teacher, temperature, with_ce_sum)

    @staticmethod
    def student_grad(student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out,
                     teacher_grad_rows=None, ce_log_sum_s=None, ce_grad_rows=None):
        local_student_grad(student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out,
                           teacher_grad_rows=teacher_grad_rows, ce_log_sum_s=ce_log_sum_s, ce_grad_rows=ce_grad_rows)


TORCH_KERNELS = TorchKernels()
