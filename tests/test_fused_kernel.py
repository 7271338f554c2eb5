"""The fused KL kernels (csrc/, salt_megatron.fused) against the PyTorch kernels and a float64 reference.

CPU: fused vs ``impl="torch"`` vs float64 on the gathered vocabulary, TP = 1/2/4 (gloo processes), fp32/bf16/fp16,
extreme rows, padding columns, loss masks, empty batches, gradients.  CUDA: the same on the GPU when one is
there (skipped otherwise), and the .cu file compiled with ``nvcc -c`` for sm_80 and sm_90 whenever nvcc is found.
Nothing here needs megatron-core.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from salt_megatron import fused
from salt_megatron.kd_loss import (
    TORCH_KERNELS,
    local_row_stats,
    local_student_grad,
    salt_loss,
    vocab_parallel_kl_div,
)
from tests.dist_utils import run_workers
from tests.test_kd_loss import check_one_pass_equals_separate

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------


def reference_kl(student, teacher, temperature=1.0, vocab_size=None):
    """KL(softmax(t/τ) ‖ softmax(s/τ)) in float64 on the full vocabulary, padding columns dropped."""
    s = student.double()[..., :vocab_size] / temperature
    t = teacher.double()[..., :vocab_size] / temperature
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def reference_grad(student, teacher, temperature=1.0, vocab_size=None, grad_out=None):
    """d KL / d student in float64, zero on padding columns: (softmax(s/τ) - softmax(t/τ))/τ · grad_out."""
    s = student.double()[..., :vocab_size] / temperature
    t = teacher.double()[..., :vocab_size] / temperature
    g = (F.softmax(s, -1) - F.softmax(t, -1)) / temperature
    if grad_out is not None:
        g = g * grad_out.double()[..., None]
    full = torch.zeros(student.shape, dtype=torch.float64)
    full[..., : g.shape[-1]] = g
    return full


def make_logits(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def run(impl, student, teacher, grad_out=None, device="cpu", **kwargs):
    """KL and the student's gradient through vocab_parallel_kl_div with ``impl``."""
    x = student.to(device).clone().requires_grad_(True)
    kl = vocab_parallel_kl_div(x, teacher.to(device), impl=impl, **kwargs)
    kl.backward(torch.ones_like(kl) if grad_out is None else grad_out.to(device=device, dtype=kl.dtype))
    return kl.detach().cpu(), x.grad.cpu()


