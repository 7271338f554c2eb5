"""The SALT loss: ``(1-ω)·CE(student, next token) + ω·τ²·KD(teacher → student)`` on vocab-parallel logits."""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F

from salt_megatron.kd.checks import check_kd_weight, check_logits, check_temperature
from salt_megatron.kd.one_pass import KLAndCrossEntropy, shard_layout
from salt_megatron.kd.select import select_kernels
from salt_megatron.kd.sparse_kl import sparse_kd_and_cross_entropy
from salt_megatron.kd.token_weights import TokenCorrectness, normalised_weights
from salt_megatron.kd.vocab_parallel import vocab_parallel_kl_div


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
    fuse_ce_with_kd: bool = True,
    kd_token_weighting: str = "none",
    kd_token_topk: int = 10,
) -> SaltLoss:
    """``(1-ω)·CE(student, labels) + ω·τ²·KD(teacher → student)``, averaged over the tokens the mask keeps.

    ``student_logits``/``teacher_logits``: vocab shards of shape ``labels.shape + (W,)``.  CE comes from the KD
    pass (``kd.one_pass``); apart from it (ω = 0, or ``fuse_ce_with_kd=False``) CE goes through megatron-core's
    vocab-parallel cross entropy (``tensor_parallel.vocab_parallel_cross_entropy``) when TP > 1.
    With ω = 0 the teacher's logits are not needed (pass None); with ω > 0 they are required.  The τ² factor
    (Hinton et al.) keeps the KD gradient's scale independent of τ; turn it off with
    ``scale_kd_by_temperature_squared=False``.  ``fuse_ce_with_kd``: take CE from the KD pass (any τ, TP and
    padding; its numbers ride in the KD's two collectives) instead of a softmax of its own: the same numbers, one
    pass over the logits fewer; ``False`` computes the two apart.  ``kd_token_weighting``
    (``salt_megatron.kd.token_weights``; ``kd_token_topk`` is teacher_topk's k): ω per token is ω·w, w how right
    the teacher is about the token, normalised to mean 1 over the kept tokens, measured in the KD loss's own pass
    and collectives; the loss per token is max(0, 1-ω·w)·CE + ω·w·[τ²]·KD.
    """
    check_kd_weight(kd_weight)
    check_temperature(temperature)
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

    sharded = tp_group is not None and torch.distributed.get_world_size(group=tp_group) > 1
    width = student_logits.shape[-1]
    kernels = select_kernels(impl, student_logits.device) if kd_weight > 0 else None
    correctness = None
    if kd_weight > 0 and kd_token_weighting != "none":
        correctness = TokenCorrectness(kd_token_weighting, labels.reshape(-1), kd_token_topk)
    token_correctness = None
    if kd_weight > 0 and fuse_ce_with_kd and kernels.supports_split_grad:
        # KD and CE from the same pass (salt_megatron.kd.one_pass)
        check_logits(student_logits, teacher_logits)
        group, valid, padded = shard_layout(width, vocab_size, tp_group)
        kd_tokens, ce_tokens, token_correctness = KLAndCrossEntropy.apply(
            student_logits.reshape(-1, width), teacher_logits.detach().reshape(-1, width), labels.reshape(-1),
            float(temperature), valid, padded, group, kernels, correctness,
        )
        kd_tokens, ce_tokens = kd_tokens.view(labels.shape), ce_tokens.view(labels.shape)
        token_correctness = None if correctness is None else token_correctness
    else:
        # megatron's vocab-parallel CE (TP > 1) overwrites its input in place: it gets a copy when the KD term
        # needs the logits too.  Without TP, torch's CE leaves its input alone and no copy is made.
        ce_input = student_logits.clone() if sharded and kd_weight > 0 else student_logits
        ce_tokens = vocab_parallel_cross_entropy(ce_input, labels, tp_group)
        kd_tokens = None
        if kd_weight > 0:
            kd_tokens = vocab_parallel_kl_div(
                student_logits, teacher_logits, temperature=temperature, vocab_size=vocab_size,
                tp_group=tp_group, loss_mask=None if loss_mask is None else loss_mask != 0, impl=impl,
                correctness=None if correctness is None else dataclasses.replace(correctness, labels=labels),
            )
            if correctness is not None:
                kd_tokens, token_correctness = kd_tokens
    factor = temperature**2 if scale_kd_by_temperature_squared else 1.0
    omega = None if token_correctness is None else \
        kd_weight * normalised_weights(token_correctness.view(labels.shape), mask)
    return _combined(ce_tokens, kd_tokens, mask, kd_weight, factor, omega)


def _combined(ce_tokens, kd_tokens, mask, kd_weight: float, factor: float, omega=None) -> SaltLoss:
    """(1-ω)·CE + ω·factor·KD as masked token means (``omega``: ω per token, for token weighting)."""
    num_tokens = mask.sum()
    denom = num_tokens.clamp(min=1.0)
    ce = (ce_tokens.float() * mask).sum() / denom
    kd = None if kd_tokens is None else (kd_tokens.float() * mask).sum() / denom
    if omega is not None:
        loss = (((1.0 - omega).clamp(min=0.0) * ce_tokens.float() + factor * omega * kd_tokens.float()) * mask
                ).sum() / denom
    else:
        loss = (1.0 - kd_weight) * ce if kd_weight < 1 else ce.detach() * 0.0
        if kd_weight > 0:
            loss = loss + kd_weight * factor * kd
    return SaltLoss(loss=loss, ce=ce.detach(), kd=None if kd is None else kd.detach(), num_tokens=num_tokens)


def cached_salt_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_topk: dict, *, kd_weight: float,
                     temperature: float = 1.0, loss_mask: torch.Tensor | None = None, vocab_size: int | None = None,
                     tp_group=None, scale_kd_by_temperature_squared: bool = True) -> SaltLoss:
    """The SALT loss against a cached teacher (``salt-megatron cache-teacher``): KD over the teacher's top K plus one
    bucket for the rest of its mass, and CE, from one pass over the student's logits (``kd.sparse_kl``).
    ``teacher_topk``: ``teacher_ids`` / ``teacher_logprobs`` (``labels.shape + (K,)``) and ``teacher_rest``."""
    check_kd_weight(kd_weight)
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    kd_tokens, ce_tokens = sparse_kd_and_cross_entropy(
        student_logits, labels, teacher_topk["teacher_ids"], teacher_topk["teacher_logprobs"],
        teacher_topk["teacher_rest"], temperature=temperature, vocab_size=vocab_size, tp_group=tp_group,
        loss_mask=None if loss_mask is None else loss_mask != 0,
    )
    factor = temperature**2 if scale_kd_by_temperature_squared else 1.0
    return _combined(ce_tokens, kd_tokens if kd_weight > 0 else None, mask, kd_weight, factor)


def masked_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                              tp_group) -> torch.Tensor:
    """Mean next-token CE over the tokens the mask keeps, without autograd: the teacher's CE on a batch, from the
    logits the KD term uses anyway (``--kd-transition auto``).  A copy under TP: megatron-core's CE is in place."""
    with torch.no_grad():
        sharded = tp_group is not None and torch.distributed.get_world_size(group=tp_group) > 1
        ce = vocab_parallel_cross_entropy(logits.clone() if sharded else logits, labels, tp_group)
        mask = loss_mask.float()
        return (ce.float() * mask).sum() / mask.sum().clamp(min=1.0)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
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
