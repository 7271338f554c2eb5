"""Knowledge-distillation loss on vocab-parallel logits: KL(teacher ‖ student) without gathering the vocabulary.

Megatron shards the output layer's columns over tensor-parallel (TP) ranks: rank r holds vocabulary columns
``[r*W, (r+1)*W)`` of the logits, W = padded_vocab / TP.  The KL divergence between the teacher's and the student's
softmax at temperature τ needs, per token (row), only a few numbers from each shard::

    KL = Σ_v p_v ((t_v - m_t) - (s_v - m_s))/τ  -  log S_t  +  log S_s
    with p = softmax(t/τ), m_x = max_v x_v, S_x = Σ_v exp((x_v - m_x)/τ)

So every rank makes one pass over its shard and produces, per row, its local maxima and sums and the partial KL
``A = Σ exp((t - m_t)/τ)·((t - m_t) - (s - m_s))/τ`` relative to its local maxima.  Two collectives on those row statistics (a MAX of the maxima, then
a SUM of the rescaled sums) give every rank the exact global KL.  The gradient with respect to the student's shard
is local: ``(softmax(s/τ) - softmax(t/τ)) / τ`` on the rank's own columns, so backward needs no communication and
TP gradients are right on every shard.  Nothing here knows about training.

Memory: the forward keeps no fp32 copy of the logits (it works in row chunks); backward writes the gradient once,
in the student's dtype.  Saved for backward: the inputs and four floats per row (global maxima and log-sums).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F

# Rows are processed in chunks of at most this many fp32 elements per temporary (16 MiB on CPU), so the working
# set stays small next to the logits whatever N and V are.  On a GPU each chunk costs ~10 kernel launches, so its
# chunks are larger (128 MiB temporaries); the fused CUDA kernel needs none of this.
_CHUNK_ELEMENTS = 1 << 22
_CHUNK_ELEMENTS_CUDA = 1 << 25

# salt_loss computes CE and KD in one pass where it can (τ = 1, one unpadded vocabulary shard); tests turn it off
# to compare with the separate computation.
_FUSE_CE_WITH_KD = True

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) keep fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Validation shared by every entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the vocabulary shard)")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def _check_kd_weight(kd_weight: float) -> None:
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")


def _tp_rank_and_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return torch.distributed.get_rank(group=tp_group), torch.distributed.get_world_size(group=tp_group)


def _valid_columns(shard_width: int, vocab_size: int | None, tp_rank: int, tp_size: int) -> int:
    """How many of this rank's columns are real vocabulary (the rest is Megatron's vocab padding)."""
    if vocab_size is None:
        return shard_width
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size > shard_width * tp_size:
        raise ValueError(
            f"vocab_size ({vocab_size}) is larger than the total shard width ({shard_width} x {tp_size} ranks)"
        )
    return max(0, min(shard_width, vocab_size - tp_rank * shard_width))


# ----------------------------------------------------------------------------------------------------------------
# The two local kernels (PyTorch path).  The fused C++/CUDA kernels in csrc/ implement the same contract.
# ----------------------------------------------------------------------------------------------------------------


def _row_chunks(num_rows: int, width: int, device: torch.device):
    budget = _CHUNK_ELEMENTS_CUDA if device.type == "cuda" else _CHUNK_ELEMENTS
    step = max(1, budget // max(width, 1))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


def local_row_stats(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row statistics of one vocabulary shard, fp32 ``[N, 5]``.

    Columns: max_s = max of s, Σ exp((s - max_s)/τ), max_t = max of t, Σ exp((t - max_t)/τ),
    Σ exp((t - max_t)/τ)·((t - max_t) - (s - max_s))/τ.  Everything is relative to the row maxima of the raw
    logits: ``x - max_x`` is exact near the maximum, and the partial KL never subtracts two large numbers, which
    keeps ±1e4 logits accurate in fp32.  The maxima of a shard are combined across TP ranks afterwards.
    ``student``/``teacher``: ``[N, W]`` already cut to the valid (non-padding) columns.
    """
    n, w = student.shape
    compute = _compute_dtype(student)
    stats = torch.empty(n, 5, dtype=compute, device=student.device)
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
        a_s = (s - m_s).mul_(inv_t)  # log of the unnormalised student probabilities, <= 0
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
) -> None:
    """Write ``(q·g - p·g_t)/τ`` into ``out`` (student dtype), chunk by chunk; ``g_t`` defaults to ``g``.

    ``q = exp((s - max_s)/τ - log_sum_s)`` = softmax(s/τ) with the global row max and log-sum-exp, same for p;
    ``g`` = ``grad_rows``, ``g_t`` = ``teacher_grad_rows`` (weighting the terms apart folds a CE gradient in).
    """
    n, w = student.shape
    inv_t = 1.0 / temperature
    compute = _compute_dtype(student)
    for lo, hi in _row_chunks(n, w, student.device):
        q = torch.sub(student[lo:hi].to(compute), max_s[lo:hi, None]).mul_(inv_t).sub_(log_sum_s[lo:hi, None]).exp_()
        p = torch.sub(teacher[lo:hi].to(compute), max_t[lo:hi, None]).mul_(inv_t).sub_(log_sum_t[lo:hi, None]).exp_()
        if teacher_grad_rows is None:
            q.sub_(p).mul_((grad_rows[lo:hi] * inv_t)[:, None])
        else:
            q.mul_((grad_rows[lo:hi] * inv_t)[:, None]).sub_(p.mul_((teacher_grad_rows[lo:hi] * inv_t)[:, None]))
        out[lo:hi].copy_(q)


