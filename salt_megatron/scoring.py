"""``salt-megatron score``: the SLM scores every training window (and document) of an indexed dataset (SALT_DS);
of every dataset of a blend in turn, each with its own sidecar.

Windows are exactly the samples megatron-core's GPTDataset builds for ``--seq-length`` and ``--seed`` over one
epoch of the dataset; a window's score sits at its unshuffled sample index, so training can select windows by score
and read them through the same GPTDataset.

The work is cut into chunks of ``--score-chunk-windows`` windows; data-parallel rank r scores chunks r, r+DP, ...
(every rank of a TP group computes the same numbers through vocab-parallel reductions: no vocabulary gather).  Each
finished chunk is written atomically to ``PREFIX.salt_scores.partial/``; a rerun after a crash skips finished
chunks, and the merged sidecar is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from salt_megatron.data import scores as S
from salt_megatron.data.windows import UnshuffledWindows
from salt_megatron.files import atomic_files, write_json_atomically
from salt_megatron.errors import ArgumentParser, UsageError
from salt_megatron.kd.vocab_parallel import tp_rank_and_size, valid_columns

# ---------------------------------------------------------------------------------------------------------------
# Per-token numbers from vocab-parallel logits
# ---------------------------------------------------------------------------------------------------------------


def token_loss_and_topk(logits: torch.Tensor, labels: torch.Tensor, *, k: int, vocab_size: int, tp_group=None):
    """Per-token next-token loss (nats, fp32) and whether the label is among the k largest logits.

    ``logits``: this rank's vocab shard ``[..., W]``; padding columns (global index ≥ ``vocab_size``) are ignored.
    "In the top-k" = fewer than k real columns have a strictly larger logit than the label's, i.e. the label's
    logit is at least the k-th largest.  Three collectives on per-token numbers (MAX of shard log-sum-exps; SUM of
    their exponentials and the label logit; all-gather of each shard's k largest), identical on every rank.
    """
    width = logits.shape[-1]
    rank, world = tp_rank_and_size(tp_group)
    start, valid = rank * width, valid_columns(width, vocab_size, rank, world)
    x = logits[..., :valid].float()
    if world == 1:  # torch's fused cross entropy is the cheapest exact path for one shard
        loss = F.cross_entropy(x.reshape(-1, valid), labels.reshape(-1), reduction="none").view(labels.shape)
        label_logit = x.gather(-1, labels[..., None]).squeeze(-1)
    else:
        # log-sum-exp per shard, combined across shards: MAX of the shard values, SUM of their exponentials
        # relative to it (with the label's logit, which lives on one shard, in the same SUM)
        shard_lse = torch.logsumexp(x, dim=-1) if valid else torch.full(labels.shape, float("-inf"),
                                                                         device=logits.device)
        top = shard_lse.clone()
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        in_shard = (labels >= start) & (labels < start + valid)
        local_label = (labels - start).clamp(0, max(valid - 1, 0))
        label_logit = torch.where(in_shard, x.gather(-1, local_label[..., None]).squeeze(-1),
                                  torch.zeros_like(top)) if valid else torch.zeros_like(top)
        sums = torch.stack(((shard_lse - top).exp(), label_logit))
        torch.distributed.all_reduce(sums, group=tp_group)
        loss, label_logit = top + sums[0].log() - sums[1], sums[1]
    # the k-th largest logit over the whole vocabulary: each shard's top k, gathered (k numbers per token)
    shard_top = torch.full((*labels.shape, k), float("-inf"), device=logits.device)
    if valid:
        shard_top[..., :min(k, valid)] = torch.topk(x, min(k, valid), dim=-1).values
    if world > 1:
        gathered = [torch.empty_like(shard_top) for _ in range(world)]
        torch.distributed.all_gather(gathered, shard_top, group=tp_group)
        shard_top = torch.topk(torch.cat(gathered, dim=-1), k, dim=-1).values
    kth = shard_top[..., k - 1]
    return loss, label_logit >= kth  # ties with the k-th value count as inside (fewer than k are strictly larger)


# ---------------------------------------------------------------------------------------------------------------
# The scoring run
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from salt_megatron.data.blend import add_subset_arg
    from salt_megatron.training.arguments import add_trained_model_args

    p = ArgumentParser(prog="salt-megatron score", description=__doc__.splitlines()[0])
    add_trained_model_args(p, "the trained SLM's checkpoint directory")
    add_subset_arg(p, "train")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: the SLM's)")
    p.add_argument("--seed", type=int, default=1234, help="GPTDataset's shuffle seed (use the training run's)")
    p.add_argument("--score-topk", type=int, default=10, help="k of the top-k filter (paper: 10)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--score-chunk-windows", type=int, default=256, help="windows per resumable chunk")
    p.add_argument("--cache-topk", type=int, default=0, metavar="K",
                   help="also write the teacher cache of every window (`cache-teacher --windows all`) from the same "
                        "teacher pass: its top-K per token (0: no cache)")
    p.add_argument("--cache-temperature", type=float, default=1.0, help="τ of the cache's log-probabilities")
    p.add_argument("--cache-path", default=None, metavar="PATH",
                   help="where the cache goes (one dataset; default PREFIX.salt_teacher_cache beside each)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _chunk_path(partial_dir: str, chunk: int) -> str:
    return os.path.join(partial_dir, f"chunk_{chunk:07d}.npz")


def _score_chunk(model, windows: UnshuffledWindows, lo: int, hi: int, *, seq_length: int, micro_batch_size: int,
                 topk: int, vocab_size: int, tp_group, cache: tuple | None = None) -> dict:
    """Scores of windows [lo, hi) and the per-document pieces their tokens contribute; with ``cache`` (K, τ), the
    teacher cache's rows of those windows too (``cache_ids``, ``cache_logprobs``, ``cache_rest``)."""
    from salt_megatron.data.gpt_data import collate
    from salt_megatron.data.teacher_cache import ARRAYS
    from salt_megatron.distributed import compute_device, to_device
    from salt_megatron.kd.teacher_topk import forward_topk
    from salt_megatron.model import causal_attention_mask

    window_scores = np.zeros((hi - lo, 3), dtype=np.float32)
    doc_ids, doc_loss, doc_topk, cached = [], [], [], {}
    mask = causal_attention_mask(seq_length, device=compute_device())
    for start in range(lo, hi, micro_batch_size):
        ids = list(range(start, min(hi, start + micro_batch_size)))
        batch = to_device(collate([windows.item(w) for w in ids]))
        with torch.inference_mode():
            if cache is None:
                logits = model(batch["tokens"], batch["position_ids"], mask)
            else:  # the cache's top-K from the blocks `cache-teacher` computes (the same bytes), the logits beside
                rows, logits = forward_topk(model, batch["tokens"], batch["position_ids"], mask, k=cache[0],
                                            temperature=cache[1], vocab_size=vocab_size, tp_group=tp_group,
                                            keep_logits=True)
                for name, value in zip(("ids", "logprobs", "rest"), rows):
                    cached.setdefault(name, []).append(value.cpu().numpy().astype(ARRAYS[name]))
            loss, in_topk = token_loss_and_topk(logits, batch["labels"], k=topk, vocab_size=vocab_size,
                                                tp_group=tp_group)
        loss, in_topk = loss.double().cpu().numpy(), in_topk.cpu().numpy()
        keep = batch["loss_mask"].cpu().numpy() > 0
        window_scores[ids[0] - lo:ids[-1] - lo + 1] = S.score_rows(loss, in_topk, keep)
        for row, w in enumerate(ids):
            docs = windows.target_documents(w, seq_length)
            k = keep[row] & (docs >= 0)
            doc_ids.append(docs[k])
            doc_loss.append(loss[row][k].astype(np.float32))
            doc_topk.append(in_topk[row][k])
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return {"window_scores": window_scores, "doc_ids": cat(doc_ids, np.int64), "doc_loss": cat(doc_loss, np.float32),
            "doc_topk": cat(doc_topk, bool), **{"cache_" + k: np.concatenate(v) for k, v in cached.items()}}


def _document_scores(chunks: list[dict], num_documents: int) -> np.ndarray:
    ids = np.concatenate([c["doc_ids"] for c in chunks])
    loss = np.concatenate([c["doc_loss"] for c in chunks]).astype(np.float64)
    topk = np.concatenate([c["doc_topk"] for c in chunks])
    out = np.zeros((num_documents, 3), dtype=np.float32)
    out[:, 0] = S.NO_LEARNABLE_TOKEN
    count = np.bincount(ids, minlength=num_documents)
    seen = count > 0
    out[seen, 1] = (np.bincount(ids, weights=loss, minlength=num_documents)[seen] / count[seen])
    out[seen, 2] = (np.bincount(ids, weights=topk.astype(np.float64), minlength=num_documents)[seen] / count[seen])
    # salt: lower median of the learnable tokens' losses per document
    lid, lloss = ids[topk], loss[topk].astype(np.float32)
    order = np.lexsort((lloss, lid))
    lid, lloss = lid[order], lloss[order]
    starts = np.searchsorted(lid, np.arange(num_documents), side="left")
    ends = np.searchsorted(lid, np.arange(num_documents), side="right")
    has = ends > starts
    out[has, 0] = lloss[starts[has] + (ends[has] - starts[has] - 1) // 2]
    return out


def score(args) -> list[dict] | None:
    """Score every dataset of the blend (one sidecar beside each); returns their headers on rank 0."""
    from megatron.core import parallel_state, tensor_parallel

    from salt_megatron.data.blend import subset_blend
    from salt_megatron.data.gpt_data import check_indexed_dataset
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture
    from salt_megatron.teacher import Teacher, check_teacher_checkpoint, read_checkpoint

    if args.pipeline_model_parallel_size != 1:
        raise UsageError("the SLM is scored without pipeline parallelism (--pipeline-model-parallel-size 1); use TP "
                         "and data parallelism")
    sources, blend = subset_blend(args)
    if sources.split is not None and args.subset != "train":
        raise UsageError("with --split, score scores the train split of each dataset (its sidecar is for that split)")
    meta, tokenizer = read_checkpoint(args)
    arch = GPTArchitecture.from_dict(meta["arch"])
    if not meta.get("megatron_lm"):  # trained at all, and with this tokenizer (a Megatron-LM one: by its logits)
        check_teacher_checkpoint(args.load, tokenizer_hash=tokenizer.hash, padded_vocab_size=arch.padded_vocab_size)
    if args.score_topk < 1:
        raise UsageError("--score-topk must be >= 1")
    if not 0 <= args.cache_topk <= arch.vocab_size or args.cache_temperature <= 0:
        raise UsageError(f"--cache-topk must be in [0, {arch.vocab_size}] (the vocabulary) and --cache-temperature > 0")
    if args.cache_path is not None and (len(blend.prefixes) != 1 or not args.cache_topk):
        raise UsageError("--cache-path names the cache of one dataset, written with --cache-topk K")
    for prefix in blend.prefixes:
        check_indexed_dataset(prefix)
    if args.check_only:
        print(f"salt-megatron score: the checks passed ({blend}, SLM {meta['path']})")
        return None

    initialize_distributed(args.tensor_model_parallel_size, 1, backend=args.distributed_backend,
                           timeout_minutes=args.distributed_timeout_minutes)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    # loaded as a teacher is: refused unless its logits show the weights loaded (fingerprint, or not the init's)
    model = Teacher(meta, params_dtype=torch.float32, is_last_stage=True,
                    tp_group=parallel_state.get_tensor_model_parallel_group()).model
    return [_score_dataset(args, model, meta, arch, tokenizer, prefix, split=sources.split)
            for prefix in blend.prefixes]


def _score_dataset(args, model, meta: dict, arch, tokenizer, prefix: str, *, split: str | None) -> dict | None:
    """Score one indexed dataset (its train split under ``split``) in resumable chunks; write its sidecar."""
    from megatron.core import parallel_state

    from salt_megatron.data.gpt_data import build_gpt_datasets

    rank = torch.distributed.get_rank()
    seq_length = args.seq_length or arch.seq_length
    dataset, _ = build_gpt_datasets(prefix, None, tokenizer, seq_length=seq_length, seed=args.seed,
                                    train_samples=None, valid_samples=None, cache_dir=args.data_cache_path,
                                    split=split)
    windows = UnshuffledWindows(dataset)
    tp_group = parallel_state.get_tensor_model_parallel_group()

    paths = S.sidecar_paths(prefix)
    config = {"idx_sha256": S.file_sha256(prefix + ".idx"), "seq_length": seq_length, "seed": args.seed,
              "topk": args.score_topk, "chunk_windows": args.score_chunk_windows,
              "micro_batch_size": args.micro_batch_size, "slm_checkpoint": meta["path"], "slm_step": meta["step"],
              "slm_fingerprint": meta["fingerprint"], "tokenizer_hash": tokenizer.hash, "dataset": prefix}
    if split is not None:  # recorded only when set: the sidecars of whole datasets stay as they were
        config["split"] = split
    config_file = os.path.join(paths["partial"], "config.json")
    # the teacher cache written from the same pass (--cache-topk) is part of what the unfinished chunks hold
    chunk_config = dict(config, cache=[args.cache_topk, args.cache_temperature]) if args.cache_topk else config
    if rank == 0:
        if os.path.isfile(config_file) and json.load(open(config_file)) != chunk_config:
            shutil.rmtree(paths["partial"])  # an interrupted run with other settings: its chunks do not fit
        write_json_atomically(config_file, chunk_config, sort_keys=True)
    torch.distributed.barrier()

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    writer = parallel_state.get_tensor_model_parallel_rank() == 0
    n = len(windows)
    num_chunks = (n + args.score_chunk_windows - 1) // args.score_chunk_windows
    mine = [c for c in range(dp_rank, num_chunks, dp_size) if not os.path.isfile(_chunk_path(paths["partial"], c))]
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(mine) * args.score_chunk_windows * seq_length * dp_size, unit="tok",
                        unit_scale=True, desc=f"scoring {os.path.basename(prefix)} ({num_chunks - len(mine) * dp_size}"
                        f"/{num_chunks} chunks already done)", dynamic_ncols=True)
    for c in mine:
        lo, hi = c * args.score_chunk_windows, min(n, (c + 1) * args.score_chunk_windows)
        result = _score_chunk(model, windows, lo, hi, seq_length=seq_length, micro_batch_size=args.micro_batch_size,
                              topk=args.score_topk, vocab_size=arch.vocab_size, tp_group=tp_group,
                              cache=(args.cache_topk, args.cache_temperature) if args.cache_topk else None)
        if writer:
            with atomic_files(_chunk_path(paths["partial"], c)) as (tmp,):
                np.savez(tmp, **result)
        if progress is not None:
            progress.update((hi - lo) * seq_length * dp_size)
    if progress is not None:
        progress.close()
    torch.distributed.barrier()

    header = None
    if rank == 0:
        chunks = []
        for c in range(num_chunks):
            with np.load(_chunk_path(paths["partial"], c)) as z:
                chunks.append({k: z[k] for k in z.files if not k.startswith("cache_")})
        samples = np.concatenate([c["window_scores"] for c in chunks])
        documents = _document_scores(chunks, len(windows.doc_lengths))
        header = S.write_sidecar(prefix, samples, documents, {k: v for k, v in config.items() if k != "dataset"})
        if args.cache_topk:
            _write_cache(args, meta, tokenizer, prefix, seq_length, arch.vocab_size, n,
                         [_chunk_path(paths["partial"], c) for c in range(num_chunks)])
        shutil.rmtree(paths["partial"])
        print(f"scored {n} windows of {seq_length} tokens and {documents.shape[0]} documents of {prefix} with "
              f"{meta['path']} (top-{args.score_topk}); sidecar {paths['header']}")
    torch.distributed.barrier()
    return header


def _write_cache(args, meta, tokenizer, prefix: str, seq_length: int, vocab_size: int, n: int, chunk_files) -> None:
    """The teacher cache of every window, from the rows the scoring pass kept (``cache-teacher --windows all``)."""
    from salt_megatron.cache_teacher import cache_header, write_from_chunks
    from salt_megatron.data.teacher_cache import default_cache_path

    windows = np.arange(n, dtype=np.int64)
    path = args.cache_path or default_cache_path(prefix)
    header = cache_header(meta, tokenizer, prefix, seq_length=seq_length, seed=args.seed, topk=args.cache_topk,
                          temperature=args.cache_temperature, vocab_size=vocab_size, windows=windows, selection="all")
    write_from_chunks(path, windows, chunk_files, header, key="cache_")
    print(f"and the teacher cache of those windows (top-{args.cache_topk} at τ={args.cache_temperature}): {path}.json")


def main(argv=None) -> None:
    from salt_megatron.training.arguments import parse_with_config

    start = time.time()
    score(parse_with_config(build_parser(), argv))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"scoring took {time.time() - start:.1f} s")