def grad_tol(dtype, ref_grad):
    """Gradient tolerance: fp32 math in both paths; bf16/fp16 output rounding dominates for those."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-6)
    scale = max(1.0, ref_grad.abs().max().item())
    return dict(rtol=1e-2, atol=1e-2 * scale)


def same_in_dtype(a, b, dtype):
    """Fused and torch gradients agree to the rounding of one fp32 op before the cast (1-2 ulps of dtype)."""
    ulp = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=ulp, atol=ulp * max(1e-3, b.abs().max().item()))


# ---------------------------------------------------------------------------------------------------------------
# The CPU kernel is built (pip install -e . or the JIT fallback)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    if not fused.cpu_kernel_available():
        reason = fused.kernel_status()["cpu"]
        if os.environ.get("SALT_MEGATRON_BUILD_EXT") == "0" or os.environ.get("SALT_MEGATRON_NO_JIT") == "1":
            pytest.skip(f"fused CPU kernel turned off: {reason}")
        pytest.fail(f"the fused CPU kernel should build here: {reason}")
    return fused.kernels_for("cpu", required=True)


def test_kernel_selection():
    k = fused.kernels_for("cpu", required=True)
    assert k.name == "fused-cpu" and k.supports_row_index
    assert fused.kernels_for(torch.device("cpu")) is k  # cached
    assert fused.kernels_for("meta") is None
    with pytest.raises(RuntimeError, match="meta"):
        fused.kernels_for("meta", required=True)
    import salt_megatron.kd_loss as kd

    assert kd._select_kernels("auto", torch.device("cpu")) is k  # "auto" takes the built kernel
    assert kd._select_kernels("torch", torch.device("cpu")) is TORCH_KERNELS


def test_unavailable_kernel_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(fused, "_loaded", {"cpu": (None, "no compiler (test)")})
    monkeypatch.setattr(fused, "_kernels", {})
    assert fused.kernels_for("cpu") is None
    assert vocab_parallel_kl_div(torch.zeros(2, 4), torch.zeros(2, 4), impl="auto").shape == (2,)  # PyTorch path
    with pytest.raises(RuntimeError, match="(?s)no compiler.*pip install --no-build-isolation -e"):
        vocab_parallel_kl_div(torch.zeros(2, 4), torch.zeros(2, 4), impl="fused")


def test_stale_installed_extension_is_refused(monkeypatch):
    module, how = fused._import_installed("cpu")
    if module is None:
        pytest.skip(f"no installed CPU extension: {how}")
    assert module.CONTRACT_VERSION == fused.CONTRACT_VERSION
    monkeypatch.setattr(fused, "CONTRACT_VERSION", fused.CONTRACT_VERSION + 1)
    module, how = fused._import_installed("cpu")
    assert module is None and "stale" in how


# ---------------------------------------------------------------------------------------------------------------
# TP = 1
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 50), (3, 5, 64), (1, 1), (33, 1000), (4, 5000)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_single_shard_fused_vs_torch_vs_float64(dtype, shape, temperature):
    s64, t64 = make_logits(shape, 0), make_logits(shape, 1)
    s, t = s64.to(dtype), t64.to(dtype)
    g = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kl_f, grad_f = run("fused", s, t, g, temperature=temperature)
    kl_t, grad_t = run("torch", s, t, g, temperature=temperature)
    assert kl_f.dtype == torch.float32 and kl_f.shape == shape[:-1] and grad_f.dtype == dtype
    ref = reference_kl(s, t, temperature)  # the reference sees exactly the (rounded) inputs
    torch.testing.assert_close(kl_f.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_f, kl_t, rtol=1e-4, atol=1e-5)
    ref_grad = reference_grad(s, t, temperature, grad_out=g)
    torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))
    same_in_dtype(grad_f, grad_t, dtype)


def extreme_rows(v=4099):
    """Rows that break naive kernels; v > the CPU kernel's chunk (1024) so maxima move between chunks."""
    s, t = make_logits((10, v), 3), make_logits((10, v), 4)
    s[0], t[0] = 1e4 * torch.sign(s[0]), -1e4 * torch.sign(t[0])  # ±1e4 logits
    s[1], t[1] = s[1] * 3e3, t[1] * 3e3  # large spread, maxima in the middle of the row
    t[2, ::3] = float("-inf")  # teacher assigns zero probability somewhere
    s[3, :1500] = float("-inf")
    t[3, :1500] = float("-inf")  # both -inf at the same columns, across a whole first chunk
    s[4], t[4] = 2.5, 2.5  # all-equal rows: KL exactly 0
    s[5] = 0.0  # uniform student
    t[6] = float("-inf")
    t[6, 3000] = 5.0  # one-hot teacher, its mass in a late chunk
    s[7] = torch.arange(v, dtype=torch.float64) * 0.01  # increasing: the running max grows every chunk
    t[7] = -torch.arange(v, dtype=torch.float64) * 0.01
    t[8] = -1e4
    t[8, 2000] = 1e4  # teacher mass underflows to 0 everywhere but one column...
    s[8, :100] = float("-inf")  # ... where the student is finite: KL finite
    s[9, 1000:1100] = -3e4  # far below the max, exp underflows to 0
    return s, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_extreme_rows(dtype, temperature):
    s64, t64 = extreme_rows()
    if dtype == torch.float16:  # ±1e4 and -3e4 are finite in fp16; 3e3·randn is not: clip to its range
        s64, t64 = s64.clamp(min=-6e4, max=6e4), t64.clamp(min=-6e4, max=6e4)
    s, t = s64.to(dtype), t64.to(dtype)
    kl_f, grad_f = run("fused", s, t, temperature=temperature)
    kl_t, grad_t = run("torch", s, t, temperature=temperature)
    ref = reference_kl(s, t, temperature)
    assert torch.isfinite(kl_f).all() and torch.isfinite(grad_f).all()
    torch.testing.assert_close(kl_f.double(), ref, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(kl_f, kl_t, rtol=2e-5, atol=1e-4)
    assert kl_f[4].item() == pytest.approx(0.0, abs=1e-7)
    ref_grad = reference_grad(s, t, temperature)
    torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))
    same_in_dtype(grad_f, grad_t, dtype)


