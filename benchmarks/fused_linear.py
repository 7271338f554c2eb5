#!/usr/bin/env python
"""The SALT loss from the output layers' inputs (``kd.fused_linear``, logits never held whole) against the same
loss on materialised logits (``hidden @ weight.T`` for student and teacher, then ``salt_loss``): forward+backward
time and the peak memory above the inputs, as ratios measured in one run.

Each method runs in a fresh subprocess so its peak is clean: the peak resident set (VmHWM, reset after the inputs
are made) minus the resident set with the inputs in place, glibc's mmap threshold pinned so large buffers come and
go with the allocator's calls.  The first fwd+bwd gives memory; the median of the next ``--reps`` the time.

    python benchmarks/fused_linear.py                 # 2048 tokens, student H 512, teacher H 256, V = 128k, fp32
    python benchmarks/fused_linear.py --vocab 32768
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
from benchmarks.kd_loss import rss_kib  # noqa: E402  (the peak-memory reading both benchmarks use)
from salt_megatron.errors import positive_int  # noqa: E402

METHODS = ("materialised", "fused_linear")
TAU, OMEGA = 2.0, 0.5


def run_case(method: str, tokens: int, hidden: int, teacher_hidden: int, vocab: int, reps: int) -> dict:
    import torch

    from salt_megatron.kd import salt_loss
    from salt_megatron.kd.fused_linear import fused_linear_salt_loss

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).requires_grad_(True)
    ht = torch.randn(tokens, teacher_hidden, generator=g)
    wt = torch.randn(vocab, teacher_hidden, generator=g) * 0.05
    labels = torch.randint(0, vocab, (tokens,), generator=g)

    def step():
        h.grad = w.grad = None
        if method == "fused_linear":
            out = fused_linear_salt_loss(h, w, labels, ht, wt, kd_weight=OMEGA, temperature=TAU)
        else:
            out = salt_loss(h @ w.t(), labels, ht @ wt.t(), kd_weight=OMEGA, temperature=TAU)
        out.loss.backward()

    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    step()
    peak = rss_kib("VmHWM") - base
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 1024, "time_s": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=2048)
    ap.add_argument("--hidden", type=positive_int, default=512, help="the student's hidden size")
    ap.add_argument("--teacher-hidden", type=positive_int, default=256)
    ap.add_argument("--vocab", type=positive_int, default=131072)
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.tokens, args.hidden, args.teacher_hidden, args.vocab, args.reps)
    if args.worker:
        print(json.dumps(run_case(args.worker, *shape)))
        return
    import torch

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method, "--tokens", str(args.tokens), "--hidden",
               str(args.hidden), "--teacher-hidden", str(args.teacher_hidden), "--vocab", str(args.vocab),
               "--reps", str(args.reps)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{method} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"SALT loss fwd+bwd from hidden states: {args.tokens} tokens, student H {args.hidden}, teacher H "
          f"{args.teacher_hidden}, V {args.vocab}, fp32, tau {TAU}, omega {OMEGA}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.reps}")
    ref = results["materialised"]
    print(f"{'method':>13} {'time s':>8} {'x mat.':>7} {'peak MiB':>9} {'x mat.':>7}")
    for method in METHODS:
        r = results[method]
        print(f"{method:>13} {r['time_s']:>8.2f} {r['time_s'] / ref['time_s']:>7.2f} {r['peak_mib']:>9.0f} "
              f"{r['peak_mib'] / ref['peak_mib']:>7.2f}")


if __name__ == "__main__":
    main()
