"""The vocab-parallel KL at TP = 2 and 4 (gloo processes; each rank holds a vocabulary shard) against the float64
reference on the gathered vocabulary: identical on every rank, exactly two collectives, the right gradient shard.
The PyTorch kernels and the fused ones, padding on the last rank(s), masks, -inf and ±1e4 logits."""

from __future__ import annotations

import pytest
import torch

from salt_megatron.kd import vocab_parallel_kl_div
from salt_megatron.kd.reference import reference_grad, reference_kl
from tests.dist_utils import run_workers
from tests.kd_cases import TWO_COLLECTIVES, CountingAllReduce, fused_kernels_on, grad_tol, make_logits, same_in_dtype


def _torch_worker(rank, world_size, student, teacher, vocab_size, tau, dtype, mask):
    torch.distributed.init_process_group("gloo")
    w = student.shape[-1] // world_size
    cols = slice(rank * w, (rank + 1) * w)
    x = student[..., cols].to(dtype).clone().requires_grad_(True)
    with CountingAllReduce() as counted:
        kl = vocab_parallel_kl_div(x, teacher[..., cols].to(dtype), temperature=tau, vocab_size=vocab_size,
                                   tp_group=torch.distributed.group.WORLD, loss_mask=mask, impl="torch")
        kl.backward(torch.ones_like(kl))
    return kl.detach(), x.grad.double(), counted.ops


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_kernels_match_the_gathered_reference(tp, dtype):
    shape, vocab_size, tau = (3, 4, 24), 21, 1.5  # padding lands on the last rank(s)
    student, teacher = make_logits(shape, 0), make_logits(shape, 1)
    student[0, 0] = 1e4
    teacher[1, 2, :3] = float("-inf")
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[2, 1] = False
    results = run_workers(_torch_worker, tp, student, teacher, vocab_size, tau, dtype, mask)
    rounded_s, rounded_t = student.to(dtype), teacher.to(dtype)
    ref = reference_kl(rounded_s, rounded_t, tau, vocab_size) * mask
    ref_grad = reference_grad(rounded_s, rounded_t, tau, vocab_size, grad_out=mask.double())
    w = shape[-1] // tp
    for rank, (kl, grad, ops) in enumerate(results):
        torch.testing.assert_close(kl, results[0][0], rtol=0, atol=0)  # identical on every rank
        torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(grad, ref_grad[..., rank * w:(rank + 1) * w], rtol=tol, atol=tol)
        assert ops == TWO_COLLECTIVES


TP_CASES = [  # (shape, vocab_size, tau, dtype, masked)
    ((3, 4, 2052), 2000, 1.5, torch.float32, True),
    ((2, 3, 2052), 2049, 1.0, torch.bfloat16, False),
    ((5, 1028), 1025, 0.8, torch.float16, True),
    ((2, 2052), None, 1.0, torch.float32, False),
]


