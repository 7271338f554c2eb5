"""The fused kernels (csrc/, behind salt_megatron.kd.fused_kernels) against the PyTorch kernels and the float64
reference, one shard: fp32/bf16/fp16, extreme rows, padding columns, loss masks, views, empty batches, the split
CE+KD gradient, threads.  Tests that hold on every device run once per device (``DEVICES``: the CUDA cases skip
themselves without a GPU); the rest are about the CPU kernel.  Nothing here needs megatron-core.
"""

from __future__ import annotations

import pytest
import torch

from salt_megatron.kd import salt_loss, vocab_parallel_kl_div
from salt_megatron.kd import fused_kernels
from salt_megatron.kd.reference import reference_grad, reference_kl
from salt_megatron.kd.torch_kernels import TORCH_KERNELS, local_row_stats, local_student_grad
from tests.kd_cases import (DEVICES, DTYPES, check_one_pass_equals_separate, check_split_grad, extreme_rows,
                            fused_kernels_on, grad_tol, make_logits, run, same_in_dtype, split_grad_inputs,
                            split_grad_row_stats)


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    return fused_kernels_on("cpu")


# ---------------------------------------------------------------------------------------------------------------
# On every device
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [(7, 50), (3, 5, 64), (1, 1), (33, 1000), (4, 5000), (16, 1001), (4, 32768), (2, 262144)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 1.7])
def test_fused_vs_torch_vs_float64(device, dtype, shape, temperature):
    fused_kernels_on(device)
    s, t = make_logits(shape, 0).to(dtype), make_logits(shape, 1).to(dtype)
    g = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kl_f, grad_f = run("fused", s, t, g, device=device, temperature=temperature)
    kl_t, grad_t = run("torch", s, t, g, device=device, temperature=temperature)
    assert kl_f.dtype == torch.float32 and kl_f.shape == shape[:-1] and grad_f.dtype == dtype
    atol = 1e-5 if device == "cpu" else 2e-5  # the GPU's ex2.approx
    ref = reference_kl(s, t, temperature)  # the reference sees exactly the (rounded) inputs
    torch.testing.assert_close(kl_f.double(), ref, rtol=1e-4, atol=atol)
    torch.testing.assert_close(kl_f, kl_t, rtol=1e-4, atol=atol)
    ref_grad = reference_grad(s, t, temperature, grad_out=g)
    torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))
    if device == "cpu":
        same_in_dtype(grad_f, grad_t, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [dict(temperature=1.0), dict(temperature=1.5),
                                  dict(temperature=1.0, vocab_size=4001), dict(loss_mask="every third row off")],
                         ids=["tau1", "tau1.5", "padding", "mask"])