# ----------------------------------------------------------------------------------------------------------------
# Autograd function: one pass, two collectives, local backward
# ----------------------------------------------------------------------------------------------------------------


def _combine_across_shards(stats: torch.Tensor, temperature: float, tp_group):
    """Exactly two collectives (MAX of maxima, SUM of rescaled sums).

    Returns ``kl`` and the global row statistics backward needs: ``(max_s, log_sum_s, max_t, log_sum_t)``.
    Only basic slicing here: indexing with a Python tuple copies the index to the GPU from pageable memory, which
    synchronises the stream and left the GPU idle while the few small ops below were launched (seen on an H100).
    """
    if tp_group is None:  # one shard: the local maxima are global, nothing to rescale (the same numbers, 5 ops)
        max_s, sum_s, max_t, sum_t, partial = stats.unbind(1)
        log_sum_s, log_sum_t = torch.log(sum_s), torch.log(sum_t)
        return partial / sum_t - log_sum_t + log_sum_s, (max_s, log_sum_s, max_t, log_sum_t)
    local_max = stats[:, 0:3:2].contiguous()
    global_max = local_max.clone()
    torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    # shift = (local max - global max)/τ <= 0.  exp(shift) rescales this shard's sums; a shard of padding only
    # (max -inf) contributes nothing.
    present = torch.isfinite(local_max)
    shift = torch.where(present, (local_max - global_max) / temperature, torch.zeros_like(local_max))
    scale = torch.where(present, shift.exp(), torch.zeros_like(local_max))
    # the partial KL was taken relative to the local maxima; moving it to the global ones adds S_t·(Δt - Δs)
    partial = stats[:, 4] + stats[:, 3] * (shift[:, 1] - shift[:, 0])
    sums = torch.stack((stats[:, 1] * scale[:, 0], stats[:, 3] * scale[:, 1], partial * scale[:, 1]), dim=1)
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=tp_group)
    max_s, max_t = global_max[:, 0], global_max[:, 1]
    log_sum_s, log_sum_t = torch.log(sums[:, 0]), torch.log(sums[:, 1])
    # KL = Σ p·((t - max_t) - (s - max_s))/τ - log_sum_t + log_sum_s
    kl = sums[:, 2] / sums[:, 1] - log_sum_t + log_sum_s
    return kl, (max_s, log_sum_s, max_t, log_sum_t)


def _takes_row_index(kernels) -> bool:
    """Kernels with ``supports_row_index`` (the fused ones) take ``row_index=`` and process only those rows."""
    return getattr(kernels, "supports_row_index", False)


