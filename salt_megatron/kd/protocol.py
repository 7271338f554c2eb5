"""The kernel protocol: what a set of KD kernels must provide, and the capabilities it declares.

The vocab-parallel KL (``salt_megatron.kd.vocab_parallel``) and the SALT loss (``salt_megatron.kd.loss``) do
everything that is not per-row arithmetic over one vocabulary shard themselves: the loss mask, the padding columns,
the two collectives across tensor-parallel ranks, autograd.  A kernel set does the per-row arithmetic, in two
calls.  Two sets implement it: the PyTorch kernels (``salt_megatron.kd.torch_kernels``, the reference, any device
and dtype) and the fused C++/CUDA kernels of ``csrc/`` (``salt_megatron.kd.fused_kernels``).

``row_stats(student, teacher, temperature, with_ce_sum=False, **row_args) -> fp32 [M, 5]`` (``[M, 6]``)
    ``student``/``teacher``: ``[N, W]``, the shard's valid (non-padding) columns, last dimension contiguous.  For
    each processed row, relative to the row maxima of the raw logits:
    ``max_s, Σ exp((s - max_s)/τ), max_t, Σ exp((t - max_t)/τ), Σ exp((t - max_t)/τ)·((t - max_t) - (s - max_s))/τ``
    (a 0·inf term counts as 0); W = 0 gives ``-inf, 0, -inf, 0, 0``.  fp64 inputs give fp64 statistics.
    ``with_ce_sum``: a sixth column ``Σ exp(s - max_s)`` (0 for W = 0), the student's sum at τ = 1 from the same
    read, so a next-token CE at τ ≠ 1 needs no pass of its own.

``student_grad(student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out,
teacher_grad_rows=None, ce_log_sum_s=None, ce_grad_rows=None, **row_args) -> None``
    Writes ``(q·g - p·g_t)/τ [+ q1·g_ce]`` into ``out`` (the student's dtype), ``q = exp((s - max_s)/τ -
    log_sum_s)`` and ``p`` alike from the *global* (all-shard) row maxima and log-sums; ``g = grad_rows``, ``g_t =
    teacher_grad_rows`` (``None``: ``g_t = g``, the KL gradient); ``q1 = exp(s - max_s - ce_log_sum_s)`` weighted
    by ``g_ce = ce_grad_rows`` (both or neither).  Weighting the terms apart folds a next-token CE gradient into the
    same pass: through ``teacher_grad_rows`` at τ = 1 (q1 = q), through the q1 term at τ ≠ 1.

Capabilities (attributes):

``name``                 how logs and errors name the set.
``supports_row_index``   both calls also take ``row_index`` (int64 ``[M]``) and ``trusted_rows``: only those rows
                         are read (statistics row i belongs to logits row ``row_index[i]``; the row vectors have M
                         entries) and only those rows of ``out`` are written.  Without it, callers pass copies of the
                         kept rows.  ``trusted_rows=True`` skips the range check (it would synchronise a GPU).
``supports_split_grad``  ``row_stats`` takes ``with_ce_sum`` and ``student_grad`` ``teacher_grad_rows``,
                         ``ce_log_sum_s`` and ``ce_grad_rows`` (needed for the one-pass CE + KD).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KernelSet(Protocol):
    name: str
    supports_row_index: bool
    supports_split_grad: bool

    def row_stats(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float, with_ce_sum: bool = False,
                  **row_args) -> torch.Tensor:
        ...

    def student_grad(self, student: torch.Tensor, teacher: torch.Tensor, max_s: torch.Tensor, log_sum_s: torch.Tensor,
                     max_t: torch.Tensor, log_sum_t: torch.Tensor, grad_rows: torch.Tensor, temperature: float,
                     out: torch.Tensor, teacher_grad_rows: torch.Tensor | None = None,
                     ce_log_sum_s: torch.Tensor | None = None, ce_grad_rows: torch.Tensor | None = None,
                     **row_args) -> None:
        ...
