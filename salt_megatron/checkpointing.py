"""Checkpoints: megatron-core ``dist_checkpointing`` for model and optimizer, JSON for everything else.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint's step (written last, atomically)
    DIR/iter_0000012/                        one complete checkpoint
        (dist_checkpointing files)           model + optimizer, sharded: loads at another TP/PP size
        salt_meta.json                       architecture, step, consumed samples, LR scheduler, SALT schedule,
                                             tokenizer hash, logits fingerprint, the run's flags
        rng/rank_00003.pt                    each rank's RNG states (exact resume)

A checkpoint is written into ``iter_0000012.tmp-<pid>`` and renamed when every rank has finished, so a run killed
mid-save (even with SIGKILL) leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from salt_megatron.files import write_text_atomically

TRACKER = "latest_checkpointed_iteration.txt"
META = "salt_meta.json"
FORMAT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def iteration_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"iter_{step:07d}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, "metadata.json"))


def find_latest_checkpoint(load_dir: str) -> str | None:
    """The newest complete checkpoint under ``load_dir`` (or ``load_dir`` itself if it is one), else None."""
    if not os.path.isdir(load_dir):
        return None
    if _is_complete(load_dir):
        return load_dir
    tracker = os.path.join(load_dir, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text.isdigit():
            path = iteration_dir(load_dir, int(text))
            if _is_complete(path):
                return path
    # no (valid) tracker: fall back to the newest complete iteration directory
    steps = sorted((int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(load_dir)) if m), reverse=True)
    for step in steps:
        if _is_complete(iteration_dir(load_dir, step)):
            return iteration_dir(load_dir, step)
    return None


def read_meta(checkpoint_dir: str) -> dict:
    """The checkpoint's JSON metadata (no model is built).  ``checkpoint_dir``: a run dir or one iteration dir."""
    path = find_latest_checkpoint(checkpoint_dir)
    if path is None:
        if not os.path.exists(checkpoint_dir):
            raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
        raise CheckpointError(
            f"no complete checkpoint in {checkpoint_dir} (expected {TRACKER} and iter_*/ with {META} and "
            "dist_checkpointing's metadata.json; an interrupted save leaves only a .tmp directory)"
        )
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    meta["path"] = path
    return meta


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _unwrap(model):
    """The GPTModel inside megatron-core's DDP and Float16Module wrappers: checkpoints hold the model's own keys,
    so the teacher and `evaluate` (no DDP, maybe another precision) load them."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_sharded_state_dict(model) -> dict:
    return _unwrap(model).sharded_state_dict()


def save_checkpoint(save_dir: str, step: int, model, optimizer, meta: dict, write_extra=None) -> str:
    """Save model + optimizer (sharded) and ``meta`` atomically; every rank must call this.  Returns the path.

    ``write_extra(tmp_dir)``, called on every rank before the rename, adds state kept elsewhere (DeepSpeed's).
    """
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = iteration_dir(save_dir, step)
    tmp = f"{final}.tmp-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        for name in os.listdir(save_dir):  # leftovers of an interrupted save
            if ".tmp-" in name and os.path.isdir(os.path.join(save_dir, name)):
                shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        os.makedirs(tmp)  # empty: dist_checkpointing treats a non-empty directory as an old checkpoint
    torch.distributed.barrier()

    model_sd = _model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd)
    dist_checkpointing.save(sharded, tmp)
    if write_extra is not None:
        write_extra(tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        meta = dict(meta, format_version=FORMAT_VERSION, step=step, world_size=torch.distributed.get_world_size())
        write_text_atomically(os.path.join(tmp, META), json.dumps(meta, indent=1, sort_keys=True))
        if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomically(os.path.join(save_dir, TRACKER), str(step))
    torch.distributed.barrier()
    return final


def load_model_weights(checkpoint_path: str, model, *, replicated_on_every_stage: bool = False) -> None:
    """Load only the model's weights (any TP/PP layout the checkpoint was saved with).

    ``replicated_on_every_stage``: the model is held whole on every pipeline stage (the teacher), so each shard is
    read by several "main" replicas; dist_checkpointing's one-reader-per-shard check does not apply.
    """
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": _model_sharded_state_dict(model)}, checkpoint_path,
                                    validate_access_integrity=not replicated_on_every_stage)
    _unwrap(model).load_state_dict(state["model"])


def load_checkpoint(checkpoint_path: str, model, optimizer) -> None:
    """Load model, optimizer and this rank's RNG states from one iteration directory (exact resume)."""
    from megatron.core import dist_checkpointing

    model_sd = _model_sharded_state_dict(model)
    sharded = {"model": model_sd}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    state = dist_checkpointing.load(sharded, checkpoint_path)
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rng_file = os.path.join(checkpoint_path, "rng", f"rank_{torch.distributed.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
