"""Checkpoints: megatron-core ``dist_checkpointing`` for model and optimizer, JSON for everything else.

Layout of ``--save DIR``::

    DIR/latest_checkpointed_iteration.txt   the newest complete checkpoint's step (written last, atomically)
    DIR/iter_0000012/                        one complete checkpoint
        (dist_checkpointing files)           model + optimizer, sharded: loads at another TP/PP size
        salt_meta.json                       architecture, step, consumed samples, LR scheduler, SALT schedule,
                                             tokenizer hash, logits fingerprint, the run's flags
        rng/rank_00003.pt                    each rank's RNG states (exact resume)

A checkpoint is written into ``iter_0000012.tmp-<run id>`` and renamed when every rank has finished, so a run
killed mid-save (even with SIGKILL) leaves the previous checkpoint as the latest loadable one.  Nothing here ever
deletes or replaces a checkpoint: a ``--save`` directory holding checkpoints the run does not resume from is refused
(:func:`check_save_directory`), as is a tracker that cannot be followed (:func:`find_latest_checkpoint`: never a
silent fresh start).  Megatron-LM's ``release`` tracker is understood.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from salt_megatron.errors import CheckpointError
from salt_megatron.files import write_limits_hint, write_text_atomically

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"  # Megatron-LM's tracker word for a released checkpoint, kept in DIR/release/
META = "salt_meta.json"
FORMAT_VERSION = 2  # 2: salt_meta.json also holds the run's record for resume checks ("run_record", "overrides")
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def iteration_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"iter_{step:07d}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, "metadata.json"))


def _iteration_steps(directory: str) -> list[int]:
    """Steps of the ``iter_NNNNNNN`` directories under ``directory`` (complete or not), ascending."""
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(directory)) if m)


def checkpoint_entries(directory: str) -> list[str]:
    """What in ``directory`` looks like checkpoints (of this tool or Megatron-LM's): tracker, iteration and release
    directories.  Empty for a missing or fresh directory."""
    if not os.path.isdir(directory):
        return []
    names = [f"iter_{step:07d}" for step in _iteration_steps(directory)]
    return [n for n in (TRACKER, RELEASE) if os.path.exists(os.path.join(directory, n))] + names


def tracked_checkpoint(load_dir: str) -> tuple[str, int | None] | None:
    """What ``load_dir``'s tracker names: ``(iteration directory, step)``, or ``(load_dir/release, None)`` for
    Megatron-LM's ``release`` word; None without a tracker.  :class:`CheckpointError` for a tracker that is neither."""
    tracker = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, errors="replace") as f:
        text = f.read().strip()
    if text == RELEASE:
        return os.path.join(load_dir, RELEASE), None
    if not text.isdigit():
        raise CheckpointError(f"no complete checkpoint in {load_dir}: {tracker} holds {text[:40]!r}, not a step "
                              "number: the directory was written by another tool or damaged")
    return iteration_dir(load_dir, int(text)), int(text)


