"""Inputs, runners and tolerances shared by the KD tests (the float64 reference is salt_megatron.kd.reference)."""

from __future__ import annotations

import os

import pytest
import torch

from salt_megatron.kd import build, fused_kernels, salt_loss, vocab_parallel_kl_div
from salt_megatron.kd import loss as kd_loss_module
from salt_megatron.kd.torch_kernels import local_student_grad

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every kernel test runs on each device; the CUDA cases skip themselves where there is no GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def fused_kernels_on(device: str):
    """The fused kernels for ``device``: a failure where they should have been built, a skip where turned off."""
    if not (build.cpu_kernel_available() if device == "cpu" else build.cuda_kernel_available()):
        reason = build.kernel_status()[device]
        off = ("SALT_MEGATRON_BUILD_EXT", "0") if device == "cpu" else ("SALT_MEGATRON_BUILD_CUDA", "0")
        if os.environ.get(off[0]) == off[1] or (device == "cpu" and os.environ.get("SALT_MEGATRON_NO_JIT") == "1"):
            pytest.skip(f"fused {device} kernel turned off: {reason}")
        pytest.fail(f"the fused {device} kernel should build here: {reason}")
    return fused_kernels.kernels_for(device, required=True)


def make_logits(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def run(impl, student, teacher, grad_out=None, device="cpu", **kwargs):
    """KL and the student's gradient through vocab_parallel_kl_div with ``impl`` (both back on the CPU)."""
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


def check_one_pass_equals_separate(monkeypatch, student, teacher, labels, mask, omega, impl, tau=1.0,
                                   vocab_size=None):
    """salt_loss with CE taken from the KD pass (fuse_ce_with_kd=True) against CE and KD computed apart: the same
    loss, CE, KD and gradient, and no gradient where the mask is 0.  Returns the one-pass loss and gradient (on the
    CPU, the gradient in float64), the gradient tolerance, and the kernels the one-pass path ran on."""
    results, used = [], []
    for fuse in (True, False):
        calls = []
        apply = kd_loss_module.KLAndCrossEntropy.apply  # its 8th argument is the kernels the pass runs on
        monkeypatch.setattr(kd_loss_module.KLAndCrossEntropy, "apply",
                            lambda *a, _f=apply: (calls.append(a[7]), _f(*a))[1])
        x = student.clone().requires_grad_(True)
        out = salt_loss(x, labels, teacher, kd_weight=omega, temperature=tau, loss_mask=mask, impl=impl,
                        fuse_ce_with_kd=fuse, vocab_size=vocab_size)
        out.loss.backward()
        assert bool(calls) == fuse
        assert torch.isfinite(x.grad).all()
        used += calls
        results.append((out.loss.detach().cpu(), out.ce.cpu(), out.kd.cpu(), x.grad.double().cpu()))
    (l1, c1, k1, g1), (l0, c0, k0, g0) = results
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if student.dtype == torch.float32 else 1e-2 * g0.abs().max().item()
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=tol)
    assert torch.all(g1[mask.cpu() == 0] == 0)
    return l1, g1, tol, used


def reference_salt_loss(student, teacher, labels, mask, omega, tau, vocab_size=None):
    """The SALT loss in float64 on the gathered vocabulary, by autograd: CE over every column (padding included,
    as megatron-core's CE), KD over the first ``vocab_size``.  Returns loss, CE, KD (masked means) and the
    student's gradient."""
    import torch.nn.functional as F

    from salt_megatron.kd.reference import reference_kl

    x = student.double().clone().requires_grad_(True)
    ce = F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
    kd = reference_kl(x, teacher.double(), tau, vocab_size)
    m = mask.double()
    n = m.sum().clamp(min=1.0)
    ce_mean, kd_mean = (ce * m).sum() / n, (kd * m).sum() / n
    loss = (1 - omega) * ce_mean + omega * tau**2 * kd_mean
    loss.backward()
    return loss.detach(), ce_mean.detach(), kd_mean.detach(), x.grad


class CountingAllReduce:
    """Within the block, ``torch.distributed.all_reduce`` records (op, shape) of each call in ``calls``."""

    def __init__(self):
        self.calls = []
        self._real = None

    def __enter__(self):
        self._real = real = torch.distributed.all_reduce

        def counting(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append((str(op), tuple(tensor.shape)))
            return real(tensor, op=op, group=group, async_op=async_op)

        torch.distributed.all_reduce = counting
        return self

    def __exit__(self, *exc):
        torch.distributed.all_reduce = self._real
        return False

    @property
    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


TWO_COLLECTIVES = [str(torch.distributed.ReduceOp.MAX), str(torch.distributed.ReduceOp.SUM)]
