"""Run a test body in N CPU processes over gloo (TP/PP/DP tests on a laptop)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile

import multiprocessing

import torch.multiprocessing as mp

# Workers start from a fork server that has imported these once (per pytest process), not from a fresh interpreter:
# importing torch, megatron-core and the package takes ~10 s of CPU a process, most of a small test's time.  The
# server imports nothing else and starts no thread before it forks, so a worker begins as a spawned one would.
_PRELOAD = ["salt_megatron.training.loop", "salt_megatron.cli", "tests.dist_utils"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, result_dir, args, environ):
    os.environ.clear()
    os.environ.update(environ)  # the caller's environment now, not the fork server's from when it started
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import torch

    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_workers(fn, world_size: int, *args):
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return their results by rank.

    ``fn`` must be importable (module level).  The environment carries MASTER_ADDR/PORT, RANK, WORLD_SIZE; ``fn``
    initialises its process group itself (e.g. ``torch.distributed.init_process_group("gloo")`` or
    ``salt_megatron.distributed.initialize_distributed``).  An exception in any worker fails the caller.
    """
    multiprocessing.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(
            _entry, args=(fn, world_size, _free_port(), result_dir, args, dict(os.environ)), nprocs=world_size,
            join=True, start_method="forkserver",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
