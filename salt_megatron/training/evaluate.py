"""Forward-only passes through megatron-core's pipeline schedule: validation loss, and the logits fingerprint.

``salt-megatron evaluate --load DIR --data-path PREFIX`` (:func:`main`): validation loss and perplexity of a
checkpoint.  The model is rebuilt from the checkpoint's saved architecture (no model flags needed) at the TP/PP size
given here (dist_checkpointing reshards), and run over the first ``--eval-iters`` global batches of the dataset's
validation split (or of the dataset itself when it has no split).
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial

import torch

from salt_megatron import fingerprint
from salt_megatron.config import BatchConfig
from salt_megatron.distributed import compute_device, data_parallel_size, to_device, world_size_from_launcher
from salt_megatron.kd import salt_loss
from salt_megatron.model import GPTArchitecture, causal_attention_mask
from salt_megatron.data.blend import add_subset_arg
from salt_megatron.training.arguments import add_trained_model_args, parse_with_config
from salt_megatron.errors import ArgumentParser, DataError


def evaluate(model, dataset, batch: BatchConfig, eval_iters: int) -> dict | None:
    """Mean next-token loss over ``eval_iters`` global batches of ``dataset`` from its start (the same samples every
    time, so curves are comparable).  Returns {"val_loss", "val_ppl", "val_tokens"} on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from salt_megatron.data.gpt_data import micro_batches

    def loss_func(data, logits):
        ce = salt_loss(logits, data["labels"], kd_weight=0.0, loss_mask=data["loss_mask"],
                       tp_group=parallel_state.get_tensor_model_parallel_group())
        return ce.loss, {"ce_sum": (ce.ce * ce.num_tokens).item(), "tokens": ce.num_tokens.item()}

    def forward_step(data_iterator, model_chunk):
        data = to_device(next(data_iterator))
        tokens = data["tokens"]
        logits = model_chunk(tokens, data["position_ids"], causal_attention_mask(tokens.shape[1], device=tokens.device))
        return logits, partial(loss_func, data)

    forward_backward = get_forward_backward_func()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=compute_device())
    with torch.no_grad():
        for i in range(eval_iters):
            batches = micro_batches(
                dataset, consumed_samples=i * batch.global_batch_size, micro_batch_size=batch.micro_batch_size,
                global_batch_size=batch.global_batch_size, dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(),
            )
            out = forward_backward(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                num_microbatches=batch.num_microbatches, seq_length=batch.seq_length,
                micro_batch_size=batch.micro_batch_size, forward_only=True,
            )
            for x in out or []:
                total += torch.tensor([float(x["ce_sum"]), float(x["tokens"])], dtype=torch.float64, device=total.device)
    if was_training:
        model.train()
    if not parallel_state.is_pipeline_last_stage():
        return None
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss = float(total[0] / total[1].clamp(min=1))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1])}


def model_fingerprint(model, arch: GPTArchitecture) -> list | None:
    """The logits fingerprint (see ``salt_megatron.fingerprint``) through the pipeline; on the last stage, else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    probe = to_device(dict(zip(("tokens", "position_ids"), fingerprint.probe_batch(arch.vocab_size, arch.seq_length))))
    tokens, position_ids = probe["tokens"], probe["position_ids"]
    result = {}

    def forward_step(data_iterator, model_chunk):
        logits = model_chunk(tokens, position_ids, causal_attention_mask(tokens.shape[1], device=tokens.device))

        def loss_func(out):
            result["fp"] = fingerprint.summarize(out, parallel_state.get_tensor_model_parallel_group())
            return out.float().sum() * 0, {}

        return logits, loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                    num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=1,
                                    forward_only=True)
    if was_training:
        model.train()
    return result.get("fp")


# ---------------------------------------------------------------------------------------------------------------
# salt-megatron evaluate
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="salt-megatron evaluate",
                                description="Validation loss and perplexity of a checkpoint on an indexed dataset.")
    add_trained_model_args(p, "checkpoint directory (run dir or one iter_* dir)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--eval-iters", type=int, default=None, help="default: the whole split")
    add_subset_arg(p, "valid")
    p.add_argument("--seed", "--eval-seed", dest="seed", type=int, default=1234,
                   help="the windows' shuffle (pretrain's --eval-seed)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def evaluate_checkpoint(args) -> dict | None:
    from megatron.core import tensor_parallel

    from salt_megatron import checkpointing
    from salt_megatron.data.blend import subset_blend
    from salt_megatron.data.gpt_data import check_indexed_dataset
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import build_gpt_model
    from salt_megatron.teacher import read_checkpoint

    sources, blend = subset_blend(args, fall_back_to_train=True)  # no valid split: the whole dataset
    meta, tokenizer = read_checkpoint(args)
    arch = GPTArchitecture.from_dict(meta["arch"])
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise DataError(f"the tokenizer {tokenizer.model_path} differs from the one {meta['path']} was trained with "
                        f"({meta.get('tokenizer_model')}): pass that one with --tokenizer-model")
    for prefix in blend.prefixes:
        check_indexed_dataset(prefix)
    if args.check_only:
        print(f"salt-megatron evaluate: the checks passed ({meta['path']} on {blend})")
        return None
    dp = data_parallel_size(world_size_from_launcher(), args.tensor_model_parallel_size,
                            args.pipeline_model_parallel_size)
    batch = BatchConfig(micro_batch_size=args.micro_batch_size,
                        global_batch_size=args.global_batch_size or args.micro_batch_size * dp,
                        data_parallel_size=dp, seq_length=arch.seq_length)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                           backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    dataset = _one_epoch(blend, sources.split, args.subset, tokenizer, arch.seq_length, args)
    eval_iters = args.eval_iters or max(len(dataset) // batch.global_batch_size, 1)
    model = build_gpt_model(arch, params_dtype=torch.float32)
    checkpointing.load_model_weights(meta["path"], model)
    result = evaluate(model, dataset, batch, eval_iters)
    if result is not None and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        result.update(checkpoint=meta["path"], step=meta["step"], data=str(blend))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{meta['path']} (step {meta['step']}) on {blend}: loss {result['val_loss']:.4f}, "
                  f"perplexity {result['val_ppl']:.2f} over {result['val_tokens']} tokens")
    return result


def _one_epoch(blend, split, subset, tokenizer, seq_length, args):
    """One epoch of the evaluated data: a dataset (or its ``--split`` part) whole; a weighted blend, as many
    samples as its datasets hold together, mixed by the weights (megatron-core needs a size for weights)."""
    from salt_megatron.data.blend import Blend
    from salt_megatron.data.gpt_data import build_gpt_datasets

    part = 1 if split is not None and subset == "valid" else 0

    def build(data, size):
        return build_gpt_datasets(data, data if split else None, tokenizer, seq_length=seq_length, seed=args.seed,
                                  train_samples=size, valid_samples=size, cache_dir=args.data_cache_path,
                                  split=split)[part]

    size = sum(len(build(Blend((p,)), None)) for p in blend.prefixes) if blend.weights is not None else None
    dataset = build(blend, size)
    if dataset is None:
        raise DataError(f"--split {split} leaves no {subset} part of {blend}")
    return dataset


def main(argv=None) -> None:
    evaluate_checkpoint(parse_with_config(build_parser(), argv))
