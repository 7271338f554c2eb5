"""GPU benchmark of the fused KL kernel (csrc/kl_div_cuda.cu) against the naive PyTorch KL and the HBM bound.

For N rows and V ∈ {32k, 128k} (bf16 by default) it times forward+backward of

* fused:  ``vocab_parallel_kl_div(..., impl="fused")`` (the CUDA kernel; also its forward and backward alone),
* torch:  ``vocab_parallel_kl_div(..., impl="torch")`` (the chunked PyTorch kernels, salt_megatron.kd.torch_kernels),
* naive:  ``F.kl_div(F.log_softmax(s/τ,-1), F.log_softmax(t/τ,-1), log_target=True, reduction='none').sum(-1)``,

and prints times, the ratio to naive, the peak memory above the inputs, and the share of the memory-bandwidth
bound: forward reads s and t, backward reads s and t and writes the gradient, so fwd+bwd moves 5·N·V·bytes; the
bound is that ÷ the HBM bandwidth (--bandwidth, default from the device name: H100 SXM 3.35e12 B/s, H200 4.8e12).
Before timing, a correctness check compares the CUDA fused kernel with the PyTorch path and the float64 reference
(salt_megatron.kd.reference; fp32 and bf16, values and gradients, with padding columns and a loss mask).  Then
``salt_loss`` (ω = 0.5, τ = 1) forward+backward: CE from the KD pass vs CE apart vs naive PyTorch CE + KD.  Needs no
megatron-core.

    PYTHONPATH=. python benchmarks/gpu_kd_loss.py [--rows 8192] [--vocab 32768 131072] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from salt_megatron.kd import build, fused_kernels, salt_loss, vocab_parallel_kl_div  # noqa: E402
from salt_megatron.kd.reference import reference_grad, reference_kl  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # B/s, SXM parts
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_bandwidth(name: str) -> float | None:
    for key, value in BANDWIDTH.items():  # H200 before H100: "H100" is not in "H200"
        if key in name.upper():
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# Correctness: CUDA fused vs the PyTorch path vs float64
# ---------------------------------------------------------------------------------------------------------------


def correctness_check(device: str, rows: int = 256, width: int = 32896, vocab: int = 32800, tau: float = 1.7) -> bool:
    ok = True
    g = torch.Generator(device=device).manual_seed(0)
    print(f"correctness: {device} fused vs impl='torch' vs float64, rows={rows}, width={width} (vocab {vocab}), "
          f"τ={tau}, loss mask on, first row with ±1e4 logits and -inf teacher entries")
    print(f"  {'dtype':6s} {'|kl-ref| max':>13s} {'|kl-torch| max':>15s} {'|grad-ref| max':>15s} "
          f"{'|grad-torch| max':>17s} {'max |grad|':>11s}  result")
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.randn(rows, width, device=device, generator=g) * 3
        t = torch.randn(rows, width, device=device, generator=g) * 3
        s[0] = 1e4 * torch.sign(s[0])
        t[0, ::7] = float("-inf")
        s, t = s.to(dtype), t.to(dtype)
        mask = torch.rand(rows, device=device, generator=g) > 0.2
        out = {}
        for impl in ("fused", "torch"):
            x = s.clone().requires_grad_(True)
            kl = vocab_parallel_kl_div(x, t, temperature=tau, vocab_size=vocab, loss_mask=mask, impl=impl)
            kl.backward(torch.ones_like(kl))
            out[impl] = (kl.detach(), x.grad)
        keep = mask.double()
        ref_kl = reference_kl(s, t, tau, vocab) * keep
        ref_grad = reference_grad(s, t, tau, vocab, grad_out=keep)
        (kl_f, g_f), (kl_t, g_t) = out["fused"], out["torch"]
        e_ref = (kl_f.double() - ref_kl).abs().max().item()
        e_torch = (kl_f - kl_t).abs().max().item()
        eg_ref = (g_f.double() - ref_grad).abs().max().item()
        eg_torch = (g_f.double() - g_t.double()).abs().max().item()
        gmax = ref_grad.abs().max().item()
        kl_tol = 1e-4 * max(1.0, ref_kl.abs().max().item())
        g_tol = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, gmax)
        good = (e_ref <= kl_tol and e_torch <= kl_tol and eg_ref <= g_tol and eg_torch <= g_tol
                and g_f.dtype == dtype and torch.isfinite(kl_f).all().item())
        ok &= good
        print(f"  {str(dtype).replace('torch.', ''):6s} {e_ref:13.3e} {e_torch:15.3e} {eg_ref:15.3e} {eg_torch:17.3e} "
              f"{gmax:11.3e}  {'PASS' if good else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def time_ms(fn, iters: int, device: str, warmup: int = 3) -> float:
    """Median milliseconds of fn() over iters runs (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_above(fn, baseline: int, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def bench_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str):
    """Student and teacher logits ``[rows, vocab]`` (seeded), an upstream gradient of ones, the student as a leaf
    that takes gradients, and the fused kernels for the device."""
    g = torch.Generator(device=device).manual_seed(1)
    s = (torch.randn(rows, vocab, device=device, generator=g) * 3).to(dtype)
    t = (torch.randn(rows, vocab, device=device, generator=g) * 3).to(dtype)
    grad_out = torch.ones(rows, device=device)
    return s, t, grad_out, s.detach().requires_grad_(True), fused_kernels.kernels_for(device, required=True)


def grad_row_vectors(kernels, s, t, tau, grad_out):
    """The row vectors student_grad takes (max_s, log_sum_s, max_t, log_sum_t, grad_rows), from the fused forward."""
    stats = kernels.row_stats(s, t, tau)
    return stats[:, 0], stats[:, 1].log(), stats[:, 2], stats[:, 3].log(), grad_out


def bench_one(rows: int, vocab: int, dtype: torch.dtype, tau: float, iters: int, bandwidth: float | None,
              device: str = "cuda"):
    s, t, grad_out, x, kernels = bench_inputs(rows, vocab, dtype, device)

    def fused_fwd_bwd():
        x.grad = None
        vocab_parallel_kl_div(x, t, temperature=tau, impl="fused").backward(grad_out)

    def torch_fwd_bwd():
        x.grad = None
        vocab_parallel_kl_div(x, t, temperature=tau, impl="torch").backward(grad_out)

    def naive_fwd_bwd():
        x.grad = None
        kl = F.kl_div(F.log_softmax(x / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                      reduction="none").sum(-1)
        kl.backward(grad_out)

    vec = grad_row_vectors(kernels, s, t, tau, grad_out)
    out = torch.empty_like(s)

    def fused_fwd_kernel():
        kernels.row_stats(s, t, tau)

    def fused_bwd_kernel():
        kernels.student_grad(s, t, *vec, tau, out)

    itemsize = s.element_size()
    nv = rows * vocab * itemsize
    bytes_ = {"fused fwd kernel": 2 * nv, "fused bwd kernel": 3 * nv}
    results = []
    x.grad = None
    baseline = 0
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    for name, fn in (("fused fwd kernel", fused_fwd_kernel), ("fused bwd kernel", fused_bwd_kernel),
                     ("fused fwd+bwd", fused_fwd_bwd), ("torch fwd+bwd", torch_fwd_bwd),
                     ("naive fwd+bwd", naive_fwd_bwd)):
        ms = time_ms(fn, iters, device)
        x.grad = None
        peak = peak_above(fn, baseline, device) if "fwd+bwd" in name else None
        x.grad = None
        results.append((name, ms, peak, bytes_.get(name, 5 * nv)))
    naive_ms = results[-1][1]
    print(f"\nN={rows} V={vocab} {str(dtype).replace('torch.', '')} τ={tau}: inputs 2 x {nv / 2**30:.2f} GiB; "
          f"fwd+bwd moves {5 * nv / 1e9:.2f} GB"
          + (f", bound {5 * nv / bandwidth * 1e3:.3f} ms at {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""))
    print(f"  {'':18s} {'ms':>9s} {'x naive':>8s} {'peak above inputs':>18s} {'GB/s':>8s} {'% of bound':>10s}")
    for name, ms, peak, nbytes in results:
        gbs = nbytes / (ms * 1e-3) / 1e9
        pct = f"{100 * nbytes / bandwidth / (ms * 1e-3):9.1f}%" if bandwidth else "       n/a"
        peak_s = f"{peak / 2**30:14.2f} GiB" if peak is not None else f"{'':18s}"
        print(f"  {name:18s} {ms:9.3f} {ms / naive_ms:8.3f} {peak_s} {gbs:8.0f} {pct}")
    bench_salt_loss(x, t, device, iters)
    del s, t, x, out
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_salt_loss(x, t, device: str, iters: int, omega: float = 0.5) -> None:
    """salt_loss fwd+bwd at τ = 1: CE from the KD pass (one pass over the logits) vs CE apart vs naive PyTorch."""
    labels = torch.randint(0, x.shape[1], (x.shape[0],), device=device,
                           generator=torch.Generator(device=device).manual_seed(3))

    def salt(fuse_ce_with_kd):
        x.grad = None
        salt_loss(x, labels, t, kd_weight=omega, temperature=1.0, impl="fused",
                  fuse_ce_with_kd=fuse_ce_with_kd).loss.backward()

    def naive():
        x.grad = None
        ce = F.cross_entropy(x, labels)
        kd = F.kl_div(F.log_softmax(x, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        ((1 - omega) * ce + omega * kd).backward()

    naive_ms = time_ms(naive, iters, device)
    print(f"  salt_loss(ω={omega}, τ=1) fwd+bwd          ms  x naive")
    for name, fn in (("one pass: CE from the KD pass", lambda: salt(True)),
                     ("CE apart (F.cross_entropy) + fused KD", lambda: salt(False)),
                     ("naive F.cross_entropy + F.kl_div", naive)):
        ms = naive_ms if fn is naive else time_ms(fn, iters, device)
        print(f"  {name:38s} {ms:9.3f} {ms / naive_ms:8.3f}")
    x.grad = None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--bandwidth", type=float, default=None, help="HBM bytes/s (default: from the device name)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of this script with the CPU kernel (use small --rows/--vocab)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    bandwidth = args.bandwidth or default_bandwidth(name)
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
          f"HBM bandwidth {'%.2f TB/s' % (bandwidth / 1e12) if bandwidth else 'unknown (pass --bandwidth)'}")
    t0 = time.time()
    status = build.kernel_status()
    print(f"fused kernels: cpu {status['cpu']}\n               cuda {status['cuda']}  ({time.time() - t0:.1f} s)")
    if fused_kernels.kernels_for(args.device) is None:
        print(f"FAIL: the {args.device} kernel is not available")
        return 1
    ok = True
    if not args.skip_check:
        ok = correctness_check(args.device)
    for vocab in args.vocab:
        bench_one(args.rows, vocab, DTYPES[args.dtype], args.temperature, args.iters, bandwidth, args.device)
    print("\ncorrectness:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
