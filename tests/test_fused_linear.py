"""The SALT loss from the output layers' inputs (``kd.fused_linear``), logits never held whole: exact against the
float64 reference on materialised logits (loss, CE, KD, the gradients of the student's hidden states and output
weight), any chunking, τ ≠ 1, padding, tied embeddings, TP = 2."""

from __future__ import annotations

import pytest
import torch

from salt_megatron.kd.fused_linear import fused_linear_salt_loss
from tests.dist_utils import run_workers
from tests.kd_cases import TWO_COLLECTIVES, CountingAllReduce, fused_kernels_on, reference_salt_loss

OMEGA = 0.4


def _inputs(seed, width=64, vocab_size=None):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(3, 5, 16, generator=g), torch.randn(width, 16, generator=g) * 0.5
    teacher_hidden, teacher_weight = torch.randn(3, 5, 8, generator=g), torch.randn(width, 8, generator=g)
    labels = torch.randint(0, vocab_size or width, (3, 5), generator=g)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    return hidden, weight, teacher_hidden, teacher_weight, labels, mask


def _reference(hidden, weight, teacher_hidden, teacher_weight, labels, mask, tau, vocab_size):
    """Loss, CE, KD and the gradients of hidden and weight, float64, through materialised logits."""
    h, w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logits = h @ w.t()
    teacher = teacher_hidden.double() @ teacher_weight.double().t()
    loss, ce, kd, grad_logits = reference_salt_loss(logits.detach(), teacher, labels, mask, OMEGA, tau, vocab_size)
    logits.backward(grad_logits)
    return loss, ce, kd, h.grad, w.grad


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize("tau,vocab_size", [(1.0, None), (2.0, None), (1.0, 60), (1.3, 61)])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_matches_the_float64_reference_on_materialised_logits(impl, tau, vocab_size, chunk):
    if impl == "fused":
        fused_kernels_on("cpu")
    hidden, weight, teacher_hidden, teacher_weight, labels, mask = _inputs(0, vocab_size=vocab_size)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_linear_salt_loss(h, w, labels, teacher_hidden, teacher_weight, kd_weight=OMEGA, temperature=tau,
                                 loss_mask=mask, vocab_size=vocab_size, impl=impl, chunk_tokens=chunk)
    out.loss.backward()
    loss, ce, kd, grad_h, grad_w = _reference(hidden, weight, teacher_hidden, teacher_weight, labels, mask, tau,
                                              vocab_size)
    for got, want in ((out.loss, loss), (out.ce, ce), (out.kd, kd)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), grad_h, rtol=1e-5, atol=1e-5 * grad_h.abs().max().item())
    torch.testing.assert_close(w.grad.double(), grad_w, rtol=1e-5, atol=1e-5 * grad_w.abs().max().item())
    assert torch.all(h.grad[2, 3:] == 0)  # masked tokens get no gradient


def test_tied_embeddings_get_both_gradients():
    """With tied embeddings the output weight is the input embedding: its gradient is the lookup's plus the loss's,
    as through materialised logits."""
    _, weight, teacher_hidden, teacher_weight, labels, mask = _inputs(1)
    tokens = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(3))
    grads = []
    for fused in (True, False):
        w = weight.clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, w))  # a stand-in for the transformer
        if fused:
            out = fused_linear_salt_loss(hidden, w, labels, teacher_hidden, teacher_weight, kd_weight=OMEGA,
                                         temperature=2.0, loss_mask=mask, chunk_tokens=4)
        else:
            from salt_megatron.kd import salt_loss

            out = salt_loss(hidden @ w.t(), labels, teacher_hidden @ teacher_weight.t(), kd_weight=OMEGA,
                            temperature=2.0, loss_mask=mask)
        out.loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _tp_worker(rank, world_size, tau, vocab_size):
    torch.distributed.init_process_group("gloo")
    hidden, weight, teacher_hidden, teacher_weight, labels, mask = _inputs(2, vocab_size=vocab_size)
    w = weight.shape[0] // world_size
    rows = slice(rank * w, (rank + 1) * w)
    h, shard = hidden.clone().requires_grad_(True), weight[rows].clone().requires_grad_(True)
    with CountingAllReduce() as counted:
        out = fused_linear_salt_loss(h, shard, labels, teacher_hidden, teacher_weight[rows], kd_weight=OMEGA,
                                     temperature=tau, loss_mask=mask, vocab_size=vocab_size,
                                     tp_group=torch.distributed.group.WORLD, chunk_tokens=8)
        out.loss.backward()
    return out.loss.detach(), out.ce, out.kd, h.grad, shard.grad, counted.ops


@pytest.mark.parametrize("tau,vocab_size", [(1.0, None), (1.5, 57)])
def test_tensor_parallel_matches_the_reference(tau, vocab_size):
    """TP = 2: every rank gets the reference's loss; the ranks' hidden-state gradients sum to the reference's (what
    megatron-core's copy-to-TP-region all-reduces) and each weight shard gets its rows; two collectives a chunk."""
    fused_kernels_on("cpu")
    results = run_workers(_tp_worker, 2, tau, vocab_size)
    loss, ce, kd, grad_h, grad_w = _reference(*_inputs(2, vocab_size=vocab_size), tau, vocab_size)
    for rank, (got_loss, got_ce, got_kd, _, got_w, ops) in enumerate(results):
        assert ops == TWO_COLLECTIVES * 2  # 15 tokens in chunks of 8
        for got, want in ((got_loss, loss), (got_ce, ce), (got_kd, kd)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w.double(), grad_w[rank * 32:(rank + 1) * 32], rtol=1e-5,
                                   atol=1e-5 * grad_w.abs().max().item())
    summed = sum(r[3].double() for r in results)
    torch.testing.assert_close(summed, grad_h, rtol=1e-5, atol=1e-5 * grad_h.abs().max().item())
