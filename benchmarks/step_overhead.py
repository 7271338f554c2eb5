#!/usr/bin/env python
"""SALT's KD-phase step time ÷ the baseline's step time, against the FLOP bound ``1 + P_teacher / (3 P_student)``.

A KD-phase step adds one teacher forward (≈ 2·P_teacher FLOPs per token) to the student's forward + backward
(≈ 6·P_student), so it can not be cheaper than ``1 + P_t/(3 P_s)`` times a baseline step; P counts the parameters
that do per-token matmuls (transformer layers + output layer; embeddings are lookups).  What SALT adds beyond that
(the KD loss on the vocabulary, the CE input copy) is the overhead this measures.

Both runs go through the real ``pretrain`` (same process, same data, world size 1), alternating baseline and SALT
runs so drift in machine speed hits both; the ratio is of median step times, measured in this one run.

    python benchmarks/step_overhead.py [--steps 30] [--repeats 2] [--kd-impl auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

STUDENT = dict(num_layers=4, hidden_size=256, num_attention_heads=4)
TEACHER = dict(num_layers=2, hidden_size=128, num_attention_heads=4)
SEQ, MBS, VOCAB = 128, 16, 4096


def _flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run (after 3 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=2, help="baseline/SALT run pairs, alternated")
    ap.add_argument("--kd-impl", default="auto", choices=("auto", "torch", "fused"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from salt_megatron.data.corpora import prepare_sotu
    from salt_megatron.model import GPTArchitecture, pad_vocab_size
    from salt_megatron.training.loop import main_returning

    work = args.workdir or tempfile.mkdtemp(prefix="salt_step_overhead_")
    prefix = prepare_sotu(work, VOCAB)
    common = ["--data-path", prefix, "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--eval-iters", "1",
              "--log-interval", "1000"]
    teacher_dir = os.path.join(work, "teacher")
    if not os.path.exists(os.path.join(teacher_dir, "latest_checkpointed_iteration.txt")):
        main_returning([*common, *_flags(TEACHER), "--train-iters", "3", "--save", teacher_dir])

    iters = args.steps + 3
    student = [*common, *_flags(STUDENT), "--train-iters", str(iters)]
    salt = ["--teacher-load", teacher_dir, "--kd-steps", str(iters), "--kd-weight", "0.5", "--kd-impl", args.kd_impl]
    times = {"baseline": [], "salt": []}
    for _ in range(args.repeats):
        for name, extra in (("baseline", []), ("salt", salt)):
            history = main_returning([*student, *extra])
            times[name] += [h["step_time_s"] for h in history["train"][3:]]

    padded = pad_vocab_size(VOCAB, 1)
    def params(d):
        arch = GPTArchitecture(**d, ffn_hidden_size=4 * d["hidden_size"], seq_length=SEQ, vocab_size=VOCAB,
                               padded_vocab_size=padded)
        return arch.non_embedding_params() + arch.output_layer_params()

    p_s, p_t = params(STUDENT), params(TEACHER)
    bound = 1 + p_t / (3 * p_s)
    base, kd = statistics.median(times["baseline"]), statistics.median(times["salt"])
    ratio = kd / base
    result = {"student_params": p_s, "teacher_params": p_t, "baseline_step_ms": base * 1e3, "salt_kd_step_ms": kd * 1e3,
              "ratio": ratio, "flop_bound": bound, "ratio_over_bound": ratio / bound, "kd_impl": args.kd_impl,
              "steps_per_run": args.steps, "repeats": args.repeats}
    print(f"student {STUDENT} ({p_s / 1e6:.2f}M matmul params), teacher {TEACHER} ({p_t / 1e6:.2f}M), seq {SEQ}, "
          f"micro batch {MBS}, vocab {VOCAB}, kd-impl {args.kd_impl}")
    print(f"baseline step {base * 1e3:.1f} ms | SALT KD-phase step {kd * 1e3:.1f} ms | ratio {ratio:.3f} | "
          f"FLOP bound {bound:.3f} | ratio / bound {ratio / bound:.3f} (target <= 1.05)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
