#!/usr/bin/env python
"""KD-loss forward+backward: peak memory above the inputs and time, as ratios to the naive PyTorch path.

Methods:
  naive     F.kl_div(F.log_softmax(s/τ), F.log_softmax(t/τ), log_target=True) on the full vocabulary
  modelopt  the ModelOpt-style TP formula: fp32 copies, all-reduced max and sum-exp, partial KL (one TP rank here)
  salt      salt_megatron.vocab_parallel_kl_div(impl="torch")
  fused     salt_megatron.vocab_parallel_kl_div(impl="fused"), when the kernel is built

Each (method, N, V, dtype) runs in a fresh subprocess so peak memory is clean: the peak resident set (VmHWM, reset
after the inputs are made) minus the resident set with the inputs in place, glibc's mmap threshold pinned so large
buffers come and go with the allocator's calls.  The first fwd+bwd gives memory; the median of the next ones the time.

    python benchmarks/kd_loss.py            # N in {1k, 4k} x V in {32k, 64k, 128k} x {fp32, bf16}
    python benchmarks/kd_loss.py --quick    # N=4k, V=32k, fp32 only (the target case)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

METHODS = ("naive", "modelopt", "salt", "fused")
TAU = 2.0


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(method: str):
    import torch
    import torch.nn.functional as F

    if method == "naive":
        return lambda s, t: F.kl_div(
            F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1), log_target=True, reduction="none"
        ).sum(-1)
    if method == "modelopt":

        def modelopt_style(s, t):
            # what ModelOpt's logits-KL loss does per TP rank: fp32 copies, global max and sum-exp via all-reduce
            # (no-ops with one rank), then the partial KL summed over ranks.
            s32, t32 = s.float() / TAU, t.float() / TAU
            s32 = s32 - s32.max(-1, keepdim=True)[0].detach()
            t32 = t32 - t32.max(-1, keepdim=True)[0]
            log_q = s32 - torch.log(s32.exp().sum(-1, keepdim=True))
            log_p = t32 - torch.log(t32.exp().sum(-1, keepdim=True))
            return (log_p.exp() * (log_p - log_q)).sum(-1)

        return modelopt_style
    from salt_megatron.kd import vocab_parallel_kl_div

    impl = "torch" if method == "salt" else "fused"
    return lambda s, t: vocab_parallel_kl_div(s, t, temperature=TAU, impl=impl)


def run_case(method: str, n: int, v: int, dtype_name: str, reps: int) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    fn = _loss_fn(method)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    start = time.perf_counter()
    fn(s, t).sum().backward()
    first = time.perf_counter() - start
    peak = rss_kib("VmHWM") - base
    times = []
    for _ in range(reps):
        s.grad = None
        start = time.perf_counter()
        fn(s, t).sum().backward()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 1024, "time_s": statistics.median(times) if times else first}


# Rough peak (in units of one fp32 N x V buffer) of each method, to skip a case this machine cannot hold.
_PEAK_BUFFERS = {"naive": 6, "modelopt": 9, "salt": 2, "fused": 2}


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _spawn(method, n, v, dtype, reps):
    need = (_PEAK_BUFFERS[method] + 2) * n * v * 4
    if need > 0.9 * _mem_available_bytes():
        return {"error": f"skipped: needs ~{need / 2**30:.0f} GiB, {_mem_available_bytes() / 2**30:.0f} GiB free"}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(v), dtype, str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fused_available() -> bool:
    try:
        import torch

        from salt_megatron.kd import fused_kernels

        return fused_kernels.kernels_for(torch.device("cpu"), required=False) is not None
    except Exception:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the target case N=4k, V=32k, fp32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, n, v, dtype, reps = args.worker
        print(json.dumps(run_case(method, int(n), int(v), dtype, int(reps))))
        return

    import torch

    methods = [m for m in METHODS if m != "fused" or fused_available()]
    cases = [(4096, 32768, "fp32")] if args.quick else [
        (n, v, d) for d in ("fp32", "bf16") for n in (1024, 4096) for v in (32768, 65536, 131072)
    ]
    print(f"KD loss fwd+bwd, tau={TAU}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; ratios are to 'naive' in the same run")
    header = f"{'N':>5} {'V':>6} {'dtype':>5} {'method':>9} {'time ms':>9} {'x naive':>8} {'peak MiB':>9} {'x naive':>8}"
    print(header)
    print("-" * len(header))
    for n, v, dtype in cases:
        results = {m: _spawn(m, n, v, dtype, args.reps) for m in methods}
        ref = results["naive"]
        for m in methods:
            r = results[m]
            if "error" in r:
                print(f"{n:>5} {v:>6} {dtype:>5} {m:>9}  failed: {r['error']}")
                continue
            tr = r["time_s"] / ref["time_s"] if "time_s" in ref else float("nan")
            mr = r["peak_mib"] / ref["peak_mib"] if "peak_mib" in ref else float("nan")
            print(f"{n:>5} {v:>6} {dtype:>5} {m:>9} {r['time_s'] * 1e3:>9.1f} {tr:>8.2f} {r['peak_mib']:>9.0f} {mr:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
