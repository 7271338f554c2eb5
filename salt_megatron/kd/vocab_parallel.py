"""KL(teacher ‖ student) on vocab-parallel logits, without gathering the vocabulary.

Megatron shards the output layer's columns over tensor-parallel (TP) ranks: rank r holds vocabulary columns
``[r*W, (r+1)*W)`` of the logits, W = padded_vocab / TP.  The KL divergence between the teacher's and the student's
softmax at temperature τ needs, per token (row), only a few numbers from each shard::

    KL = Σ_v p_v ((t_v - m_t) - (s_v - m_s))/τ  -  log S_t  +  log S_s
    with p = softmax(t/τ), m_x = max_v x_v, S_x = Σ_v exp((x_v - m_x)/τ)

So every rank makes one pass over its shard (a kernel set's ``row_stats``, see ``salt_megatron.kd.protocol``) and
produces, per row, its local maxima and sums and the partial KL relative to its local maxima.  Two collectives on
those row statistics (a MAX of the maxima, then a SUM of the rescaled sums) give every rank the exact global KL.
The gradient with respect to the student's shard is local: ``(softmax(s/τ) - softmax(t/τ)) / τ`` on the rank's own
columns, so backward needs no communication and TP gradients are right on every shard.  Nothing here knows about
training.

Memory: the forward keeps no fp32 copy of the logits; backward writes the gradient once, in the student's dtype.
Saved for backward: the inputs and four floats per row (global maxima and log-sums).
"""

from __future__ import annotations

import dataclasses

import torch

from salt_megatron.kd.checks import check_logits, check_temperature, compute_dtype
from salt_megatron.kd.select import select_kernels
from salt_megatron.kd.token_weights import TokenCorrectness


def tp_rank_and_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return torch.distributed.get_rank(group=tp_group), torch.distributed.get_world_size(group=tp_group)


def valid_columns(shard_width: int, vocab_size: int | None, tp_rank: int, tp_size: int) -> int:
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


def combine_across_shards(stats: torch.Tensor, temperature: float, tp_group, probe=None, ce=None):
    """Exactly two collectives (MAX of maxima, SUM of rescaled sums).

    Returns ``kl``, the global row statistics backward needs: ``(max_s, log_sum_s, max_t, log_sum_t)``, the
    per-row answer of ``probe`` (``salt_megatron.kd.token_weights.ShardProbe``, token weighting; None without one),
    and that of ``ce`` (``salt_megatron.kd.one_pass.ShardCE``, the next-token CE from this pass: ``(ce per row, its
    log-sum relative to max_s)``; None without one), whose numbers ride in the same two collectives.
    Only basic slicing here: indexing with a Python tuple copies the index to the GPU from pageable memory, which
    synchronises the stream and left the GPU idle while the few small ops below were launched (seen on an H100).
    """
    if tp_group is None:  # one shard: the local maxima are global, nothing to rescale (the same numbers, 5 ops)
        max_s, sum_s, max_t, sum_t, partial = stats[:, :5].unbind(1)
        log_sum_s, log_sum_t = torch.log(sum_s), torch.log(sum_t)
        answer = ce_answer = None
        if probe is not None:
            label = probe.local_label_logit(stats.dtype)
            answer = probe.finish(label, probe.local_count_above(label), max_t, log_sum_t, temperature)
        if ce is not None:
            ce_max = ce.local_max()
            ce_max = max_s if ce_max is None else ce_max
            ce_answer = ce.finish(ce_max, *ce.local_sums(ce_max), max_s)
        return partial / sum_t - log_sum_t + log_sum_s, (max_s, log_sum_s, max_t, log_sum_t), answer, ce_answer
    local_max = stats[:, 0:3:2]
    extra_max = [] if probe is None else [probe.local_label_logit(stats.dtype)]
    ce_max = None if ce is None else ce.local_max()
    if ce_max is not None:
        extra_max.append(ce_max)
    maxima = torch.cat((local_max, *(x[:, None] for x in extra_max)), dim=1) if extra_max else local_max.contiguous()
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    global_max = maxima[:, 0:2]
    # shift = (local max - global max)/τ <= 0.  exp(shift) rescales this shard's sums; a shard of padding only
    # (max -inf) contributes nothing.
    present = torch.isfinite(local_max)
    shift = torch.where(present, (local_max - global_max) / temperature, torch.zeros_like(local_max))
    scale = torch.where(present, shift.exp(), torch.zeros_like(local_max))
    # the partial KL was taken relative to the local maxima; moving it to the global ones adds S_t·(Δt - Δs)
    partial = stats[:, 4] + stats[:, 3] * (shift[:, 1] - shift[:, 0])
    columns = [stats[:, 1] * scale[:, 0], stats[:, 3] * scale[:, 1], partial * scale[:, 1]]
    if ce is not None:  # CE's sum relative to its global maximum, and the label logit
        ce_max = global_max[:, 0] if ce_max is None else maxima[:, -1]
        columns += ce.local_sums(ce_max)
    count = None if probe is None else probe.local_count_above(maxima[:, 2])
    sums = torch.stack(columns if count is None else [*columns, count], dim=1)
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=tp_group)
    max_s, max_t = global_max[:, 0], global_max[:, 1]
    log_sum_s, log_sum_t = torch.log(sums[:, 0]), torch.log(sums[:, 1])
    # KL = Σ p·((t - max_t) - (s - max_s))/τ - log_sum_t + log_sum_s
    kl = sums[:, 2] / sums[:, 1] - log_sum_t + log_sum_s
    answer = ce_answer = None
    if probe is not None:
        answer = probe.finish(maxima[:, 2], None if count is None else sums[:, -1], max_t, log_sum_t, temperature)
    if ce is not None:
        ce_answer = ce.finish(ce_max, sums[:, 3], sums[:, 4], max_s)
    return kl, (max_s, log_sum_s, max_t, log_sum_t), answer, ce_answer