def tp_inputs(case_id):
    shape, vocab_size, tau, dtype, masked = TP_CASES[case_id]
    s, t = make_logits(shape, 10 + case_id), make_logits(shape, 20 + case_id)
    s.view(-1, shape[-1])[0, 3] = 1e4  # a huge logit on rank 0's shard
    t.view(-1, shape[-1])[1, : shape[-1] // 2 + 5] = float("-inf")  # teacher mass only on the later shards
    mask = None
    if masked:
        mask = torch.ones(shape[:-1], dtype=torch.bool)
        mask.view(-1)[1] = False
    return s.to(dtype), t.to(dtype), vocab_size, tau, mask


def _each_case_on_this_shard(rank, world_size, num_cases, inputs, run):
    """For every case and both kernel sets: ``run(inputs(case), cols, impl)`` on this rank's vocabulary columns
    (``inputs`` gives the full logits first), with the all-reduces it made appended to what it returns."""
    torch.distributed.init_process_group("gloo")
    results = []
    for case_id in range(num_cases):
        case = inputs(case_id)
        w = case[0].shape[-1] // world_size
        cols = slice(rank * w, (rank + 1) * w)
        out = {}
        for impl in ("fused", "torch"):
            with CountingAllReduce() as counted:
                value = run(case, cols, impl)
            out[impl] = (*value, counted.ops)
        results.append(out)
    return results


def _kl_on_shard(case, cols, impl):
    s, t, vocab_size, tau, mask = case
    x = s[..., cols].clone().requires_grad_(True)
    kl = vocab_parallel_kl_div(x, t[..., cols].clone(), temperature=tau, vocab_size=vocab_size,
                               tp_group=torch.distributed.group.WORLD, loss_mask=mask, impl=impl)
    kl.backward(torch.ones_like(kl))
    return kl.detach(), x.grad


def _fused_and_torch_worker(rank, world_size):
    return _each_case_on_this_shard(rank, world_size, len(TP_CASES), tp_inputs, _kl_on_shard)


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_vs_torch_vs_float64(tp):
    fused_kernels_on("cpu")
    results = run_workers(_fused_and_torch_worker, tp)
    for case_id, (shape, vocab_size, tau, dtype, masked) in enumerate(TP_CASES):
        s, t, vocab_size, tau, mask = tp_inputs(case_id)
        keep = torch.ones(shape[:-1], dtype=torch.float64) if mask is None else mask.double()
        ref = reference_kl(s, t, tau, vocab_size) * keep
        ref_grad = reference_grad(s, t, tau, vocab_size, grad_out=keep)
        w = shape[-1] // tp
        for rank in range(tp):
            kl_f, grad_f, calls_f = results[rank][case_id]["fused"]
            kl_t, grad_t, calls_t = results[rank][case_id]["torch"]
            assert calls_f == TWO_COLLECTIVES and calls_t == TWO_COLLECTIVES, (calls_f, calls_t)
            torch.testing.assert_close(kl_f, results[0][case_id]["fused"][0], rtol=0, atol=0)  # same on all ranks
            torch.testing.assert_close(kl_f.double(), ref, rtol=2e-5, atol=1e-4)
            torch.testing.assert_close(kl_t.double(), ref, rtol=2e-5, atol=1e-4)
            torch.testing.assert_close(kl_f, kl_t, rtol=2e-5, atol=1e-4)
            shard_ref = ref_grad[..., rank * w:(rank + 1) * w]
            assert grad_f.dtype == dtype
            torch.testing.assert_close(grad_f.double(), shard_ref, **grad_tol(dtype, shard_ref))
            same_in_dtype(grad_f, grad_t, dtype)


ONE_PASS_CASES = [  # (vocab_size, tau, dtype): the SALT loss's one pass for CE and KD, on a 48-column vocabulary
    (45, 1.0, torch.float32),  # padding on the last rank, τ = 1: CE's softmax has columns KD's has not
    (None, 1.5, torch.float32),  # τ ≠ 1: CE's sum comes from the kernels' with_ce_sum
    (41, 0.8, torch.bfloat16),
    (30, 1.3, torch.float32),  # at TP = 4 the last rank holds padding only
]


def one_pass_inputs(case_id):
    vocab_size, tau, dtype = ONE_PASS_CASES[case_id]
    shape = (3, 4, 48)
    s, t = make_logits(shape, 30 + case_id), make_logits(shape, 40 + case_id)
    s[0, 0, 5] = 1e4  # a huge logit on rank 0's shard
    s[1, 1, 47] = 25.0  # the last column: padding above every real logit where the vocabulary is padded
    t[2, 0, :20] = float("-inf")
    labels = torch.randint(0, vocab_size or 48, shape[:-1], generator=torch.Generator().manual_seed(case_id))
    mask = torch.ones(shape[:-1])
    mask[2, 3] = 0
    return s.to(dtype), t.to(dtype), labels, mask, vocab_size, tau


def _salt_loss_on_shard(case, cols, impl):
    from salt_megatron.kd import salt_loss

    s, t, labels, mask, vocab_size, tau = case
    x = s[..., cols].clone().requires_grad_(True)
    loss = salt_loss(x, labels, t[..., cols].clone(), kd_weight=0.6, temperature=tau, loss_mask=mask,
                     vocab_size=vocab_size, tp_group=torch.distributed.group.WORLD, impl=impl)
    loss.loss.backward()
    return loss.loss.detach(), loss.ce, loss.kd, x.grad


def _one_pass_worker(rank, world_size):
    return _each_case_on_this_shard(rank, world_size, len(ONE_PASS_CASES), one_pass_inputs, _salt_loss_on_shard)


@pytest.mark.parametrize("tp", [2, 4])
def test_one_pass_ce_and_kd_match_the_float64_reference(tp):
    """salt_loss at TP > 1 takes CE from the KD pass (any τ, padding, a shard of padding only): loss, CE, KD and
    the gradient shard equal the float64 reference on the gathered vocabulary (CE over every column, as
    megatron-core's), the same on every rank, in exactly the KD's two collectives."""
    fused_kernels_on("cpu")
    from tests.kd_cases import reference_salt_loss

    results = run_workers(_one_pass_worker, tp)
    for case_id, (_, _, dtype) in enumerate(ONE_PASS_CASES):
        s, t, labels, mask, vocab_size, tau = one_pass_inputs(case_id)
        want = reference_salt_loss(s, t, labels, mask, 0.6, tau, vocab_size)
        w = s.shape[-1] // tp
        for rank in range(tp):
            for impl in ("fused", "torch"):
                loss, ce, kd, grad, ops = results[rank][case_id][impl]
                assert ops == TWO_COLLECTIVES, (case_id, impl, ops)
                assert loss == results[0][case_id][impl][0]  # identical on every rank
                for got, expect in zip((loss, ce, kd), want[:3]):
                    torch.testing.assert_close(got.double(), expect, rtol=2e-5, atol=1e-5)
                shard_ref = want[3][..., rank * w:(rank + 1) * w]
                assert grad.dtype == dtype
                torch.testing.assert_close(grad.double(), shard_ref, **grad_tol(dtype, shard_ref))
