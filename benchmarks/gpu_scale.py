#!/usr/bin/env python
"""The step at a realistic size, through the real `pretrain`: a ~350M student (24 x 1024) with a ~125M teacher
(12 x 768), seq 2048, bf16, Transformer Engine where installed, the distributed optimizer.  Prints tokens/s and MFU
of the baseline step and of the KD-phase step, their ratio against the FLOP bound 1 + P_t/(3·P_s), and the peak GPU
memory without the teacher, with it, and with it under --kd-fused-linear.

Data: random token ids (NullTokenizer, --vocab ids; the step's cost does not depend on the text), prepared here.
Each configuration runs --steps steps; step times are medians over the steps after the first two.

    python benchmarks/gpu_scale.py                 # on a GPU (benchmarks/gpu_scale.sh runs it with the kernel check)
    python benchmarks/gpu_scale.py --tiny          # a CPU dry run: tiny sizes, fp32, gloo, no distributed optimizer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
from salt_megatron.errors import positive_int  # noqa: E402

# dense bf16 peak of the GPUs this project is lent, FLOP/s (NVIDIA's data sheets, without sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _cli(*args, log=None):
    cmd = [sys.executable, "-m", "salt_megatron.cli", *map(str, args)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if log is not None:
        log.write(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out


def _train_rows(metrics_file):
    with open(metrics_file) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run at tiny sizes")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="steps per configuration (default 12; --tiny 4)")
    ap.add_argument("--vocab", type=positive_int, default=50257)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import torch

    from salt_megatron.model import GPTArchitecture, pad_vocab_size

    tiny = args.tiny
    steps = args.steps or (4 if tiny else 12)
    student = dict(num_layers=2, hidden_size=64, heads=4) if tiny else dict(num_layers=24, hidden_size=1024, heads=16)
    teacher = dict(num_layers=2, hidden_size=32, heads=2) if tiny else dict(num_layers=12, hidden_size=768, heads=12)
    seq, micro = (64, 2) if tiny else (2048, 4)
    vocab = 512 if tiny else args.vocab
    precision = [] if tiny else ["--bf16", "--use-distributed-optimizer"]
    work = args.workdir or tempfile.mkdtemp(prefix="salt_scale_")
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, "runs.log"), "w")
    # random ids as text (NullTokenizer): enough windows for every step
    ids = os.path.join(work, "ids.txt")
    gen = torch.Generator().manual_seed(0)
    with open(ids, "w") as f:
        for _ in range(max(64, steps * micro * 2)):
            f.write(" ".join(map(str, torch.randint(0, vocab, (seq * 2,), generator=gen).tolist())) + "\n")
    _cli("prepare", "--input", ids, "--output-prefix", os.path.join(work, "data"), "--tokenizer-type",
         "NullTokenizer", "--vocab-size", vocab, "--split-lines", "--workers", 1, log=log)
    data = os.path.join(work, "data")

    def model_flags(m):
        return ["--num-layers", m["num_layers"], "--hidden-size", m["hidden_size"], "--num-attention-heads",
                m["heads"], "--seq-length", seq, "--micro-batch-size", micro, "--eval-iters", 1, "--lr", "1e-4",
                "--min-lr", "1e-5", *precision]

    teacher_dir = os.path.join(work, "teacher")
    _cli("pretrain", "--data-path", data, *model_flags(teacher), "--train-iters", 2, "--save", teacher_dir, log=log)
    runs = {
        "baseline": [],
        "KD phase": ["--teacher-load", teacher_dir, "--kd-steps", steps, "--kd-weight", "0.5"],
        "KD phase, --kd-fused-linear": ["--teacher-load", teacher_dir, "--kd-steps", steps, "--kd-weight", "0.5",
                                        "--kd-fused-linear"],
    }
    results = {}
    for name, extra in runs.items():
        metrics = os.path.join(work, f"{len(results)}.jsonl")
        _cli("pretrain", "--data-path", data, *model_flags(student), "--train-iters", steps, "--metrics-file", metrics,
             *extra, log=log)
        rows = _train_rows(metrics)
        timed = rows[2:] or rows
        results[name] = {"step_s": statistics.median(r["step_time_s"] for r in timed),
                         "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                         "peak_gib": max((r.get("peak_memory_gib", float("nan")) for r in rows), default=float("nan"))}

    def params(m, v):
        arch = GPTArchitecture(num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["heads"],
                               ffn_hidden_size=4 * m["hidden_size"], seq_length=seq, vocab_size=v,
                               padded_vocab_size=pad_vocab_size(v, 1))
        return arch.non_embedding_params() + arch.output_layer_params()

    p_s, p_t = params(student, vocab), params(teacher, vocab)
    bound = 1 + p_t / (3 * p_s)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    print(f"{device}: student {student['num_layers']}x{student['hidden_size']} ({p_s / 1e6:.1f}M matmul params), "
          f"teacher {teacher['num_layers']}x{teacher['hidden_size']} ({p_t / 1e6:.1f}M), seq {seq}, "
          f"micro-batch {micro}, "
          f"vocab {vocab}, {' '.join(precision) or 'fp32'}; {steps} steps each, medians after the first two")
    print(f"{'run':>28} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'x baseline':>11} {'/ bound':>8} {'peak GiB':>9}")
    base = results["baseline"]["step_s"]
    for name, r in results.items():
        flops = 6 * (p_s + (p_t / 3 if name != "baseline" else 0)) * r["tokens_per_s"]
        mfu = f"{flops / peak:.1%}" if peak else "n/a"
        ratio = r["step_s"] / base
        print(f"{name:>28} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} {mfu:>6} {ratio:>11.3f} "
              f"{ratio / (bound if name != 'baseline' else 1):>8.3f} {r['peak_gib']:>9.2f}")
    print(f"FLOP bound of the KD-phase step: 1 + P_t/(3 P_s) = {bound:.3f}; logs in {work}/runs.log")


if __name__ == "__main__":
    main()
