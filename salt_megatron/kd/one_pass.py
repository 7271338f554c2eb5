"""Next-token CE from the KD loss's own pass over the student's logits: any τ, tensor parallelism, padding.

CE needs, per row, ``log Σ_v exp(s_v)`` over the student's whole (padded) vocabulary, as megatron-core's
vocab-parallel CE computes it, and the logit of the true token.  The KD kernels already read every logit: at τ = 1
their student sum is CE's sum; at τ ≠ 1 they also sum ``exp(s - max_s)`` in the same read (``with_ce_sum``).  The
few padding columns (Megatron's vocabulary padding: in CE's softmax, in neither KD distribution) are added here.
CE's numbers ride in the KD's two collectives (one more column in each), so TP costs no collective of its own.

The gradient is one pass too: ``(q - p)/τ·g_kl + q1·g_ce`` on the real columns (q1 = CE's softmax; at τ = 1
without padding q1 = q, and the kernels' split weights give ``q·(g_kl + g_ce) - p·g_kl``), ``q1·g_ce`` on the
padding, then ``-g_ce`` at each row's label on the shard that holds it.
"""

from __future__ import annotations

import dataclasses

import torch

from salt_megatron.kd.checks import compute_dtype
from salt_megatron.kd.vocab_parallel import combine_across_shards, tp_rank_and_size, valid_columns


@dataclasses.dataclass
class ShardCE:
    """One shard's part of the one-pass CE, called by ``combine_across_shards`` around its collectives.

    ``sum_valid``: Σ exp(s - max_valid) over the shard's real columns (``max_valid`` = the KD statistics' student
    maximum); ``pad``: the shard's padding columns ``[N, P]``; ``padded``: whether any shard has padding (the same
    on every rank, so the collectives have the same shape everywhere).
    """

    max_valid: torch.Tensor
    sum_valid: torch.Tensor
    label_logit: torch.Tensor  # the student's logit of the true token where this shard holds it, else 0
    pad: torch.Tensor
    padded: bool

    def local_max(self) -> torch.Tensor | None:
        """[N] for the MAX collective: the shard's maximum over all its columns, padding included (None without
        padding anywhere: then CE's maximum is the KD's)."""
        if not self.padded:
            return None
        if self.pad.shape[1] == 0:
            return self.max_valid
        return torch.maximum(self.max_valid, self.pad.to(self.max_valid.dtype).amax(1))

    def local_sums(self, ce_max: torch.Tensor) -> list[torch.Tensor]:
        """[N] columns for the SUM collective: Σ exp(s - ce_max) over this shard's columns, and the label logit."""
        present = torch.isfinite(self.max_valid)  # a shard whose real columns are all -inf adds nothing there
        shift = torch.where(present, self.max_valid - ce_max, torch.zeros_like(ce_max))
        total = torch.where(present, self.sum_valid * shift.exp(), torch.zeros_like(ce_max))
        if self.pad.shape[1] > 0:
            total = total + (self.pad.to(ce_max.dtype) - ce_max[:, None]).exp().sum(1)
        return [total, self.label_logit]

    @staticmethod
    def finish(ce_max, total, label_logit, max_s):
        """Per row: CE, and its log-sum relative to the KD's global student maximum (what the kernels' q1 takes)."""
        log_sum = ce_max + torch.log(total)
        return log_sum - label_logit, log_sum - max_s


def one_pass_forward(student, teacher, labels, temperature, valid, padded, tp_group, kernels, correctness=None):
    """KD and CE per row of one shard ``[N, W]`` (its first ``valid`` columns real; ``padded``: any shard has
    padding), in the KD's two collectives.  Returns ``kl``, ``ce``, the token-weighting answer (None without
    ``correctness``) and what :func:`one_pass_grad` needs."""
    first_column = tp_rank_and_size(tp_group)[0] * student.shape[1]
    local, on_shard = labels_on_shard(labels, first_column, valid)
    stats = kernels.row_stats(student[:, :valid], teacher[:, :valid], temperature, temperature != 1.0)
    label_logit = student.gather(1, local[:, None]).squeeze(1).to(stats.dtype)
    ce_part = ShardCE(max_valid=stats[:, 0], sum_valid=stats[:, 5 if temperature != 1.0 else 1],
                      label_logit=torch.where(on_shard, label_logit, torch.zeros_like(label_logit)),
                      pad=student[:, valid:], padded=padded)
    probe = None if correctness is None else correctness.on_shard(teacher[:, :valid], first_column, None)
    kl, row_stats, answer, (ce, ce_log_sum) = combine_across_shards(stats, temperature, tp_group, probe, ce_part)
    return kl, ce, answer, (local, on_shard, *row_stats, ce_log_sum)


