"""Sparse-teacher KD + CE (salt_megatron.kd.sparse_kl) against float64 references written here: K = V is the dense
KL (and vocab_parallel_kl_div); K < V follows the formula (autograd of the reference for the gradient, gradcheck in
fp64); fp32/bf16/fp16 logits; padding; an extreme row where 1 - Q is 0 in fp32; the loss mask; TP = 2 on column
halves (values, gradient shards, exactly two all_reduce calls); bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salt_megatron.kd import torch_kernels, vocab_parallel_kl_div
from salt_megatron.kd.sparse_kl import sparse_kd_and_cross_entropy
from tests.dist_utils import run_workers
from tests.kd_cases import CountingAllReduce

NEG_INF = float("-inf")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_case(lead, width, vocab, k, tau, seed=0, shuffle=False, logprob_dtype=torch.float32):
    """Student logits (padding columns at 50, which would win everything if they counted), labels, and a sparse
    teacher cache (top K of a random teacher at τ, log r from the rest's own log-sum-exp)."""
    v = vocab or width
    student = torch.randn(*lead, width, generator=_gen(seed), dtype=torch.float64) * 3
    student[..., v:] = 50.0
    teacher = torch.randn(*lead, v, generator=_gen(seed + 1), dtype=torch.float64) * 3
    log_p = F.log_softmax(teacher / tau, -1)
    if shuffle:  # every id, in a random order per row
        ids = torch.stack([torch.randperm(v, generator=_gen(seed + 2 + i)) for i in range(log_p[..., 0].numel())])
        ids = ids.view(*lead, v)
    else:
        ids = log_p.topk(k, dim=-1).indices
    top = log_p.gather(-1, ids)
    rest = log_p.scatter(-1, ids, NEG_INF).logsumexp(-1)  # -inf when K = V
    labels = torch.randint(0, v, lead, generator=_gen(seed + 3))
    return student, labels, ids, top.to(logprob_dtype), rest.float()


def reference(student, labels, ids, logprobs, rest, tau, vocab):
    """KD and CE per row from the formula, float64 (differentiable wrt ``student``)."""
    s = student.double()[..., :vocab]
    log_q = F.log_softmax(s / tau, -1)
    lp, log_r = logprobs.double(), rest.double()
    p, r = lp.exp(), log_r.exp()
    log_q_rest = log_q.scatter(-1, ids, NEG_INF).logsumexp(-1)  # log(1 - Q), summed over the rest itself
    kd = (p * (lp - log_q.gather(-1, ids))).sum(-1)
    kd = kd + torch.where(r > 0, r * (log_r - log_q_rest), torch.zeros_like(r))
    ce = -F.log_softmax(s, -1).gather(-1, labels[..., None]).squeeze(-1)
    return kd, ce


def upstream(lead, seed=9):
    g = torch.rand(*lead, 2, generator=_gen(seed), dtype=torch.float64) + 0.5
    return g[..., 0], g[..., 1]


def run_sparse(student, labels, ids, logprobs, rest, tau, vocab, grads, **kwargs):
    x = student.clone().requires_grad_(True)
    kd, ce = sparse_kd_and_cross_entropy(x, labels, ids, logprobs, rest, temperature=tau, vocab_size=vocab, **kwargs)
    assert kd.shape == ce.shape == labels.shape
    assert kd.dtype == ce.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    (kd * grads[0].to(kd.dtype) + ce * grads[1].to(ce.dtype)).sum().backward()
    return kd.detach(), ce.detach(), x.grad


def run_reference(student, labels, ids, logprobs, rest, tau, vocab, grads):
    x = student.double().clone().requires_grad_(True)
    kd, ce = reference(x, labels, ids, logprobs, rest, tau, vocab)
    (kd * grads[0] + ce * grads[1]).sum().backward()
    return kd.detach(), ce.detach(), x.grad


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("width, vocab", [(20, None), (24, 21)])
def test_k_equal_v_is_the_dense_kl_and_matches_vocab_parallel_kl_div(tau, width, vocab):
    lead, v = (3, 4), vocab or width
    student, labels, ids, top, rest = make_case(lead, width, vocab, v, tau, seed=1, shuffle=True,
                                                logprob_dtype=torch.float64)
    assert torch.isinf(rest).all()
    grads = upstream(lead)
    kd, ce, grad = run_sparse(student, labels, ids, top, rest, tau, vocab, grads)
    # the dense teacher that the cache was cut from (its log-softmax at τ, scattered back, is exact up to a constant)
    teacher = torch.full((*lead, width), -1e4, dtype=torch.float64).scatter(-1, ids, top * tau)
    dense = F.log_softmax(teacher[..., :v] / tau, -1)
    want = (dense.exp() * (dense - F.log_softmax(student[..., :v] / tau, -1))).sum(-1)
    torch.testing.assert_close(kd, want, rtol=1e-6, atol=1e-10)
    y = student.clone().requires_grad_(True)
    kl = vocab_parallel_kl_div(y, teacher, temperature=tau, vocab_size=vocab, impl="torch")
    (kl * grads[0]).sum().backward()
    x = student.clone().requires_grad_(True)
    kd_only, _ = sparse_kd_and_cross_entropy(x, labels, ids, top, rest, temperature=tau, vocab_size=vocab)
    (kd_only * grads[0]).sum().backward()
    torch.testing.assert_close(kd_only, kl.detach(), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-10)
    assert (x.grad[..., v:] == 0).all()
    # CE is the plain cross entropy, and the joint gradient is the sum of the two
    torch.testing.assert_close(ce, F.cross_entropy(student[..., :v].reshape(-1, v), labels.reshape(-1),
                                                   reduction="none").view(lead), rtol=1e-10, atol=1e-10)
    ref = run_reference(student, labels, ids, top, rest, tau, vocab, grads)
    torch.testing.assert_close(grad, ref[2], rtol=1e-6, atol=1e-10)


TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6),
              torch.bfloat16: dict(rtol=2e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}