def test_student_minus_inf_where_teacher_has_mass_is_infinite():
    s, t = torch.zeros(2, 3000), torch.zeros(2, 3000)
    s[0, 1] = float("-inf")
    s[1, 2500] = float("-inf")  # in a later chunk
    kl_f, grad_f = run("fused", s, t)
    kl_t, grad_t = run("torch", s, t)
    assert torch.isinf(kl_f).all() and torch.isinf(kl_t).all()
    torch.testing.assert_close(grad_f, grad_t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_columns_and_loss_mask(dtype):
    shape, vocab_size, tau = (6, 3, 1030), 1000, 1.3
    s, t = make_logits(shape, 5).to(dtype), make_logits(shape, 6).to(dtype)
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[0, 1] = mask[3, :] = mask[5, 2] = False
    g = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kw = dict(temperature=tau, vocab_size=vocab_size, loss_mask=mask)
    kl_f, grad_f = run("fused", s, t, g, **kw)
    kl_t, grad_t = run("torch", s, t, g, **kw)
    ref = reference_kl(s, t, tau, vocab_size) * mask
    torch.testing.assert_close(kl_f.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_f, kl_t, rtol=1e-4, atol=1e-5)
    assert torch.all(kl_f[~mask] == 0) and torch.all(grad_f[~mask] == 0)
    assert torch.all(grad_f[..., vocab_size:] == 0)
    ref_grad = reference_grad(s, t, tau, vocab_size, grad_out=g * mask)
    torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))
    same_in_dtype(grad_f, grad_t, dtype)


def test_mask_all_and_none():
    s, t = make_logits((4, 300), 0).float(), make_logits((4, 300), 1).float()
    none = torch.zeros(4, dtype=torch.bool)
    kl, grad = run("fused", s, t, loss_mask=none)
    assert torch.all(kl == 0) and torch.all(grad == 0)
    kl_all, grad_all = run("fused", s, t, loss_mask=torch.ones(4, dtype=torch.bool))
    kl_plain, grad_plain = run("fused", s, t)
    torch.testing.assert_close(kl_all, kl_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad_all, grad_plain, rtol=0, atol=0)


@pytest.mark.parametrize("width", [0, 32])
def test_empty_batch_and_empty_shard(width):
    s = torch.zeros(0, 32, requires_grad=True)
    kl = vocab_parallel_kl_div(s, torch.zeros(0, 32), impl="fused")
    assert kl.shape == (0,)
    kl.sum().backward()
    assert s.grad.shape == (0, 32)
    # a shard of padding only (w = 0 valid columns) through the kernel itself: -inf maxima, zero sums
    k = fused.kernels_for("cpu", required=True)
    stats = k.row_stats(torch.zeros(3, width)[:, :0], torch.zeros(3, width)[:, :0], 1.0)
    assert stats.shape == (3, 5)
    assert torch.all(stats[:, (0, 2)] == float("-inf")) and torch.all(stats[:, (1, 3, 4)] == 0)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16)])