def test_extreme_rows(device, dtype, case):
    fused_kernels_on(device)
    s64, t64 = extreme_rows(4099 if device == "cpu" else 4100)
    if dtype == torch.float16:  # ±1e4 and -3e4 are finite in fp16; 3e3·randn is not: clip to its range
        s64, t64 = s64.clamp(min=-6e4, max=6e4), t64.clamp(min=-6e4, max=6e4)
    s, t = s64.to(dtype), t64.to(dtype)
    kw = dict(case)
    keep = torch.ones(10, dtype=torch.float64)
    if "loss_mask" in kw:
        kw["loss_mask"] = (torch.arange(10) % 3 != 1).to(device)
        keep = kw["loss_mask"].double().cpu()
    tau, vocab = kw.get("temperature", 1.0), kw.get("vocab_size")
    kl_f, grad_f = run("fused", s, t, device=device, **kw)
    ref = reference_kl(s, t, tau, vocab) * keep
    assert torch.isfinite(kl_f).all() and torch.isfinite(grad_f).all()
    ref_grad = reference_grad(s, t, tau, vocab, grad_out=keep)
    torch.testing.assert_close(grad_f.double(), ref_grad, **grad_tol(dtype, ref_grad))
    if device == "cpu":
        kl_t, grad_t = run("torch", s, t, device=device, **kw)
        torch.testing.assert_close(kl_f.double(), ref, rtol=2e-5, atol=1e-4)
        torch.testing.assert_close(kl_f, kl_t, rtol=2e-5, atol=1e-4)
        assert kl_f[4].item() == pytest.approx(0.0, abs=1e-7)
        same_in_dtype(grad_f, grad_t, dtype)
    else:
        torch.testing.assert_close(kl_f.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_views_and_empty(device):
    """Strided views of mixed dtypes read by row_index, a shard of padding only, and an empty batch."""
    k = fused_kernels_on(device)
    s, t = make_logits((6, 1030), 0).to(device), make_logits((6, 1030), 1).to(device)
    sv, tv = s.to(torch.bfloat16)[:, :1000], t.float()[:, :1000]  # strided views, mixed dtypes
    idx = torch.tensor([5, 1, 1], device=device)
    stats = k.row_stats(sv, tv, 1.3, row_index=idx)
    torch.testing.assert_close(stats, local_row_stats(sv[idx], tv[idx], 1.3), rtol=1e-5, atol=1e-5)
    empty = k.row_stats(sv[:, :0], tv[:, :0], 1.0)
    assert torch.all(empty[:, 0:3:2] == float("-inf")) and torch.all(empty[:, 1::2] == 0)
    x = torch.zeros(0, 64, device=device, requires_grad=True)
    kl = vocab_parallel_kl_div(x, torch.zeros(0, 64, device=device), impl="fused")
    kl.sum().backward()
    assert kl.shape == (0,) and x.grad.shape == (0, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
def test_split_grad_teacher_grad_rows(device, dtype, with_index):
    """The kernels weight the student and teacher terms apart: (q·g - p·g_t)/τ, as local_student_grad does."""
    kernels = fused_kernels_on(device)
    assert kernels.supports_split_grad
    check_split_grad(kernels, device, dtype, with_index)
    # a long row (the vectorised path over many groups per thread) and an odd width (the scalar tail)
    for width in (32768, 1001):
        check_split_grad(kernels, device, dtype, with_index, tau=1.0, rows=9, width=width)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("tau", [1.6, 2.0])
def test_ce_sum_and_ce_gradient_term(device, dtype, with_index, tau):
    """with_ce_sum: a sixth statistic Σ exp(s - max_s) from the same read (the other five unchanged), and the
    q1·g_ce gradient term of the one-pass CE at τ ≠ 1 (at τ = 2 the CPU kernel squares the exp it has), against the
    PyTorch kernels: long rows, odd widths, the extreme rows."""
    kernels = fused_kernels_on(device)
    cases = [split_grad_inputs(9, width, 50, dtype, device) for width in (1030, 32768, 1001)]
    s64, t64 = extreme_rows(4099 if device == "cpu" else 4100)
    s64, t64 = s64.clamp(min=-6e4, max=6e4), t64.clamp(min=-6e4, max=6e4)  # finite in fp16
    gen = torch.Generator().manual_seed(9)
    g, g_ce = ((torch.rand(10, generator=gen) * 2 - 1).to(device) for _ in range(2))
    cases.append((s64.to(dtype=dtype, device=device), t64.to(dtype=dtype, device=device), g, g_ce))
    for s, t, g, g_ce in cases:
        idx = torch.tensor([7, 0, 3, 8, 2], device=device) if with_index else None
        s_sel, t_sel = (s, t) if idx is None else (s.index_select(0, idx), t.index_select(0, idx))
        m = s_sel.shape[0]
        stats = kernels.row_stats(s, t, tau, True, row_index=idx)
        assert stats.shape == (m, 6)
        torch.testing.assert_close(stats[:, :5], kernels.row_stats(s, t, tau, row_index=idx), rtol=1e-6, atol=0)
        ref = local_row_stats(s_sel, t_sel, tau, True)
        torch.testing.assert_close(stats[:, 5], ref[:, 5], rtol=1e-5 if device == "cpu" else 2e-5, atol=0)
        max_s, log_sum_s, max_t, log_sum_t = split_grad_row_stats(s_sel, t_sel, tau)
        ce_log_sum = ref[:, 5].log()
        out = torch.full(s.shape, 7.0, dtype=dtype, device=device)
        kernels.student_grad(s, t, max_s, log_sum_s, max_t, log_sum_t, g[:m], tau, out, row_index=idx,
                             ce_log_sum_s=ce_log_sum, ce_grad_rows=g_ce[:m])
        expect = torch.empty(m, s.shape[1], dtype=dtype, device=device)
        local_student_grad(s_sel, t_sel, max_s, log_sum_s, max_t, log_sum_t, g[:m], tau, expect,
                           ce_log_sum_s=ce_log_sum, ce_grad_rows=g_ce[:m])
        got = out if idx is None else out.index_select(0, idx)
        assert torch.isfinite(got).all()
        if device == "cpu" or dtype != torch.float32:
            same_in_dtype(got.cpu(), expect.cpu(), dtype)
        else:  # the GPU's ex2.approx (about 2^-22 relative) against torch's exp
            torch.testing.assert_close(got.double().cpu(), expect.double().cpu(), rtol=1e-5,
                                       atol=1e-5 * max(1e-3, expect.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("omega", [0.3, 1.0])
@pytest.mark.parametrize("vocab", [300, 1030])
@pytest.mark.parametrize("tau,pad", [(1.0, 0), (1.6, 0), (1.0, 3), (0.8, 5), (2.0, 4)])
def test_salt_loss_one_pass_ce_and_kd_equals_the_separate_terms(monkeypatch, device, dtype, omega, vocab, tau, pad):
    """salt_loss takes CE from the KD pass (through the kernels' teacher_grad_rows at τ = 1 unpadded, through
    with_ce_sum and the q1 term otherwise; the fused kernel writes the gradient: no fallback); loss, CE, KD and the
    gradient must equal CE (F.cross_entropy over every column) + KD computed apart, and the same one-pass path on
    the PyTorch kernels."""
    kernels = fused_kernels_on(device)
    b, s_len = 3, 7
    student = make_logits((b, s_len, vocab), 0)
    teacher = make_logits((b, s_len, vocab), 1)
    student[0, 0, :5] = 1e4  # extreme logits on one row
    teacher[1, 2, ::4] = float("-inf")
    student, teacher = student.to(dtype=dtype, device=device), teacher.to(dtype=dtype, device=device)
    vocab_size = vocab - pad if pad else None
    labels = torch.randint(0, vocab - pad, (b, s_len), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones(b, s_len, device=device)
    mask[2, 4:] = 0

    def no_pytorch_fallback(*a, **k):
        raise AssertionError("the fused kernel should write this gradient, not local_student_grad")

    monkeypatch.setattr(fused_kernels, "local_student_grad", no_pytorch_fallback)
    l1, g1, tol, used = check_one_pass_equals_separate(monkeypatch, student, teacher, labels, mask, omega, "fused",
                                                       tau, vocab_size)
    assert used and all(k is kernels for k in used)
    monkeypatch.undo()
    x = student.clone().requires_grad_(True)
    ref = salt_loss(x, labels, teacher, kd_weight=omega, temperature=tau, loss_mask=mask, impl="torch",
                    vocab_size=vocab_size)
    ref.loss.backward()
    torch.testing.assert_close(l1, ref.loss.detach().cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, x.grad.double().cpu(), rtol=1e-4, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# The CPU kernel
# ---------------------------------------------------------------------------------------------------------------


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
    k = fused_kernels.kernels_for("cpu", required=True)
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
    k = fused_kernels.kernels_for("cpu", required=True)
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