class _VocabParallelKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, row_index, temperature, valid_columns, tp_group, kernels):
        # student/teacher: [N, W]; row_index: the rows that count (None = all).  Output: fp32 [N].
        n = student.shape[0]
        s_rows = student[:, :valid_columns]
        t_rows = teacher[:, :valid_columns]
        # kernels that take row_index (the fused ones) read the kept rows in place; the others get copies
        # (row_index comes from the loss mask's nonzero(): in range, so the kernels need not check it, which on a
        # GPU would synchronise)
        by_index = ({"row_index": row_index, "trusted_rows": True}
                    if row_index is not None and _takes_row_index(kernels) else {})
        if row_index is not None and not by_index:
            s_rows = s_rows.index_select(0, row_index)
            t_rows = t_rows.index_select(0, row_index)
        num_rows = n if row_index is None else row_index.numel()
        out_dtype = _compute_dtype(student)
        kl_rows = torch.zeros(num_rows, dtype=out_dtype, device=student.device)
        row_stats = (kl_rows,) * 4
        if num_rows > 0:  # every TP rank sees the same rows, so skipping the collectives is consistent
            stats = kernels.row_stats(s_rows, t_rows, temperature, **by_index)
            kl_rows, row_stats = _combine_across_shards(stats, temperature, tp_group)
        ctx.save_for_backward(student, teacher, row_index, *row_stats)
        ctx.temperature, ctx.valid_columns, ctx.kernels = temperature, valid_columns, kernels
        if row_index is None:
            return kl_rows
        kl = torch.zeros(n, dtype=out_dtype, device=student.device)
        return kl.index_copy_(0, row_index, kl_rows)

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, row_index, *row_stats = ctx.saved_tensors
        w = ctx.valid_columns
        grad_rows = grad_kl.to(_compute_dtype(student))
        if row_index is None:
            grad = torch.empty_like(student)
            if w < student.shape[1]:
                grad[:, w:] = 0  # padding columns are not part of either distribution
            if student.shape[0] > 0 and w > 0:
                ctx.kernels.student_grad(
                    student[:, :w], teacher[:, :w], *row_stats, grad_rows, ctx.temperature, grad[:, :w]
                )
        else:
            grad = torch.zeros_like(student)
            if row_index.numel() > 0 and w > 0 and _takes_row_index(ctx.kernels):
                ctx.kernels.student_grad(
                    student[:, :w], teacher[:, :w], *row_stats, grad_rows.index_select(0, row_index),
                    ctx.temperature, grad[:, :w], row_index=row_index, trusted_rows=True,
                )
            elif row_index.numel() > 0 and w > 0:
                part = torch.empty(row_index.numel(), w, dtype=student.dtype, device=student.device)
                ctx.kernels.student_grad(
                    student[:, :w].index_select(0, row_index),
                    teacher[:, :w].index_select(0, row_index),
                    *row_stats, grad_rows.index_select(0, row_index), ctx.temperature, part,
                )
                grad[:, :w].index_copy_(0, row_index, part)
        return grad, None, None, None, None, None, None