def find_latest_checkpoint(load_dir: str) -> str | None:
    """The newest complete checkpoint under ``load_dir`` (or ``load_dir`` itself if it is one).

    None when there is nothing to resume: no such directory, or one without a tracker or iteration directories.
    Raises :class:`CheckpointError` for a directory it cannot follow (never a silent fresh start): a tracker that
    points at a missing or foreign directory, a tracker that is not a step, Megatron-LM's ``release`` tracker
    without a salt_megatron checkpoint behind it, or iteration directories none of which is complete.
    """
    if not os.path.isdir(load_dir):
        return None
    if _is_complete(load_dir):
        return load_dir
    complete = [s for s in _iteration_steps(load_dir) if _is_complete(iteration_dir(load_dir, s))]
    tracked = tracked_checkpoint(load_dir)
    if tracked is not None:
        path, step = tracked
        if step is None:  # Megatron-LM's release word
            if _is_complete(path):
                return path
            raise CheckpointError(
                f"no complete checkpoint in {load_dir}: its tracker says 'release' (Megatron-LM's layout) and "
                f"{path} holds no salt_megatron checkpoint ({META} + dist_checkpointing's metadata.json), so it "
                "cannot be resumed; pass another --load, or a --save directory of its own")
        if not _is_complete(path):
            why = "is missing" if not os.path.exists(path) else \
                f"is not a complete salt_megatron checkpoint (no {META} or dist_checkpointing's metadata.json)"
            raise CheckpointError(
                f"no complete checkpoint in {load_dir}: {TRACKER} says step {step} but {path} {why}; it was written "
                "by another tool or damaged: pass one complete iter_* directory as --load, or another --load")
        # a complete checkpoint newer than the tracker's was renamed into place just before a crash
        return iteration_dir(load_dir, max(step, *complete))
    if complete:
        return iteration_dir(load_dir, complete[-1])
    entries = checkpoint_entries(load_dir)
    if entries:
        raise CheckpointError(f"no complete checkpoint in {load_dir}: it holds {', '.join(entries[:3])} but none is "
                              f"a complete salt_megatron checkpoint ({META} + dist_checkpointing's metadata.json)")
    return None


def read_meta(checkpoint_dir: str) -> dict:
    """The checkpoint's JSON metadata (no model is built).  ``checkpoint_dir``: a run dir or one iteration dir."""
    path = find_latest_checkpoint(checkpoint_dir)
    if path is None:
        if not os.path.exists(checkpoint_dir):
            raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
        raise CheckpointError(f"no complete checkpoint in {checkpoint_dir}: it holds no {TRACKER} and no iter_* "
                              "directory (an interrupted save leaves only a .tmp directory)")
    meta_file = os.path.join(path, META)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e}): the checkpoint is damaged") from None
    meta["path"] = path
    return meta


def steps_to_save(start_step: int, train_iters: int, save_interval: int | None) -> list[int]:
    """The steps a run from ``start_step`` to ``train_iters`` saves at (every ``save_interval`` and the last)."""
    return [s for s in range(start_step + 1, train_iters + 1)
            if s == train_iters or (save_interval and s % save_interval == 0)]


def check_save_directory(save_dir: str, *, resuming_from: str | None, steps: list[int]) -> None:
    """Refuse a ``--save`` directory this run would damage, before anything is trained or written.

    A directory that holds checkpoints (tracker, iteration or release directories) is only written to by the run
    that resumes from it; and even that run never replaces an existing iteration directory (``steps``: the steps it
    will save).
    """
    entries = checkpoint_entries(save_dir)
    if not entries:
        return
    resuming_here = resuming_from is not None and os.path.realpath(os.path.dirname(resuming_from)) == \
        os.path.realpath(save_dir)
    if not resuming_here:
        raise CheckpointError(
            f"--save {save_dir} already holds checkpoints ({', '.join(entries[:3])}) that this run does not resume "
            f"from: resume them with --load {save_dir}, or save elsewhere (salt_megatron never overwrites a "
            "checkpoint)")
    clashes = [iteration_dir(save_dir, s) for s in steps if os.path.exists(iteration_dir(save_dir, s))]
    if clashes:
        raise CheckpointError(
            f"this run resumes from {resuming_from} and would overwrite {clashes[0]}"
            f"{f' (and {len(clashes) - 1} more)' if len(clashes) > 1 else ''}, written later by the run it resumes: "
            "move those away or save elsewhere (salt_megatron never overwrites a checkpoint)")


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


def _distributed_optimizers(optimizer, *, torch_adam_only: bool = False) -> list:
    """The megatron-core DistributedOptimizers in ``optimizer``; ``torch_adam_only``: only where they wrap torch's
    Adam (neither Apex nor TE installed), whose step count megatron-core handles by hand."""
    from megatron.core.optimizer import distrib_optimizer

    if torch_adam_only and getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return []
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, distrib_optimizer.DistributedOptimizer)]