class _VocabParallelKLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, row_index, temperature, valid_columns, tp_group, kernels, correctness):
        # student/teacher: [N, W]; row_index: the rows that count (None = all); correctness: token weighting's
        # TokenCorrectness or None.  Outputs: fp32 [N] KL, and [N] correctness (empty without one, no gradient).
        n = student.shape[0]
        s_rows = student[:, :valid_columns]
        t_rows = teacher[:, :valid_columns]
        # kernels that take row_index (the fused ones) read the kept rows in place; the others get copies
        # (row_index comes from the loss mask's nonzero(): in range, so the kernels need not check it, which on a
        # GPU would synchronise)
        by_index = ({"row_index": row_index, "trusted_rows": True}
                    if row_index is not None and kernels.supports_row_index else {})
        if row_index is not None and not by_index:
            s_rows = s_rows.index_select(0, row_index)
            t_rows = t_rows.index_select(0, row_index)
        num_rows = n if row_index is None else row_index.numel()
        out_dtype = compute_dtype(student)
        kl_rows = torch.zeros(num_rows, dtype=out_dtype, device=student.device)
        row_stats, answer = (kl_rows,) * 4, kl_rows
        if num_rows > 0:  # every TP rank sees the same rows, so skipping the collectives is consistent
            stats = kernels.row_stats(s_rows, t_rows, temperature, **by_index)
            probe = None
            if correctness is not None:
                kept_teacher = t_rows.index_select(0, row_index) if by_index else t_rows
                probe = correctness.on_shard(kept_teacher, tp_rank_and_size(tp_group)[0] * student.shape[1],
                                             row_index)
            kl_rows, row_stats, answer, _ = combine_across_shards(stats, temperature, tp_group, probe)
        ctx.save_for_backward(student, teacher, row_index, *row_stats)
        ctx.temperature, ctx.valid_columns, ctx.kernels = temperature, valid_columns, kernels
        if correctness is None:
            answer = kl_rows.new_empty(0)
        elif row_index is not None:
            answer = torch.zeros(n, dtype=out_dtype, device=student.device).index_copy_(0, row_index, answer)
        ctx.mark_non_differentiable(answer)
        if row_index is None:
            return kl_rows, answer
        kl = torch.zeros(n, dtype=out_dtype, device=student.device)
        return kl.index_copy_(0, row_index, kl_rows), answer

    @staticmethod
    def backward(ctx, grad_kl, _grad_correctness):
        student, teacher, row_index, *row_stats = ctx.saved_tensors
        w = ctx.valid_columns
        grad_rows = grad_kl.to(compute_dtype(student))
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
            if row_index.numel() > 0 and w > 0 and ctx.kernels.supports_row_index:
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
        return grad, None, None, None, None, None, None, None


def vocab_parallel_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group=None,
    loss_mask: torch.Tensor | None = None,
    impl: str = "auto",
    correctness: TokenCorrectness | None = None,
):
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
        correctness: token weighting (``salt_megatron.kd.token_weights.TokenCorrectness``, labels flattened): also
            measure how right the teacher is about each row's true token, in the same two collectives.

    Returns:
        float32 (float64 for fp64 inputs) tensor of shape ``logits.shape[:-1]``, identical on every TP rank.
        Gradient flows to the student only: ``(softmax(s/τ) - softmax(t/τ)) / τ`` times the upstream gradient.
        With ``correctness``: the pair ``(kl, correctness per token)``, both of that shape (0 where masked).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    lead_shape, width = student_logits.shape[:-1], student_logits.shape[-1]
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    valid = valid_columns(width, vocab_size, tp_rank, tp_size)
    if tp_size == 1:
        tp_group = None  # a group of one needs no collectives
    kernels = select_kernels(impl, student_logits.device)

    student = student_logits.reshape(-1, width)
    teacher = teacher_logits.detach().reshape(-1, width)
    row_index = None
    if loss_mask is not None:
        if loss_mask.shape != lead_shape:
            raise ValueError(f"loss_mask must have shape {tuple(lead_shape)}, got {tuple(loss_mask.shape)}")
        flat_mask = loss_mask.reshape(-1)
        if not bool(flat_mask.all()):
            row_index = flat_mask.nonzero().squeeze(-1)
    if correctness is not None:
        if correctness.labels.shape != lead_shape:
            raise ValueError(f"the token weighting's labels must have shape {tuple(lead_shape)}, got "
                             f"{tuple(correctness.labels.shape)}")
        correctness = dataclasses.replace(correctness, labels=correctness.labels.reshape(-1))
    kl, answer = _VocabParallelKLDiv.apply(student, teacher, row_index, float(temperature), valid, tp_group, kernels,
                                           correctness)
    if correctness is None:
        return kl.view(lead_shape)
    return kl.view(lead_shape), answer.view(lead_shape)
