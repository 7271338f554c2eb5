"""The SALT loss from the output layers' inputs: the student's and the teacher's ``[tokens, V/TP]`` logits are never
held whole (the anchor is Liger-Kernel's fused-linear losses; theirs have no tensor parallelism).

Tokens go through in chunks.  For each chunk: its student and teacher logits (``hidden @ weight.T`` on this rank's
vocabulary shard), the KD and CE row statistics and their two collectives (``kd.one_pass``), and at once the
gradient of the loss with respect to those logits: the loss is a masked token mean, so every row's weight,
``(1-ω)/n`` for CE and ``ω·τ²/n`` for KD, is known before the backward pass.  That gradient goes straight into the
student's hidden-state and weight gradients (two matmuls) and the chunk's logits are dropped.  Backward only scales
the stored gradients by the upstream scalar: no logits are recomputed, so the matmul work is the materialised
path's.

Peak memory of the loss: two chunks of logits (the student's is overwritten by its gradient), plus the gradients of
the student's hidden states and output weight (which the materialised path needs as well), instead of the
materialised path's student logits, teacher logits and logits gradient for every token.

Under TP the hidden states are the same on every rank and the weights are vocabulary shards: the hidden-state
gradient returned here is this rank's part, summed over ranks by megatron-core's
``copy_to_tensor_model_parallel_region`` in front of the output layer, as for the materialised logits.
"""

from __future__ import annotations

import torch

from salt_megatron.kd.checks import check_kd_weight, check_temperature
from salt_megatron.kd.loss import SaltLoss
from salt_megatron.kd.one_pass import one_pass_forward, one_pass_grad, shard_layout
from salt_megatron.kd.select import select_kernels

# Tokens per chunk by default: as many as keep one chunk's logits within this many elements (128 MiB in fp32), so
# the loss's working set stays a few chunks whatever the vocabulary (at V/TP = 128k: 256 tokens a chunk).
CHUNK_ELEMENTS = 1 << 25


class _FusedLinearSaltLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, mask, kd_weight, factor, temperature,
                valid, padded, tp_group, kernels, chunk):
        n = hidden.shape[0]
        denom = mask.sum().clamp(min=1.0)
        g_ce_rows = (1.0 - kd_weight) * mask / denom  # d loss / d CE of each row
        g_kl_rows = kd_weight * factor * mask / denom
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h = hidden[lo:hi].to(weight.dtype)  # (bf16 weights, fp32 hidden states out of Float16Module)
            student = h @ weight.t()
            teacher = teacher_hidden[lo:hi].to(teacher_weight.dtype) @ teacher_weight.t()
            kl, ce, _, saved = one_pass_forward(student, teacher, labels[lo:hi], temperature, valid, padded,
                                                tp_group, kernels)
            keep = mask[lo:hi] > 0  # a masked row's numbers count for nothing (even when not finite)
            ce_sum += torch.where(keep, ce, torch.zeros_like(ce)).sum().double()
            kl_sum += torch.where(keep, kl, torch.zeros_like(kl)).sum().double()
            # the logits' gradient overwrites the student's logits (one chunk-sized buffer fewer)
            grad_logits = one_pass_grad(student, teacher, saved, g_kl_rows[lo:hi], g_ce_rows[lo:hi], temperature,
                                        valid, padded, kernels, out=student)
            del student, teacher, saved
            grad_hidden[lo:hi] = (grad_logits @ weight).to(grad_hidden.dtype)
            grad_weight.addmm_(grad_logits.t().float(), h.float())
        # kept on ctx, not saved for backward: they are neither inputs nor outputs, and backward scales them in
        # place (a copy of the weight's gradient would double the loss's peak)
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        ce_mean, kl_mean = (ce_sum / denom).float(), (kl_sum / denom).float()
        return (1.0 - kd_weight) * ce_mean + kd_weight * factor * kl_mean, ce_mean, kl_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss).to(ctx.weight_dtype),
                None, None, None, None, None, None, None, None, None, None, None, None)


def fused_linear_salt_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *, kd_weight: float,
                           temperature: float = 1.0, loss_mask: torch.Tensor | None = None,
                           vocab_size: int | None = None, tp_group=None, scale_kd_by_temperature_squared: bool = True,
                           impl: str = "auto", chunk_tokens: int | None = None) -> SaltLoss:
    """``salt_loss(hidden @ weight.T, labels, teacher_hidden @ teacher_weight.T, ...)`` without holding either
    logits tensor (see the module doc).

    ``hidden``: ``[..., H]`` the student's output-layer input; ``weight``: ``[W, H]`` its vocabulary shard (the
    embedding itself with tied embeddings); ``teacher_hidden``/``teacher_weight`` the teacher's, ``[..., H_t]`` and
    ``[W, H_t]``; ``labels``/``loss_mask``: ``hidden.shape[:-1]``.  Gradients go to ``hidden`` and ``weight``.
    ``chunk_tokens``: tokens per chunk (default: ``CHUNK_ELEMENTS`` logits a chunk).
    """
    check_kd_weight(kd_weight)
    check_temperature(temperature)
    lead = hidden.shape[:-1]
    if labels.shape != lead or teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"labels and teacher_hidden must have the leading shape {tuple(lead)} of hidden, got "
                         f"{tuple(labels.shape)} and {tuple(teacher_hidden.shape[:-1])}")
    if weight.shape[1] != hidden.shape[-1] or teacher_weight.shape[1] != teacher_hidden.shape[-1] or \
            weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"weights [W, H] must match their hidden states and each other's W: student "
                         f"{tuple(weight.shape)} for H={hidden.shape[-1]}, teacher {tuple(teacher_weight.shape)} for "
                         f"H={teacher_hidden.shape[-1]}")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    group, valid, padded = shard_layout(weight.shape[0], vocab_size, tp_group)
    mask = torch.ones(lead, dtype=torch.float32, device=hidden.device) if loss_mask is None else loss_mask.float()
    factor = temperature**2 if scale_kd_by_temperature_squared else 1.0
    kernels = select_kernels(impl, hidden.device)
    loss, ce, kd = _FusedLinearSaltLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight.detach(), labels.reshape(-1), mask.reshape(-1), float(kd_weight), factor, float(temperature),
        valid, padded, group, kernels, int(chunk_tokens),
    )
    return SaltLoss(loss=loss, ce=ce.detach(), kd=kd.detach(), num_tokens=mask.sum())