SHAPES = [((3, 5), 24, 21, 4), ((11,), 16, None, 1), ((2, 3), 24, 21, 20), ((2, 2, 3), 40, 37, 9)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_k_below_v_follows_the_formula(dtype, tau):
    for i, (lead, width, vocab, k) in enumerate(SHAPES):
        lp_dtype = torch.float32 if dtype == torch.float64 else (torch.bfloat16 if i % 2 else torch.float16)
        student, labels, ids, top, rest = make_case(lead, width, vocab, k, tau, seed=10 + i, logprob_dtype=lp_dtype)
        student = student.to(dtype)  # the reference reads the same rounded inputs
        grads = upstream(lead, seed=i)
        kd, ce, grad = run_sparse(student, labels, ids.int() if i % 2 else ids, top, rest, tau, vocab, grads)
        want_kd, want_ce, want_grad = run_reference(student, labels, ids, top, rest, tau, vocab, grads)
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(kd.double(), want_kd, **tol)
        torch.testing.assert_close(ce.double(), want_ce, **tol)
        assert grad.dtype == dtype
        scale = want_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), want_grad, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))
        assert (grad[..., vocab or width:] == 0).all()


def test_small_chunks_and_a_confident_student_where_one_minus_q_is_zero_in_fp32(monkeypatch):
    monkeypatch.setattr(torch_kernels, "_CHUNK_ELEMENTS", 50)  # several row chunks per call
    lead, width, vocab, k, tau = (9,), 24, 21, 3, 1.0
    student, labels, ids, top, rest = make_case(lead, width, vocab, k, tau, seed=5)
    rows = torch.arange(0, 9, 2)
    student[rows] -= 200.0 * torch.ones(len(rows), width, dtype=torch.float64).scatter(1, ids[rows], 0.0)
    student[..., vocab:] = 50.0
    for dtype in (torch.float32, torch.float64):
        grads = upstream(lead)
        kd, ce, grad = run_sparse(student.to(dtype), labels, ids, top, rest, tau, vocab, grads)
        want = run_reference(student, labels, ids, top, rest, tau, vocab, grads)
        q = torch.softmax(student.to(dtype)[rows, :vocab], -1)
        # the true 1 - Q is ~1e-87: formed as 1 - Q in fp32 it would be 0 or rounding noise
        assert (1 - q.gather(-1, ids[rows]).sum(-1) < 1e-6).all()
        assert torch.isfinite(kd).all() and torch.isfinite(grad).all()
        tol = TOLERANCES[dtype]
        for got, ref in zip((kd, ce, grad), want):
            torch.testing.assert_close(got.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * ref.abs().max())


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gradcheck_in_fp64(tau):
    lead, width, vocab, k = (2, 3), 10, 8, 3
    student, labels, ids, top, rest = make_case(lead, width, vocab, k, tau, seed=7, logprob_dtype=torch.bfloat16)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])

    def fn(x):
        return sparse_kd_and_cross_entropy(x, labels, ids, top, rest, temperature=tau, vocab_size=vocab,
                                           loss_mask=mask)

    assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_the_loss_mask_zeroes_rows_and_their_gradient_and_keeps_the_rest(monkeypatch):
    monkeypatch.setattr(torch_kernels, "_CHUNK_ELEMENTS", 60)
    lead, width, vocab, k, tau = (4, 5), 24, 21, 5, 2.0
    student, labels, ids, top, rest = make_case(lead, width, vocab, k, tau, seed=3)
    mask = torch.rand(lead, generator=_gen(4)) > 0.4
    assert 0 < mask.sum() < mask.numel()
    grads = upstream(lead)
    full = run_sparse(student, labels, ids, top, rest, tau, vocab, grads)
    garbage = student.clone()
    garbage[~mask] = float("nan")  # skipped rows are never read
    masked = run_sparse(garbage, labels, ids, top, rest, tau, vocab, grads, loss_mask=mask.float())
    for got, want in zip(masked, full):
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-12, atol=1e-14)
        assert (got[~mask] == 0).all()
    nothing = run_sparse(student, labels, ids, top, rest, tau, vocab, grads, loss_mask=torch.zeros(lead))
    assert all((x == 0).all() for x in nothing)