def one_pass_grad(student, teacher, saved, g_kl, g_ce, temperature, valid, padded, kernels,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """d(Σ g_kl·KL + g_ce·CE)/d student for one shard, from :func:`one_pass_forward`'s ``saved``: one pass.
    ``out``: where to write it (``student`` itself works: each element is read before it is written)."""
    local, on_shard, *row_stats, ce_log_sum = saved
    compute = compute_dtype(student)
    g_kl, g_ce = g_kl.to(compute), g_ce.to(compute)
    grad = torch.empty_like(student) if out is None else out
    w = valid
    if student.shape[0] > 0 and w > 0:
        s, t, real = student[:, :w], teacher[:, :w], grad[:, :w]
        if temperature == 1.0 and not padded:  # q is CE's softmax too
            kernels.student_grad(s, t, *row_stats, g_kl + g_ce, 1.0, real, teacher_grad_rows=g_kl)
        else:
            kernels.student_grad(s, t, *row_stats, g_kl, temperature, real, ce_log_sum_s=ce_log_sum,
                                 ce_grad_rows=g_ce)
    if w < student.shape[1]:  # padding: in CE's softmax only
        q1 = (student[:, w:].to(compute) - (row_stats[0] + ce_log_sum)[:, None]).exp_()
        grad[:, w:] = q1.mul_(g_ce[:, None])
    # the one-hot of CE's gradient, on the shard that holds the label (a scatter: no host sync on a GPU)
    minus = torch.where(on_shard, -g_ce, torch.zeros_like(g_ce)).to(grad.dtype)
    return grad.scatter_add_(1, local[:, None], minus[:, None])


class KLAndCrossEntropy(torch.autograd.Function):
    """KD and next-token CE of one vocabulary shard from the same pass over the logits (see the module doc)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, valid, padded, tp_group, kernels, correctness):
        # student/teacher: one shard [N, W], its first `valid` columns real; labels: [N] global token ids;
        # padded: whether any shard has padding columns
        kl, ce, answer, saved = one_pass_forward(student, teacher, labels, temperature, valid, padded, tp_group,
                                                 kernels, correctness)
        ctx.save_for_backward(student, teacher, *saved)
        ctx.kernels, ctx.temperature, ctx.valid, ctx.padded = kernels, temperature, valid, padded
        answer = kl.new_empty(0) if answer is None else answer
        ctx.mark_non_differentiable(answer)
        return kl, ce, answer

    @staticmethod
    def backward(ctx, grad_kl, grad_ce, _grad_correctness):
        student, teacher, *saved = ctx.saved_tensors
        grad = one_pass_grad(student, teacher, saved, grad_kl, grad_ce, ctx.temperature, ctx.valid, ctx.padded,
                             ctx.kernels)
        return grad, None, None, None, None, None, None, None, None


def shard_layout(width: int, vocab_size: int | None, tp_group):
    """This rank's place in the vocabulary, as the one pass takes it: the TP group (None for a group of one: no
    collectives), how many of its ``width`` columns are real, and whether any shard has padding (the same on every
    rank, so every rank's collectives have the same shape)."""
    if tp_group is not None and torch.distributed.get_world_size(group=tp_group) == 1:
        tp_group = None
    tp_rank, tp_size = tp_rank_and_size(tp_group)
    padded = vocab_size is not None and vocab_size < width * tp_size
    return tp_group, valid_columns(width, vocab_size, tp_rank, tp_size), padded


def labels_on_shard(labels: torch.Tensor, first_column: int, valid: int):
    """Each label's column on this shard (0 where another shard holds it) and whether this shard holds it."""
    local = labels - first_column
    on_shard = (local >= 0) & (local < valid)
    return torch.where(on_shard, local, torch.zeros_like(local)), on_shard
