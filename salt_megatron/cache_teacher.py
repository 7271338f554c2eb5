"""``salt-megatron cache-teacher``: the SLM's top-K distribution at every token of the windows a KD phase will read,
written once beside the dataset (``salt_megatron.data.teacher_cache``) so that every student distils from it
without running the teacher.

Which windows: ``--windows kd`` (default) the ones ``pretrain`` with the same ``--seed``, ``--kd-steps``,
``--global-batch-size`` and SALT_DS flags reads during its KD phase (the same one-epoch GPTDataset order, or the
same selection of scored windows); ``--windows all`` every window of the dataset.  Rows are keyed by window, not
by step, so any batch size or data-parallel layout that reads those windows can use the cache.

The work is cut into chunks of ``--cache-chunk-windows`` windows; data-parallel rank r writes chunks r, r+DP, ...
(a TP group shares one teacher through vocab-parallel reductions).  Each finished chunk lands atomically in
``PATH.partial/``; a rerun after a crash skips the finished chunks, and the merged cache is byte-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch

from salt_megatron.data import teacher_cache as C
from salt_megatron.errors import ArgumentParser, UsageError
from salt_megatron.files import atomic_files, write_json_atomically

_TORCH_DTYPE = {np.float16: torch.float16, np.float32: torch.float32}


def build_parser() -> argparse.ArgumentParser:
    from salt_megatron.data.blend import add_subset_arg
    from salt_megatron.training.arguments import add_trained_model_args
    from salt_megatron.training.salt_arguments import add_selection_args

    p = ArgumentParser(prog="salt-megatron cache-teacher", description=__doc__.splitlines()[0])
    add_trained_model_args(p, "the trained SLM's checkpoint directory")
    add_subset_arg(p, "train")
    add_selection_args(p)
    p.add_argument("--cache-path", default=None, metavar="PATH",
                   help="where the cache goes (PATH.json, PATH.*.npy; default PREFIX.salt_teacher_cache)")
    p.add_argument("--topk", type=int, default=64, help="K: teacher entries kept per token")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="τ the log-probabilities are taken at")
    p.add_argument("--windows", choices=("kd", "all"), default="kd",
                   help="kd: the windows pretrain's KD phase reads with these flags; all: every window")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: the SLM's)")
    p.add_argument("--seed", type=int, default=1234, help="the training run's --seed")
    p.add_argument("--kd-steps", type=int, default=None, help="the training run's --kd-steps (--windows kd)")
    p.add_argument("--global-batch-size", type=int, default=None, help="the training run's (--windows kd)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="teacher forward batch (does not change the cache)")
    p.add_argument("--cache-chunk-windows", type=int, default=256, help="windows per resumable chunk")
    p.add_argument("--no-progress", action="store_true")
    return p


def kd_windows(args, windows, prefix: str) -> np.ndarray:
    """The windows to cache, ascending (``windows``: the one-epoch GPTDataset's, of the scored dataset's seed under
    SALT_DS)."""
    if args.windows == "all":
        return np.arange(len(windows), dtype=np.int64)
    samples = args.kd_steps * args.global_batch_size
    if args.kd_data_selection == "none":
        if samples > len(windows):
            raise UsageError(f"the KD phase reads {samples} samples, more than the {len(windows)} windows of one epoch "
                             f"of {prefix}: use --windows all")
        return np.unique(windows.shuffle_to_window[:samples]).astype(np.int64)
    from salt_megatron.data import scores
    from salt_megatron.data.selection import SelectedWindows

    header, window_scores, _ = scores.load_sidecar(prefix, seq_length=args.seq_length)
    selected = SelectedWindows(windows, header, window_scores, score=args.kd_select_by, mode=args.kd_data_selection,
                               fraction=args.kd_select_fraction, skip_fraction=args.kd_select_skip_fraction,
                               seed=args.seed, cache_dir=args.data_cache_path)
    return np.unique([selected.window_of(i) for i in range(samples)]).astype(np.int64)


def _check_args(args) -> None:
    if args.topk < 1:
        raise UsageError("--topk must be >= 1")
    if args.kd_temperature <= 0:
        raise UsageError("--kd-temperature must be > 0")
    if args.windows == "kd" and (not args.kd_steps or not args.global_batch_size):
        raise UsageError("--windows kd needs the training run's --kd-steps and --global-batch-size (or use "
                         "--windows all)")
    if args.pipeline_model_parallel_size != 1:
        raise UsageError("the teacher is cached without pipeline parallelism (--pipeline-model-parallel-size 1)")
    if args.cache_chunk_windows < 1 or args.micro_batch_size < 1:
        raise UsageError("--cache-chunk-windows and --micro-batch-size must be >= 1")


def cache_teacher(args) -> dict | None:
    """Write the cache; returns its header on rank 0."""
    from megatron.core import parallel_state, tensor_parallel

    from salt_megatron.data.blend import subset_blend
    from salt_megatron.data.gpt_data import build_gpt_datasets, check_indexed_dataset
    from salt_megatron.data.windows import UnshuffledWindows
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture
    from salt_megatron.teacher import Teacher, check_teacher_checkpoint, read_checkpoint

    _check_args(args)
    sources, blend = subset_blend(args)
    if len(blend.prefixes) != 1 or sources.split is not None:
        raise UsageError("cache-teacher caches one dataset prefix (without --split) at a time")
    prefix = blend.prefixes[0]
    check_indexed_dataset(prefix)
    meta, tokenizer = read_checkpoint(args)
    arch = GPTArchitecture.from_dict(meta["arch"])
    if not meta.get("megatron_lm"):
        check_teacher_checkpoint(args.load, tokenizer_hash=tokenizer.hash, padded_vocab_size=arch.padded_vocab_size)
    if args.topk > arch.vocab_size:
        raise UsageError(f"--topk {args.topk} is larger than the vocabulary ({arch.vocab_size} tokens)")
    args.seq_length = args.seq_length or arch.seq_length
    if args.check_only:
        print(f"salt-megatron cache-teacher: the checks passed ({prefix}, SLM {meta['path']})")
        return None

    initialize_distributed(args.tensor_model_parallel_size, 1, backend=args.distributed_backend,
                           timeout_minutes=args.distributed_timeout_minutes)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    window_seed = args.seed
    if args.kd_data_selection != "none" and args.windows == "kd":
        from salt_megatron.data import scores

        window_seed = scores.load_sidecar(prefix, seq_length=args.seq_length)[0]["seed"]
    dataset, _ = build_gpt_datasets(prefix, None, tokenizer, seq_length=args.seq_length, seed=window_seed,
                                    train_samples=None, valid_samples=None, cache_dir=args.data_cache_path)
    windows = UnshuffledWindows(dataset)
    wanted = kd_windows(args, windows, prefix)
    model = Teacher(meta, params_dtype=torch.float32, is_last_stage=True,
                    tp_group=parallel_state.get_tensor_model_parallel_group()).model
    path = args.cache_path or C.default_cache_path(prefix)
    config = {**cache_header(meta, tokenizer, prefix, seq_length=args.seq_length, seed=window_seed, topk=args.topk,
                             temperature=args.kd_temperature, vocab_size=arch.vocab_size, windows=wanted,
                             selection=args.windows),
              "chunk_windows": args.cache_chunk_windows, "micro_batch_size": args.micro_batch_size}
    return _write(args, model, windows, wanted, path, config, arch.vocab_size)


def _chunk_path(partial: str, chunk: int) -> str:
    return os.path.join(partial, f"chunk_{chunk:07d}.npz")


def _cache_chunk(model, windows, ids: np.ndarray, args, vocab_size: int, tp_group) -> dict:
    from salt_megatron.data.gpt_data import collate
    from salt_megatron.distributed import compute_device, to_device
    from salt_megatron.kd.teacher_topk import forward_topk
    from salt_megatron.model import causal_attention_mask

    mask = causal_attention_mask(args.seq_length, device=compute_device())
    out = {"ids": [], "logprobs": [], "rest": []}
    for start in range(0, ids.size, args.micro_batch_size):
        batch = to_device(collate([windows.item(int(w)) for w in ids[start:start + args.micro_batch_size]]))
        top_ids, logprobs, rest = forward_topk(model, batch["tokens"], batch["position_ids"], mask, k=args.topk,
                                               temperature=args.kd_temperature, vocab_size=vocab_size,
                                               tp_group=tp_group)
        out["ids"].append(top_ids.to(torch.int32).cpu().numpy())
        # torch's conversion to fp16 (numpy's is ~10x slower); the same rounding (to nearest even)
        out["logprobs"].append(logprobs.to(_TORCH_DTYPE[C.ARRAYS["logprobs"]]).cpu().numpy())
        out["rest"].append(rest.cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _write(args, model, windows, wanted: np.ndarray, path: str, config: dict, vocab_size: int) -> dict | None:
    from megatron.core import parallel_state

    rank = torch.distributed.get_rank()
    partial = C.cache_paths(path)["partial"]
    config_file = os.path.join(partial, "config.json")
    if rank == 0:
        if os.path.isfile(config_file) and json.load(open(config_file)) != config:
            shutil.rmtree(partial)  # an interrupted run with other settings: its chunks do not fit
        write_json_atomically(config_file, config, sort_keys=True)
    torch.distributed.barrier()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    writer = parallel_state.get_tensor_model_parallel_rank() == 0
    per = args.cache_chunk_windows
    num_chunks = (wanted.size + per - 1) // per
    mine = [c for c in range(dp_rank, num_chunks, dp_size) if not os.path.isfile(_chunk_path(partial, c))]
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(mine) * per * args.seq_length * dp_size, unit="tok", unit_scale=True,
                        desc=f"caching the teacher ({num_chunks - len(mine) * dp_size}/{num_chunks} chunks done)",
                        dynamic_ncols=True)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for c in mine:
        chunk = _cache_chunk(model, windows, wanted[c * per:(c + 1) * per], args, vocab_size, tp_group)
        if writer:
            with atomic_files(_chunk_path(partial, c)) as (tmp,):
                np.savez(tmp, **chunk)
        if progress is not None:
            progress.update(min(per, wanted.size - c * per) * args.seq_length * dp_size)
    if progress is not None:
        progress.close()
    torch.distributed.barrier()
    header = None
    if rank == 0:
        header = write_from_chunks(path, wanted, [_chunk_path(partial, c) for c in range(num_chunks)],
                                   {k: v for k, v in config.items() if k not in ("chunk_windows", "micro_batch_size")})
        shutil.rmtree(partial)
        print(f"cached the teacher's top-{args.topk} at τ={args.kd_temperature} for {wanted.size} windows of "
              f"{args.seq_length} tokens ({header['bytes_per_token']} bytes per token): {path}.json")
    torch.distributed.barrier()
    return header


def cache_header(meta: dict, tokenizer, prefix: str, *, seq_length: int, seed: int, topk: int, temperature: float,
                 vocab_size: int, windows: np.ndarray, selection: str) -> dict:
    """What a cache records of itself (and what a rerun's unfinished chunks must agree with)."""
    return {"idx_sha256": C.file_sha256(prefix + ".idx"), "seq_length": seq_length, "seed": seed, "topk": topk,
            "temperature": float(temperature), "vocab_size": vocab_size, "teacher_checkpoint": meta["path"],
            "teacher_step": meta["step"], "teacher_fingerprint": meta["fingerprint"],
            "tokenizer_hash": tokenizer.hash, "windows_sha256": C.array_sha256(windows), "selection": selection}


def write_from_chunks(path: str, windows: np.ndarray, chunk_files: list, header: dict, key: str = "") -> dict:
    """The cache at ``path`` from chunk files holding ``{key}ids``, ``{key}logprobs``, ``{key}rest`` of consecutive
    rows, streamed into the memory-mapped arrays one chunk at a time."""
    def filler(name):
        def fill(out):
            at = 0
            for f in chunk_files:
                with np.load(f) as z:
                    part = z[key + name]
                out[at:at + part.shape[0]] = part
                at += part.shape[0]
        return fill

    return C.write_cache(path, {"windows": windows, **{n: filler(n) for n in ("ids", "logprobs", "rest")}}, header)


def main(argv=None) -> None:
    from salt_megatron.training.arguments import parse_with_config

    start = time.time()
    cache_teacher(parse_with_config(build_parser(), argv))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"caching took {time.time() - start:.1f} s")
