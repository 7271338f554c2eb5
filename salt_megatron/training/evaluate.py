"""``salt-megatron evaluate --load DIR --data-path PREFIX``: validation loss and perplexity of a checkpoint.

The model is rebuilt from the checkpoint's saved architecture (no model flags needed) at the TP/PP size given here
(dist_checkpointing reshards), and run over the first ``--eval-iters`` global batches of the dataset's validation
split (or of the dataset itself when it has no split).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from salt_megatron.training.arguments import add_data_args, add_parallel_args, parse_with_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salt-megatron evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--load", required=True, help="checkpoint directory (run dir or one iter_* dir)")
    add_data_args(p)
    add_parallel_args(p)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--eval-iters", type=int, default=None, help="default: the whole split")
    p.add_argument("--split", choices=("valid", "train"), default="valid")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def evaluate_checkpoint(args) -> dict | None:
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from salt_megatron.data.gpt_data import build_gpt_datasets, resolve_data_prefixes
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture, build_gpt_model
    from salt_megatron.training import checkpointing
    from salt_megatron.training.pretrain import evaluate

    meta = checkpointing.read_meta(args.load)
    arch = GPTArchitecture.from_dict(meta["arch"])
    train_prefix, valid_prefix = resolve_data_prefixes(args.data_path, args.train_data_path, args.valid_data_path)
    prefix = valid_prefix if args.split == "valid" and valid_prefix else train_prefix
    tokenizer = load_tokenizer(args.tokenizer_model or meta["tokenizer_model"])
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise SystemExit("salt-megatron evaluate: the tokenizer differs from the checkpoint's")
    world = int(os.environ.get("WORLD_SIZE", 1))
    dp = world // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
    args.data_parallel_size = dp
    args.seq_length = arch.seq_length
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    _, dataset = build_gpt_datasets(prefix, prefix, tokenizer, seq_length=arch.seq_length, seed=args.seed,
                                    train_samples=1, valid_samples=None, cache_dir=args.data_cache_path)
    eval_iters = args.eval_iters or max(len(dataset) // args.global_batch_size, 1)
    model = build_gpt_model(arch, params_dtype=torch.float32)
    checkpointing.load_model_weights(meta["path"], model)
    result = evaluate(model, dataset, args, get_forward_backward_func(), eval_iters)
    if result is not None and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        result.update(checkpoint=meta["path"], step=meta["step"], data=prefix)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{meta['path']} (step {meta['step']}) on {prefix}: loss {result['val_loss']:.4f}, "
                  f"perplexity {result['val_ppl']:.2f} over {result['val_tokens']} tokens")
    return result


def main(argv=None) -> None:
    evaluate_checkpoint(parse_with_config(build_parser(), argv))