class _KLAndCrossEntropy(torch.autograd.Function):
    """KD and next-token CE of one unsharded, unpadded vocabulary at τ = 1 from the same pass.

    At τ = 1 the student's softmax is the CE's, so the KD row statistics give CE = max_s + log_sum_s - s[label] for
    free, and one gradient pass writes both terms: ``q·(g_kl + g_ce) - p·g_kl``, then ``-g_ce`` at each label.
    This saves CE's own softmax passes and the sum of two vocabulary-sized gradients.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, kernels):
        stats = kernels.row_stats(student, teacher, 1.0)
        kl, row_stats = _combine_across_shards(stats, 1.0, None)
        label_logit = student.gather(1, labels[:, None]).squeeze(1).to(kl.dtype)
        ce = row_stats[0] + row_stats[1] - label_logit
        ctx.save_for_backward(student, teacher, labels, *row_stats)
        ctx.kernels = kernels
        return kl, ce

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        student, teacher, labels, *row_stats = ctx.saved_tensors
        compute = _compute_dtype(student)
        g_kl, g_ce = grad_kl.to(compute), grad_ce.to(compute)
        grad = torch.empty_like(student)
        if student.shape[0] > 0:
            ctx.kernels.student_grad(student, teacher, *row_stats, g_kl + g_ce, 1.0, grad, teacher_grad_rows=g_kl)
            rows = torch.arange(student.shape[0], device=student.device)
            grad[rows, labels] -= g_ce.to(grad.dtype)
        return grad, None, None, None


@dataclasses.dataclass(frozen=True)
class _TorchKernels:
    """The PyTorch implementation of the two local kernels."""

    name: str = "torch"
    supports_split_grad: bool = True  # student_grad takes teacher_grad_rows

    @staticmethod
    def row_stats(student, teacher, temperature):
        return local_row_stats(student, teacher, temperature)

    @staticmethod
    def student_grad(student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out,
                     teacher_grad_rows=None):
        local_student_grad(student, teacher, max_s, log_sum_s, max_t, log_sum_t, grad_rows, temperature, out,
                           teacher_grad_rows=teacher_grad_rows)


TORCH_KERNELS = _TorchKernels()


def _select_kernels(impl: str, device: torch.device):
    if impl == "torch":
        return TORCH_KERNELS
    from salt_megatron import fused

    if impl == "fused":
        return fused.kernels_for(device, required=True)
    if impl == "auto":
        return fused.kernels_for(device, required=False) or TORCH_KERNELS
    raise ValueError(f"impl must be 'auto', 'torch' or 'fused', got {impl!r}")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def vocab_parallel_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group=None,
    loss_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token KL(softmax(teacher/τ) ‖ softmax(student/τ)) over the whole vocabulary, in nats.

    Args:
        student_logits, teacher_logits: this rank's vocabulary shard, any leading shape, last dim the shard width
            (rank r of the TP group holds columns ``[r*W, (r+1)*W)``); fp32, bf16 or fp16 (math in fp32), or
            fp64 (math in fp64, for gradcheck).
        temperature: τ > 0.
        vocab_size: the real vocabulary size; columns with global index ≥ ``vocab_size`` (Megatron's padding)
            count for neither model.  ``None``: every column is real.
        tp_group: the tensor-parallel process group the shards are spread over; ``None`` means no TP.
        loss_mask: optional, shape ``logits.shape[:-1]``; rows where it is 0 are skipped (their KL and gradient
            are 0 and they cost nothing).
        impl: ``"auto"`` (the fused kernel when built for this device, else PyTorch), ``"torch"`` or ``"fused"``.

    Returns:
        float32 (float64 for fp64 inputs) tensor of shape ``logits.shape[:-1]``, identical on every TP rank.  Gradient flows to the student
        only: ``(softmax(s/τ) - softmax(t/τ)) / τ`` times the upstream gradient.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    lead_shape, width = student_logits.shape[:-1], student_logits.shape[-1]
    tp_rank, tp_size = _tp_rank_and_size(tp_group)
    valid = _valid_columns(width, vocab_size, tp_rank, tp_size)
    if tp_size == 1:
        tp_group = None  # a group of one needs no collectives
    kernels = _select_kernels(impl, student_logits.device)

    student = student_logits.reshape(-1, width)
    teacher = teacher_logits.detach().reshape(-1, width)
    row_index = None
    if loss_mask is not None:
        if loss_mask.shape != lead_shape:
            raise ValueError(f"loss_mask must have shape {tuple(lead_shape)}, got {tuple(loss_mask.shape)}")
        flat_mask = loss_mask.reshape(-1)
        if not bool(flat_mask.all()):
            row_index = flat_mask.nonzero().squeeze(-1)
    kl = _VocabParallelKLDiv.apply(student, teacher, row_index, float(temperature), valid, tp_group, kernels)
    return kl.view(lead_shape)


@dataclasses.dataclass
class SaltLoss:
    """The SALT loss and its parts (masked token means), for the backward pass and for logging."""

    loss: torch.Tensor  # (1-ω)·CE + ω·[τ²]·KD, what backward runs on
    ce: torch.Tensor  # next-token cross entropy (detached)
    kd: torch.Tensor | None  # KL(teacher ‖ student) at τ, without the τ² factor (detached); None when ω = 0
    num_tokens: torch.Tensor  # tokens that counted (sum of the loss mask)


def salt_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    kd_weight: float,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    tp_group=None,
    scale_kd_by_temperature_squared: bool = True,
    impl: str = "auto",
) -> SaltLoss:
    """``(1-ω)·CE(student, labels) + ω·τ²·KD(teacher → student)``, averaged over the tokens the mask keeps.

    ``student_logits``/``teacher_logits``: vocab shards of shape ``labels.shape + (W,)``.  CE goes through
    megatron-core's vocab-parallel cross entropy (``tensor_parallel.vocab_parallel_cross_entropy``) when TP > 1.
    With ω = 0 the teacher's logits are not needed (pass None); with ω > 0 they are required.  The τ² factor
    (Hinton et al.) keeps the KD gradient's scale independent of τ; turn it off with
    ``scale_kd_by_temperature_squared=False``.
    """
    _check_kd_weight(kd_weight)
    _check_temperature(temperature)
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits without the vocab dim), "
            f"got {tuple(labels.shape)}"
        )
    if kd_weight > 0 and teacher_logits is None:
        raise ValueError("teacher_logits is required when kd_weight > 0")
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    if mask.shape != labels.shape:
        raise ValueError(f"loss_mask must have shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
    num_tokens = mask.sum()
    denom = num_tokens.clamp(min=1.0)

    sharded = tp_group is not None and torch.distributed.get_world_size(group=tp_group) > 1
    width = student_logits.shape[-1]
    kernels = _select_kernels(impl, student_logits.device) if kd_weight > 0 else None
    if kd_weight > 0 and _FUSE_CE_WITH_KD and temperature == 1.0 and not sharded and \
            (vocab_size is None or vocab_size == width) and getattr(kernels, "supports_split_grad", False):
        # one vocabulary, no padding, τ = 1: KD and CE from the same pass (see _KLAndCrossEntropy)
        _check_logits(student_logits, teacher_logits)
        kd_tokens, ce_tokens = _KLAndCrossEntropy.apply(
            student_logits.reshape(-1, width), teacher_logits.detach().reshape(-1, width), labels.reshape(-1),
            kernels,
        )
        kd_tokens, ce_tokens = kd_tokens.view(labels.shape), ce_tokens.view(labels.shape)
    else:
        # megatron's vocab-parallel CE (TP > 1) overwrites its input in place: it gets a copy when the KD term
        # needs the logits too.  Without TP, torch's CE leaves its input alone and no copy is made.
        ce_input = student_logits.clone() if sharded and kd_weight > 0 else student_logits
        ce_tokens = _vocab_parallel_cross_entropy(ce_input, labels, tp_group)
        kd_tokens = None
        if kd_weight > 0:
            kd_tokens = vocab_parallel_kl_div(
                student_logits, teacher_logits, temperature=temperature, vocab_size=vocab_size,
                tp_group=tp_group, loss_mask=None if loss_mask is None else loss_mask != 0, impl=impl,
            )
    ce = (ce_tokens.float() * mask).sum() / denom
    loss = (1.0 - kd_weight) * ce if kd_weight < 1 else ce.detach() * 0.0

    kd = None
    if kd_weight > 0:
        kd = (kd_tokens.float() * mask).sum() / denom
        factor = temperature**2 if scale_kd_by_temperature_squared else 1.0
        loss = loss + kd_weight * factor * kd
        kd = kd.detach()
    return SaltLoss(loss=loss, ce=ce.detach(), kd=kd, num_tokens=num_tokens)


def _vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token CE on vocab-parallel logits; megatron-core's implementation when the vocabulary is sharded."""
    if tp_group is None or torch.distributed.get_world_size(group=tp_group) == 1:
        flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return flat.view(labels.shape)
    from megatron.core import parallel_state, tensor_parallel

    if "tp_group" in inspect.signature(tensor_parallel.vocab_parallel_cross_entropy).parameters:  # mcore >= 0.17
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group)
    if tp_group is not parallel_state.get_tensor_model_parallel_group():
        raise ValueError("with megatron-core < 0.17, tp_group must be parallel_state's tensor-model-parallel group")
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