def test_mixed_student_and_teacher_dtypes(dtypes):
    s, t = make_logits((5, 700), 0).to(dtypes[0]), make_logits((5, 700), 1).to(dtypes[1])
    kl_f, grad_f = run("fused", s, t, temperature=1.5)
    kl_t, grad_t = run("torch", s, t, temperature=1.5)
    torch.testing.assert_close(kl_f.double(), reference_kl(s, t, 1.5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_f, kl_t, rtol=1e-4, atol=1e-5)
    assert grad_f.dtype == dtypes[0]
    same_in_dtype(grad_f, grad_t, dtypes[0])


def test_kernels_on_strided_views_with_row_index():
    """The kernel contract: non-contiguous [:, :w] views, row_index reads rows in place, out rows outside untouched."""
    k = fused.kernels_for("cpu", required=True)
    base_s, base_t = make_logits((9, 130), 0).float(), make_logits((9, 130), 1).float()
    s, t = base_s[:, :100], base_t[:, :100]
    assert not s.is_contiguous()
    idx = torch.tensor([7, 0, 3, 3])
    stats = k.row_stats(s, t, 0.8, row_index=idx)
    torch.testing.assert_close(stats, local_row_stats(s[idx], t[idx], 0.8), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(k.row_stats(s, t, 0.8), local_row_stats(s, t, 0.8), rtol=2e-6, atol=1e-6)
    vec = [torch.rand(4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    out = torch.full((9, 130), 7.0)
    k.student_grad(s, t, *(v[:3] for v in vec), 0.8, out[:, :100], row_index=idx[:3])
    expect = torch.full((9, 130), 7.0)
    part = torch.empty(3, 100)
    TORCH_KERNELS.student_grad(s[idx[:3]], t[idx[:3]], *(v[:3] for v in vec), 0.8, part)
    expect[idx[:3], :100] = part
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="out of range"):
        k.row_stats(s, t, 1.0, row_index=torch.tensor([9]))


def split_grad_inputs(rows, width, seed, dtype, device):
    """Strided [:, :width] student/teacher views and two different (signed) row weights g, g_t."""
    base_s, base_t = make_logits((rows, width + 24), seed), make_logits((rows, width + 24), seed + 1)
    base_t[1, ::5] = float("-inf")  # teacher probability 0 in places: p·g_t = 0 there
    base_s[2, 0] = 1e4  # one huge student logit: q = 1 there, 0 elsewhere
    s = base_s.to(dtype=dtype, device=device)[:, :width]
    t = base_t.to(dtype=dtype, device=device)[:, :width]
    gen = torch.Generator().manual_seed(seed + 2)
    g = (torch.rand(rows, generator=gen) * 2 - 1).to(device)  # signed, as CE + KD weights can be
    g_t = (torch.rand(rows, generator=gen) * 2 - 1).to(device)
    return s, t, g, g_t


def split_grad_row_stats(s, t, tau):
    """Global max and log-sum-exp of s/τ and t/τ per row (fp32), as the forward would give them."""
    out = []
    for x in (s, t):
        x = x.float()
        m = x.amax(-1)
        out += [m, torch.logsumexp((x - m[:, None]) / tau, -1)]
    return out


def check_split_grad(kernels, device, dtype, with_index, tau=1.3, rows=9, width=1030):
    """kernels.student_grad with teacher_grad_rows against local_student_grad (the PyTorch reference), with and
    without row_index; rows outside row_index untouched; teacher_grad_rows=None is the KL gradient."""
    s, t, g, g_t = split_grad_inputs(rows, width, 40, dtype, device)
    idx = torch.tensor([7, 0, 3, 8, 2], device=device) if with_index else None
    s_sel, t_sel = (s, t) if idx is None else (s.index_select(0, idx), t.index_select(0, idx))
    stats = split_grad_row_stats(s_sel, t_sel, tau)
    m = s_sel.shape[0]
    g, g_t = g[:m], g_t[:m]
    ref = torch.empty(m, width, dtype=dtype, device=device)
    local_student_grad(s_sel, t_sel, *stats, g, tau, ref, teacher_grad_rows=g_t)
    ref_kl = torch.empty_like(ref)
    local_student_grad(s_sel, t_sel, *stats, g, tau, ref_kl)

    def close(got, expect):
        if device == "cpu" or dtype != torch.float32:
            same_in_dtype(got.cpu(), expect.cpu(), dtype)
        else:  # the GPU's ex2.approx (about 2^-22 relative) against torch's exp
            torch.testing.assert_close(got.double().cpu(), expect.double().cpu(), rtol=1e-5,
                                       atol=1e-5 * max(1e-3, expect.abs().max().item()))

    for tgr, expect_rows in ((g_t, ref), (None, ref_kl), (g.clone(), ref_kl)):
        sentinel = 7.0
        out_base = torch.full((rows, width + 24), sentinel, dtype=dtype, device=device)
        kernels.student_grad(s, t, *stats, g, tau, out_base[:, :width], row_index=idx, teacher_grad_rows=tgr)
        assert torch.isfinite(out_base).all()
        close(out_base[:, :width] if idx is None else out_base[idx, :width], expect_rows)
        assert torch.all(out_base[:, width:] == sentinel)  # columns past the view are not touched
        if idx is not None:  # nor are rows not listed
            untouched = torch.ones(rows, dtype=torch.bool, device=device)
            untouched[idx] = False
            assert torch.all(out_base[untouched] == sentinel)
    # the weights apart really matter: g_t != g gives another gradient than the KL one
    assert not torch.allclose(ref.double(), ref_kl.double())
    # a teacher_grad_rows of another dtype, expanded from a scalar (the binding makes it fp32 and contiguous)
    half = torch.tensor(0.5, dtype=torch.float64, device=device).expand(m)
    out = torch.zeros(rows, width, dtype=dtype, device=device)
    kernels.student_grad(s, t, *stats, g, tau, out, row_index=idx, teacher_grad_rows=half)
    expect_half = torch.empty(m, width, dtype=dtype, device=device)
    local_student_grad(s_sel, t_sel, *stats, g, tau, expect_half, teacher_grad_rows=half.float())
    close(out if idx is None else out.index_select(0, idx), expect_half)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
def test_split_grad_teacher_grad_rows(dtype, with_index):
    """The CPU kernel weights the student and teacher terms apart: (q·g - p·g_t)/τ, as local_student_grad."""
    check_split_grad(fused.kernels_for("cpu", required=True), "cpu", dtype, with_index)


def test_float64_goes_to_the_pytorch_kernels():
    s, t = make_logits((3, 40), 0), make_logits((3, 40), 1)
    kl_f, grad_f = run("fused", s, t, temperature=0.9, loss_mask=torch.tensor([True, False, True]))
    kl_t, grad_t = run("torch", s, t, temperature=0.9, loss_mask=torch.tensor([True, False, True]))
    assert kl_f.dtype == torch.float64
    torch.testing.assert_close(kl_f, kl_t, rtol=0, atol=0)
    torch.testing.assert_close(grad_f, grad_t, rtol=0, atol=0)
    x = s[:, :7].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_kl_div(a, t[:, :7], impl="fused"), (x,))


def test_threads_do_not_change_results():
    s, t = make_logits((64, 2000), 0).float(), make_logits((64, 2000), 1).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("fused", s, t)
        torch.set_num_threads(max(2, before))
        many = run("fused", s, t)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# TP = 2 and 4: gloo processes, the kernels see vocab shards; exactly two collectives
# ---------------------------------------------------------------------------------------------------------------

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


def _tp_worker(rank, world_size):
    torch.distributed.init_process_group("gloo")
    group = torch.distributed.group.WORLD
    calls = []
    real_all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        calls.append(str(op))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    torch.distributed.all_reduce = counting_all_reduce
    results = []
    try:
        for case_id in range(len(TP_CASES)):
            s, t, vocab_size, tau, mask = tp_inputs(case_id)
            w = s.shape[-1] // world_size
            cols = slice(rank * w, (rank + 1) * w)
            out = {}
            for impl in ("fused", "torch"):
                calls.clear()
                x = s[..., cols].clone().requires_grad_(True)
                kl = vocab_parallel_kl_div(x, t[..., cols].clone(), temperature=tau, vocab_size=vocab_size,
                                           tp_group=group, loss_mask=mask, impl=impl)
                kl.backward(torch.ones_like(kl))
                out[impl] = (kl.detach(), x.grad, list(calls))
            results.append(out)
    finally:
        torch.distributed.all_reduce = real_all_reduce
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_fused_vs_torch_vs_float64(tp):
    results = run_workers(_tp_worker, tp)
    two = [str(torch.distributed.ReduceOp.MAX), str(torch.distributed.ReduceOp.SUM)]
    for case_id, (shape, vocab_size, tau, dtype, masked) in enumerate(TP_CASES):
        s, t, vocab_size, tau, mask = tp_inputs(case_id)
        keep = torch.ones(shape[:-1], dtype=torch.float64) if mask is None else mask.double()
        ref = reference_kl(s, t, tau, vocab_size) * keep
        ref_grad = reference_grad(s, t, tau, vocab_size, grad_out=keep)
        w = shape[-1] // tp
        for rank in range(tp):
            kl_f, grad_f, calls_f = results[rank][case_id]["fused"]
            kl_t, grad_t, calls_t = results[rank][case_id]["torch"]
            assert calls_f == two and calls_t == two, (calls_f, calls_t)
            torch.testing.assert_close(kl_f, results[0][case_id]["fused"][0], rtol=0, atol=0)  # same on all ranks
            torch.testing.assert_close(kl_f.double(), ref, rtol=2e-5, atol=1e-4)
            torch.testing.assert_close(kl_t.double(), ref, rtol=2e-5, atol=1e-4)
            torch.testing.assert_close(kl_f, kl_t, rtol=2e-5, atol=1e-4)
            shard_ref = ref_grad[..., rank * w:(rank + 1) * w]
            assert grad_f.dtype == dtype
            torch.testing.assert_close(grad_f.double(), shard_ref, **grad_tol(dtype, shard_ref))
            same_in_dtype(grad_f, grad_t, dtype)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not fused.cuda_kernel_available():
        reason = fused.kernel_status()["cuda"]
        if os.environ.get("SALT_MEGATRON_BUILD_CUDA") == "0":
            pytest.skip(f"CUDA kernel turned off: {reason}")
        pytest.fail(f"a GPU is here but the fused CUDA kernel is not: {reason}")
    return fused.kernels_for("cuda", required=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 50), (33, 1000), (4, 32768), (2, 262144), (16, 1001)])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_cuda_fused_vs_torch_vs_float64(cuda_kernel, dtype, shape, temperature):
    s, t = make_logits(shape, 0).to(dtype), make_logits(shape, 1).to(dtype)
    g = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kl_f, grad_f = run("fused", s, t, g, device="cuda", temperature=temperature)
    kl_t, grad_t = run("torch", s, t, g, device="cuda", temperature=temperature)
    assert grad_f.dtype == dtype
    ref = reference_kl(s, t, temperature)
    torch.testing.assert_close(kl_f.double(), ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(kl_f, kl_t, rtol=1e-4, atol=2e-5)
    ref_grad = reference_grad(s, t, temperature, grad_out=g)
    torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_extreme_rows_padding_and_mask(cuda_kernel, dtype):
    s64, t64 = extreme_rows(4100)
    if dtype == torch.float16:
        s64, t64 = s64.clamp(min=-6e4, max=6e4), t64.clamp(min=-6e4, max=6e4)
    s, t = s64.to(dtype), t64.to(dtype)
    for kw in (dict(temperature=1.5), dict(temperature=1.0, vocab_size=4001),
               dict(loss_mask=torch.arange(10) % 3 != 1)):
        kl_f, grad_f = run("fused", s, t, device="cuda", **{k: v.cuda() if torch.is_tensor(v) else v
                                                              for k, v in kw.items()})
        tau, vocab = kw.get("temperature", 1.0), kw.get("vocab_size")
        keep = kw["loss_mask"].double() if "loss_mask" in kw else torch.ones(10, dtype=torch.float64)
        ref = reference_kl(s, t, tau, vocab) * keep
        assert torch.isfinite(kl_f).all() and torch.isfinite(grad_f).all()
        torch.testing.assert_close(kl_f.double(), ref, rtol=1e-4, atol=1e-3)
        ref_grad = reference_grad(s, t, tau, vocab, grad_out=keep)
        torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))


