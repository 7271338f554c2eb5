#!/usr/bin/env python
"""The offline teacher (``cache-teacher`` + ``pretrain --teacher-cache``), measured at ``step_overhead.py``'s shapes.

1. Size: bytes per token of a cache for K = 16, 64, 256 against the dense fp16 logits it replaces.
2. Writing: the cache's throughput (teacher forward + top-K + copy to the host, per token) ÷ the teacher's forward
   alone, as training runs it (the whole batch's logits), on the same windows and batches (target >= 0.9); and ÷
   that forward with its logits formed block by block as the writing forms them, without the top-K (what the top-K
   itself costs); alternated, medians; again with a wider teacher (4x512) at the same vocabulary; and the whole
   command's wall time.
3. Training: the KD-phase step reading the cache (K = 64) ÷ the baseline step (target <= 1.02), and the online
   teacher's KD-phase step for comparison; real ``pretrain`` runs, alternated, ratios of median step times.

All in this one run, on this machine.

    python benchmarks/teacher_cache.py [--steps 30] [--repeats 2] [--skip-writing | --skip-training]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from salt_megatron.errors import positive_int  # noqa: E402
from step_overhead import MBS, SEQ, STUDENT, TEACHER, VOCAB, _flags  # noqa: E402  (the same shapes)

KS = (16, 64, 256)
# the same vocabulary and sequence with a teacher of a real model's proportions (hidden 512, not 128): the top-K and
# the log-sum-exp cost the same per token, the forward ~16x more
WIDE_TEACHER = dict(num_layers=4, hidden_size=512, num_attention_heads=8)


def _throughput_worker(teacher_dir: str, prefix: str, batches: int, repeats: int, threads: int) -> dict:
    """Tokens/s of the teacher's forward alone and of cache writing's per-chunk work, on the same batches."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)  # (the test workers' default is 1)
    from megatron.core import tensor_parallel

    from salt_megatron.cache_teacher import _cache_chunk
    from salt_megatron.checkpointing import read_meta
    from salt_megatron.data.gpt_data import build_gpt_datasets, collate
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.data.windows import UnshuffledWindows
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import causal_attention_mask
    from salt_megatron.teacher import Teacher

    initialize_distributed(1, 1, backend="gloo")
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    meta = read_meta(teacher_dir)
    model = Teacher(meta, params_dtype=torch.float32, is_last_stage=True, tp_group=None).model
    dataset, _ = build_gpt_datasets(prefix + "_train", None, load_tokenizer(prefix + ".model"), seq_length=SEQ,
                                    seed=1234, train_samples=None, valid_samples=None)
    windows = UnshuffledWindows(dataset)
    ids = list(range(batches * MBS))
    mask = causal_attention_mask(SEQ)

    def forward_only():
        for start in range(0, len(ids), MBS):
            batch = collate([windows.item(w) for w in ids[start:start + MBS]])
            with torch.inference_mode():
                model(batch["tokens"], batch["position_ids"], mask)

    def forward_in_blocks():  # the forward with the logits formed as cache writing forms them, without the top-K
        from salt_megatron.kd.teacher_topk import logit_blocks
        from salt_megatron.model import output_layer_inputs

        for start in range(0, len(ids), MBS):
            batch = collate([windows.item(w) for w in ids[start:start + MBS]])
            with torch.inference_mode(), output_layer_inputs(model) as captured:
                hidden = model(batch["tokens"], batch["position_ids"], mask)
                for _ in logit_blocks(hidden, captured["weight"]):
                    pass

    def chunk(k):
        args = argparse.Namespace(seq_length=SEQ, micro_batch_size=MBS, topk=k, kd_temperature=1.0)
        return lambda: _cache_chunk(model, windows, np.array(ids), args, meta["arch"]["vocab_size"], None)

    runs = {"forward": forward_only, "forward_in_blocks": forward_in_blocks,
            **{f"cache_k{k}": chunk(k) for k in KS}}
    seconds = {name: [] for name in runs}
    forward_only()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t)
    tokens = len(ids) * SEQ
    return {name: tokens / statistics.median(s) for name, s in seconds.items()}


