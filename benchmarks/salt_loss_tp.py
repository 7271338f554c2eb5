#!/usr/bin/env python
"""The SALT loss (CE + KD) forward+backward at tensor parallelism 2, τ = 2, a padded vocabulary: its time as a
ratio to KD alone at the same shape, with CE from the KD pass (one pass) and with CE apart (megatron-core's
vocab-parallel CE).

Two gloo processes on this machine, one thread each, are the two TP ranks; each holds a [N, V_padded/2] shard of the
student's and the teacher's logits (the last rank's last columns are Megatron's vocabulary padding).  Each method
runs ``--reps`` times after one warm-up, interleaved, and the median is reported; ratios are within this one run.

    python benchmarks/salt_loss_tp.py                       # N = 2048, V = 50257 (GPT-2's) padded to 50432, fp32
    python benchmarks/salt_loss_tp.py --tokens 1024 --vocab 50257 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from salt_megatron.errors import positive_int  # noqa: E402

OMEGA = 0.5
METHODS = ("kd_alone", "one_pass", "ce_apart")


def _worker(rank, world_size, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch

    from salt_megatron.kd import salt_loss, vocab_parallel_kl_div  # first: the package patches megatron-core for CPU

    from megatron.core import parallel_state  # noqa: E402

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    padded = -(-args.vocab // (128 * world_size)) * 128 * world_size  # Megatron's --make-vocab-size-divisible-by 128
    width = padded // world_size
    gen = torch.Generator().manual_seed(rank)
    student = (torch.randn(args.tokens, width, generator=gen) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(args.tokens, width, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(7))

    def kd_alone():
        vocab_parallel_kl_div(student, teacher, temperature=args.temperature, vocab_size=args.vocab,
                              tp_group=group).mean().backward()

    def salt(fuse):
        salt_loss(student, labels, teacher, kd_weight=OMEGA, temperature=args.temperature, vocab_size=args.vocab,
                  tp_group=group, fuse_ce_with_kd=fuse).loss.backward()

    fns = {"kd_alone": kd_alone, "one_pass": lambda: salt(True), "ce_apart": lambda: salt(False)}
    times = {m: [] for m in METHODS}
    for rep in range(args.reps + 1):
        for m in METHODS:
            student.grad = None
            torch.distributed.barrier()
            start = time.perf_counter()
            fns[m]()
            torch.distributed.barrier()
            if rep > 0:  # the first round warms up
                times[m].append(time.perf_counter() - start)
    if rank == 0:
        queue.put({"padded": padded, "medians": {m: statistics.median(v) for m, v in times.items()}})
    torch.distributed.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=2048, help="N, rows of logits per rank (default 2048)")
    ap.add_argument("--vocab", type=positive_int, default=50257,
                    help="the real vocabulary (default: GPT-2's); padded to a multiple of 256")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--temperature", type=float, default=2.0, help="τ (default 2; the CPU kernel squares an exp at 2)")
    ap.add_argument("--reps", type=positive_int, default=7)
    args = ap.parse_args()
    if not args.temperature > 0:
        ap.error(f"--temperature must be > 0, got {args.temperature}")

    import torch.multiprocessing as mp

    from salt_megatron.distributed import _free_port
    from salt_megatron.kd import build

    port = _free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(2, port, args, queue), nprocs=2, join=True, start_method="spawn")
    result = queue.get()
    med = result["medians"]
    kernel = "fused" if build.cpu_kernel_available() else "torch"
    print(f"SALT loss fwd+bwd, TP = 2 (gloo, 1 thread per rank, {os.cpu_count()} CPUs), N = {args.tokens} per rank, "
          f"V = {args.vocab} padded to {result['padded']}, {args.dtype}, tau = {args.temperature}, omega = {OMEGA}, "
          f"{kernel} kernels, median of {args.reps}")
    print(f"{'method':>9} {'time ms':>9} {'x kd_alone':>11}")
    for m in METHODS:
        print(f"{m:>9} {med[m] * 1e3:>9.1f} {med[m] / med['kd_alone']:>11.3f}")


if __name__ == "__main__":
    main()