def test_cuda_mixed_dtypes_views_and_empty(cuda_kernel):
    k = cuda_kernel
    s, t = make_logits((6, 1030), 0).cuda(), make_logits((6, 1030), 1).cuda()
    sv, tv = s.to(torch.bfloat16)[:, :1000], t.float()[:, :1000]  # strided views, mixed dtypes
    idx = torch.tensor([5, 1, 1], device="cuda")
    stats = k.row_stats(sv, tv, 1.3, row_index=idx)
    torch.testing.assert_close(stats, local_row_stats(sv[idx], tv[idx], 1.3), rtol=1e-5, atol=1e-5)
    empty = k.row_stats(sv[:, :0], tv[:, :0], 1.0)
    assert torch.all(empty[:, (0, 2)] == float("-inf")) and torch.all(empty[:, (1, 3, 4)] == 0)
    x = torch.zeros(0, 64, device="cuda", requires_grad=True)
    kl = vocab_parallel_kl_div(x, torch.zeros(0, 64, device="cuda"), impl="fused")
    kl.sum().backward()
    assert kl.shape == (0,) and x.grad.shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
def test_cuda_split_grad_teacher_grad_rows(cuda_kernel, dtype, with_index):
    """The CUDA kernel's teacher_grad_rows, (q·g - p·g_t)/τ, against local_student_grad (the PyTorch reference)."""
    assert cuda_kernel.supports_split_grad
    check_split_grad(cuda_kernel, "cuda", dtype, with_index)
    # a long row (the vectorised path over many groups per thread) and an odd width (the scalar tail)
    for width in (32768, 1001):
        check_split_grad(cuda_kernel, "cuda", dtype, with_index, tau=1.0, rows=9, width=width)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("omega", [0.3, 1.0])
