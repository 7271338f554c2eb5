"""megatron-core's speed and memory switches for the student, under Megatron-LM's flag names: the layer
implementation, the distributed optimizer and its overlaps, sequence parallelism, activation recomputation.

Each flag goes to megatron-core's own config (``TransformerConfig``, ``DistributedDataParallelConfig``,
``OptimizerConfig``); nothing here reimplements them.  The teacher is not affected: it runs forward only, under
``torch.inference_mode``, in the student's dtype.  Measured on CPU processes over gloo
(``tests/test_performance_flags.py``): the distributed optimizer with both overlaps and every recomputation mode
train the same numbers as without them and resume exactly; sequence parallelism needs TE's or apex's LayerNorm, so
it is a GPU-only path, refused in one line elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def add_performance_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed and memory (megatron-core's switches, Megatron-LM's names)")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=None,
                   help="the layer spec: Transformer Engine's or megatron-core's local one (default: "
                        "transformer_engine where TE and a GPU are present, else local)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over data-parallel ranks (ZeRO-1 in megatron-core; needs NCCL)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next forward pass")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard LayerNorm/dropout activations over the sequence within TP (needs TP > 1 and NCCL)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recomputation of attention's core (= --recompute-granularity selective)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="full recomputation: checkpoint uniform groups of layers, or the first N layers of a stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full recomputation: layers per group (uniform) or layers recomputed per stage (block)")


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_performance_args(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """Fill the derived settings (the layer implementation, --recompute-activations) and return what is refused,
    one message per problem."""
    errors = []
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if cuda and transformer_engine_installed() else "local"
    elif args.transformer_impl == "transformer_engine" and not (cuda and transformer_engine_installed()):
        errors.append("--transformer-impl transformer_engine needs Transformer Engine and a GPU ("
                      + ("transformer_engine is not installed" if cuda else "no CUDA device here")
                      + "): use --transformer-impl local")
    if args.recompute_activations:
        if args.recompute_granularity not in (None, "selective"):
            errors.append("--recompute-activations is --recompute-granularity selective: not with "
                          f"--recompute-granularity {args.recompute_granularity}")
        args.recompute_granularity = "selective"
    layers_per_stage = args.num_layers // max(1, args.pipeline_model_parallel_size)
    if args.recompute_granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            errors.append("--recompute-granularity full needs --recompute-method (uniform or block) and "
                          "--recompute-num-layers")
        elif not 1 <= args.recompute_num_layers <= layers_per_stage:
            errors.append(f"--recompute-num-layers must be in [1, {layers_per_stage}] (layers per pipeline stage), "
                          f"got {args.recompute_num_layers}")
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        errors.append("--recompute-method and --recompute-num-layers go with --recompute-granularity full "
                      "(selective recomputation picks its own modules)")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        errors.append("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
                      "(as in Megatron-LM)")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards within TP)")
    elif args.sequence_parallel and args.transformer_impl == "local" and importlib.util.find_spec("apex") is None:
        errors.append("--sequence-parallel needs Transformer Engine's layers or apex's fused LayerNorm "
                      "(megatron-core's torch LayerNorm does not take it): a GPU with TE, --transformer-impl "
                      "transformer_engine")
    if args.deepspeed:
        used = [flag for flag, on in (("--use-distributed-optimizer", args.use_distributed_optimizer),
                                      ("--overlap-grad-reduce", args.overlap_grad_reduce)) if on]
        if used:
            errors.append(f"{', '.join(used)}: megatron-core's optimizer switches; with --deepspeed the ZeRO "
                          "stage in --deepspeed-config shards and overlaps")
    return errors


def transformer_config_kwargs(args: argparse.Namespace) -> dict:
    """The student's TransformerConfig fields these flags set."""
    return {
        "sequence_parallel": args.sequence_parallel,
        "recompute_granularity": args.recompute_granularity,
        "recompute_method": args.recompute_method,
        "recompute_num_layers": args.recompute_num_layers,
    }


def ddp_and_optimizer_kwargs(args: argparse.Namespace) -> tuple[dict, dict]:
    """(DistributedDataParallelConfig fields, OptimizerConfig fields) these flags set."""
    ddp = {
        "use_distributed_optimizer": args.use_distributed_optimizer,
        "overlap_grad_reduce": args.overlap_grad_reduce,
        "overlap_param_gather": args.overlap_param_gather,
    }
    return ddp, {"use_distributed_optimizer": args.use_distributed_optimizer}