# (τ, width, vocab, K, dtype, masked): padding on rank 1, a rank 1 of padding only, τ ≠ 1 (wider SUM), fp32
TP_CASES = [(1.0, 24, 21, 4, torch.float64, False), (2.0, 24, 21, 7, torch.float64, True),
            (0.5, 24, 10, 3, torch.float64, False), (1.0, 24, None, 24, torch.float64, False),
            (2.0, 24, 21, 4, torch.float32, True)]


def _tp_inputs(case):
    tau, width, vocab, k, dtype, masked = case
    lead = (3, 4)
    student, labels, ids, top, rest = make_case(lead, width, vocab, k, tau, seed=20, shuffle=k == (vocab or width))
    mask = (torch.arange(12).view(lead) % 5 != 2) if masked else None
    return student.to(dtype), labels, ids, top, rest, mask, upstream(lead)


def _tp_worker(rank, world_size, cases):
    torch.distributed.init_process_group("gloo")
    results = []
    for case in cases:
        student, labels, ids, top, rest, mask, grads = _tp_inputs(case)
        w = student.shape[-1] // world_size
        with CountingAllReduce() as counter:
            got = run_sparse(student[..., rank * w:(rank + 1) * w], labels, ids, top, rest, case[0], case[2], grads,
                             tp_group=torch.distributed.group.WORLD, loss_mask=mask)
        results.append((got, [shape for _, shape in counter.calls]))
    return results


def test_tp2_matches_tp1_in_exactly_two_collectives():
    per_rank = run_workers(_tp_worker, 2, TP_CASES)
    for i, case in enumerate(TP_CASES):
        tau, width, vocab, _, dtype, _ = case
        student, labels, ids, top, rest, mask, grads = _tp_inputs(case)
        kd, ce, grad = run_sparse(student, labels, ids, top, rest, tau, vocab, grads, loss_mask=mask)
        tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
        kept = 12 if mask is None else int(mask.sum())
        for rank, results in enumerate(per_rank):
            (r_kd, r_ce, r_grad), calls = results[i]
            torch.testing.assert_close(r_kd, kd, **tol)
            torch.testing.assert_close(r_ce, ce, **tol)
            torch.testing.assert_close(r_grad, grad[..., rank * 12:(rank + 1) * 12], **tol)
            assert calls == [(kept, 2), (kept, 4 if tau == 1.0 else 6)]


def test_bad_arguments_raise_value_errors():
    lead, width, vocab, k = (2, 3), 12, 10, 4
    student, labels, ids, top, rest = make_case(lead, width, vocab, k, 1.0)
    ok = dict(student_logits=student, labels=labels, topk_ids=ids, topk_logprobs=top, rest_logprob=rest)
    too_many = torch.arange(11).expand(*lead, 11)
    bad = [dict(topk_ids=too_many, topk_logprobs=torch.zeros(*lead, 11)),  # K > vocab_size
           dict(topk_ids=ids[..., :0], topk_logprobs=top[..., :0]),  # K = 0
           dict(topk_logprobs=top[..., :3]), dict(rest_logprob=rest[0]), dict(labels=labels[0]),
           dict(topk_ids=ids[0]), dict(student_logits=student[0]), dict(topk_ids=ids.float()),
           dict(loss_mask=torch.ones(3, 2))]
    for change in bad:
        with pytest.raises(ValueError):
            sparse_kd_and_cross_entropy(**{**ok, **change}, vocab_size=vocab)
    with pytest.raises(ValueError):
        sparse_kd_and_cross_entropy(**ok, vocab_size=vocab, temperature=0.0)
    with pytest.raises(ValueError):
        sparse_kd_and_cross_entropy(**ok, vocab_size=width + 1)