def test_cuda_salt_loss_one_pass_ce_and_kd_equals_the_separate_terms(monkeypatch, cuda_kernel, dtype, omega):
    """On a GPU at τ = 1, salt_loss takes CE from the KD pass through the CUDA kernel's teacher_grad_rows; loss,
    CE, KD and the gradient must equal CE (F.cross_entropy) + KD computed apart (_FUSE_CE_WITH_KD = False)."""
    b, s_len, v = 3, 7, 1030
    student = make_logits((b, s_len, v), 0)
    teacher = make_logits((b, s_len, v), 1)
    student[0, 0, :5] = 1e4  # extreme logits on one row
    teacher[1, 2, ::4] = float("-inf")
    student, teacher = student.to(dtype=dtype, device="cuda"), teacher.to(dtype=dtype, device="cuda")
    labels = torch.randint(0, v, (b, s_len), generator=torch.Generator().manual_seed(2)).cuda()
    mask = torch.ones(b, s_len, device="cuda")
    mask[2, 4:] = 0

    def no_pytorch_fallback(*a, **k):
        raise AssertionError("the CUDA kernel should write this gradient, not local_student_grad")

    monkeypatch.setattr(fused.kd_loss, "local_student_grad", no_pytorch_fallback)
    l1, g1, tol, used = check_one_pass_equals_separate(monkeypatch, student, teacher, labels, mask, omega, "fused")
    assert used and all(k is cuda_kernel for k in used)
    # and against the PyTorch kernels (the same one-pass path, impl="torch")
    monkeypatch.undo()
    x = student.clone().requires_grad_(True)
    ref = salt_loss(x, labels, teacher, kd_weight=omega, temperature=1.0, loss_mask=mask, impl="torch")
    ref.loss.backward()
    torch.testing.assert_close(l1, ref.loss.detach().cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, x.grad.double().cpu(), rtol=1e-4, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# The .cu file: no torch headers, compiles for sm_80 and sm_90
# ---------------------------------------------------------------------------------------------------------------


def test_cuda_sources_include_no_torch_header():
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', (CSRC / "kl_div_cuda.cu").read_text(), re.M)
    assert includes and not [h for h in includes if re.match(r"(torch|ATen|c10|caffe2|pybind11)/", h)], includes
    # the binding (and the helper header it shares with the CPU binding) include torch/extension.h and nothing CUDA
    for name in ("kl_div_cuda_binding.cpp", "binding_common.h"):
        found = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', (CSRC / name).read_text(), re.M)
        assert "torch/extension.h" in found and set(found) <= {"torch/extension.h", "salt_kl.h", "binding_common.h"}, found


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernel_compiles_with_nvcc(arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}",
           str(CSRC / "kl_div_cuda.cu"), "-o", str(tmp_path / f"kl_div_cuda_sm{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / f"kl_div_cuda_sm{arch}.o").stat().st_size > 0


def test_cuda_binding_compiles_with_the_host_compiler():
    """The CUDA binding includes only torch/extension.h, so a CPU torch can syntax-check it (no GPU build here)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-w", *(f"-I{p}" for p in include_paths()),
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=salt_check",
           str(CSRC / "kl_div_cuda_binding.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