def _writing(args, teacher_dir: str, wide_dir: str, prefix: str):
    from tests.dist_utils import run_workers

    rates, = run_workers(_throughput_worker_entry, 1, teacher_dir, prefix, args.forward_batches, args.repeats,
                         args.threads)
    wide_rates, = run_workers(_throughput_worker_entry, 1, wide_dir, prefix, max(2, args.forward_batches // 4),
                              args.repeats, args.threads)
    for label, shape, r in (("teacher", TEACHER, rates), ("wider teacher", WIDE_TEACHER, wide_rates)):
        for k in KS:
            print(f"cache writing, {label} {shape['num_layers']}x{shape['hidden_size']}, {args.threads} thread(s), "
                  f"K = {k:3d}: "
                  f"{r[f'cache_k{k}']:.0f} tok/s vs its forward alone {r['forward']:.0f} tok/s: "
                  f"{r[f'cache_k{k}'] / r['forward']:.3f} (target >= 0.9); vs the same forward with the logits "
                  f"formed block by block as the writing forms them ({r['forward_in_blocks']:.0f} tok/s): "
                  f"{r[f'cache_k{k}'] / r['forward_in_blocks']:.3f}")
    return rates, wide_rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=30,
                    help="timed steps per pretrain run (after 3 warm-up steps)")
    ap.add_argument("--repeats", type=positive_int, default=2, help="alternated rounds (pretrain runs and throughput)")
    ap.add_argument("--forward-batches", type=positive_int, default=16, help="micro-batches per throughput measurement")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch threads for the throughput measurement (default: what a fresh process uses, as "
                         "cache-teacher does: %d here)" % _default_threads())
    ap.add_argument("--workdir", default=None)
    skip = ap.add_mutually_exclusive_group()
    skip.add_argument("--skip-writing", action="store_true", help="measure the training steps only")
    skip.add_argument("--skip-training", action="store_true", help="measure the size and the writing only")
    args = ap.parse_args()
    args.threads = args.threads or _default_threads()

    from salt_megatron.data.corpora import prepare_sotu
    from salt_megatron.data.teacher_cache import bytes_per_token
    from salt_megatron.training.loop import main_returning

    work = args.workdir or tempfile.mkdtemp(prefix="salt_teacher_cache_")
    prefix = prepare_sotu(work, VOCAB)
    common = ["--data-path", prefix, "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--eval-iters", "1",
              "--log-interval", "1000"]
    teacher_dir, wide_dir = os.path.join(work, "teacher"), os.path.join(work, "teacher_wide")
    for directory, shape in ((teacher_dir, TEACHER), (wide_dir, WIDE_TEACHER)):
        if not os.path.exists(os.path.join(directory, "latest_checkpointed_iteration.txt")):
            main_returning([*common, *_flags(shape), "--train-iters", "3", "--save", directory])

    print(f"shapes: student {STUDENT}, teacher {TEACHER}, seq {SEQ}, micro batch {MBS}, vocab {VOCAB}")
    sizes = {k: bytes_per_token(k) for k in KS}
    for k, b in sizes.items():
        print(f"K = {k:3d}: {b} bytes per token | dense fp16 logits: {2 * VOCAB} (V = {VOCAB}, {2 * VOCAB / b:.0f}x), "
              f"{2 * 32768} (V = 32k, {2 * 32768 / b:.0f}x), {2 * 131072} (V = 128k, {2 * 131072 / b:.0f}x)")

    rates = wide_rates = None
    if not args.skip_writing:
        rates, wide_rates = _writing(args, teacher_dir, wide_dir, prefix)
    if args.skip_training:
        return

    iters = args.steps + 3
    cache_path = os.path.join(work, "cache_k64")
    cmd = [sys.executable, "-m", "salt_megatron.cli", "cache-teacher", "--load", teacher_dir, "--data-path", prefix,
           "--seq-length", str(SEQ), "--topk", "64", "--kd-steps", str(iters), "--global-batch-size", str(MBS),
           "--micro-batch-size", str(MBS), "--cache-path", cache_path, "--no-progress"]
    if not os.path.exists(cache_path + ".json"):
        start = time.perf_counter()
        # a fresh process group of its own: not the rendezvous this process's workers left in the environment
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        print(f"cache-teacher (K = 64, {iters * MBS} windows, {iters * MBS * SEQ} tokens): "
              f"{time.perf_counter() - start:.1f} s for the whole command, process start included")

    student = [*common, *_flags(STUDENT), "--train-iters", str(iters)]
    kd = ["--kd-steps", str(iters), "--kd-weight", "0.5"]
    variants = {"baseline": [], "online": ["--teacher-load", teacher_dir, *kd],
                "cached": ["--teacher-cache", cache_path, *kd]}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            history = main_returning([*student, *extra])
            times[name] += [h["step_time_s"] for h in history["train"][3:]]
    base = statistics.median(times["baseline"])
    result = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"baseline step {result['baseline']:.1f} ms | KD-phase step, online teacher {result['online']:.1f} ms "
          f"({result['online'] / 1e3 / base:.3f}x) | from the cache (K = 64) {result['cached']:.1f} ms "
          f"({result['cached'] / 1e3 / base:.3f}x, target <= 1.02)")
    print(json.dumps({"step_ms": result, "cached_over_baseline": result["cached"] / 1e3 / base,
                      "online_over_baseline": result["online"] / 1e3 / base, "bytes_per_token": sizes,
                      "write_tok_s": rates, "write_tok_s_wide_teacher": wide_rates, "steps_per_run": args.steps,
                      "repeats": args.repeats}))


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _throughput_worker_entry(rank, world_size, *args):
    return _throughput_worker(*args)


if __name__ == "__main__":
    main()
