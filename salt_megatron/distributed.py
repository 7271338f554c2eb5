"""Process-group set-up: torch.distributed (gloo on CPU, nccl on GPU) and megatron-core's ``parallel_state``."""

from __future__ import annotations

import datetime
import os

import torch



def data_parallel_size(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> int:
    """What is left of the world for data parallelism: ``world_size / (TP x PP)`` (at least 1)."""
    return max(world_size // (tensor_model_parallel_size * pipeline_model_parallel_size), 1)


def world_size_from_launcher() -> int:
    """The world size the launcher (torchrun, srun wrappers, deepspeed) announces; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", 1))


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    backend: str | None = None,
    timeout_minutes: float = 10.0,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> None:
    """Initialise torch.distributed and megatron-core model-parallel groups.

    Rank and world size come from the launcher's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, as torchrun,
    srun wrappers and the deepspeed launcher set them) unless given.  A single process without any launcher runs
    as world size 1.  The data-parallel size is what remains: ``world_size / (TP * PP)``.
    """
    from megatron.core import parallel_state

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = world_size_from_launcher() if world_size is None else world_size
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if tensor_model_parallel_size < 1 or pipeline_model_parallel_size < 1:
        raise ValueError("tensor and pipeline model-parallel sizes must be >= 1")
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-model-parallel-size ({tensor_model_parallel_size})"
            f" x pipeline-model-parallel-size ({pipeline_model_parallel_size})"
        )

    device_id = None
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)  # nccl binds this rank's GPU instead of guessing it
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"

    if not torch.distributed.is_initialized():
        if init_method is None and "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise RuntimeError("MASTER_ADDR is not set: launch with torchrun, srun or deepspeed")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device_id} if device_id is not None and backend == "nccl" else {}),
        )

    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_model_parallel_size
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )


def compute_device() -> torch.device:
    """Where models, batches and the tensors of collectives live: this rank's GPU (nccl needs CUDA tensors), or
    the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(batch: dict) -> dict:
    """A collated batch moved to :func:`compute_device` (data loading stays on the CPU)."""
    device = compute_device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