def _optimizer_layout(optimizer) -> dict:
    """The distributed optimizer's state layout, as Megatron-LM picks it by default: ``dp_reshardable`` (each rank
    writes its own shards; megatron-core's default would be a deprecated flattened layout torch_dist refuses).
    Nothing for the other optimizers, whose layout stays what earlier checkpoints hold."""
    return {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}} if _distributed_optimizers(optimizer) else {}


def _prime_distributed_optimizer_state(optimizer) -> None:
    """Without Apex or TE, megatron-core's distributed optimizer reads torch Adam's step count from its state while
    building the state dict to load into, before any step has made that state: give each parameter the zero state
    (step 0) that the loaded one then replaces."""
    for dist_opt in _distributed_optimizers(optimizer, torch_adam_only=True):
        if dist_opt.init_state_fn is not None:
            dist_opt.init_state_fn(dist_opt.optimizer, dist_opt.config)
        for state in dist_opt.optimizer.state.values():
            state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _restore_adam_steps(optimizer) -> None:
    """Without Apex or TE, megatron-core's distributed optimizer restores torch Adam's step count into its param
    groups only (the per-parameter ``step`` stays what was there before loading, and where it sets one, it is one
    tensor shared by every parameter, which Adam would advance once per parameter): one tensor each, from the
    group's restored count."""
    for dist_opt in _distributed_optimizers(optimizer, torch_adam_only=True):
        for group in dist_opt.optimizer.param_groups:
            if "step" in group:
                for param in group["params"]:
                    dist_opt.optimizer.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _model_sharded_state_dict(model) -> dict:
    return _unwrap(model).sharded_state_dict()


def _dist_checkpoint_failures() -> tuple:
    """What a failed save or load raises: any Exception, and torch.distributed.checkpoint's CheckpointException, which
    is a BaseException (it wraps the failures of every rank)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:
        return (Exception,)
    return (Exception, CheckpointException)


DIST_CHECKPOINT_FAILURES = _dist_checkpoint_failures()


def _root_cause(error: BaseException) -> str:
    """The failure itself, not the traceback torch.distributed.checkpoint wraps around each rank's failure."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


def save_checkpoint(save_dir: str, step: int, model, optimizer, meta: dict, write_extra=None) -> str:
    """Save model + optimizer (sharded) and ``meta`` atomically; every rank must call this.  Returns the path.

    ``write_extra(tmp_dir)``, called on every rank before the rename, adds state kept elsewhere (DeepSpeed's).  An
    existing iteration directory is never replaced; a failed write (disk full, a file size limit) removes the
    temporary directory and raises :class:`CheckpointError`, leaving the previous checkpoint and tracker as they were.
    """
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = iteration_dir(save_dir, step)
    if os.path.exists(final):  # every rank checks, so none waits at a barrier for a refused save
        raise CheckpointError(f"{final} exists already; salt_megatron never overwrites a checkpoint")
    tmp = f"{final}.tmp-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    try:
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
            sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, **_optimizer_layout(optimizer))
        dist_checkpointing.save(sharded, tmp)
        if write_extra is not None:
            write_extra(tmp)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        torch.distributed.barrier()
        if rank == 0:
            meta = dict(meta, format_version=FORMAT_VERSION, step=step, world_size=torch.distributed.get_world_size())
            write_text_atomically(os.path.join(tmp, META), json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, final)
            write_text_atomically(os.path.join(save_dir, TRACKER), str(step))
    except DIST_CHECKPOINT_FAILURES as e:  # whatever failed, the previous checkpoint must stay the latest
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            previous = find_latest_checkpoint(save_dir)
        except CheckpointError:
            previous = None
        raise CheckpointError(f"could not write the checkpoint {final} ({_root_cause(e)}{write_limits_hint(save_dir)}); "
                              f"{previous or 'no earlier checkpoint'} is left as the latest") from e
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
        _prime_distributed_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, **_optimizer_layout(optimizer))
    state = dist_checkpointing.load(sharded, checkpoint_path)
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into views of fp32 parameters, which require grad
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    rng_file = os.path.join(checkpoint_path, "rng", f"rank_{torch.distributed.get_rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
