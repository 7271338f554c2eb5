"""Megatron-style flags for ``salt-megatron pretrain`` (and the shared ones for evaluate/score), plus YAML configs.

A YAML file given with ``--config`` sets defaults (keys are flag names with ``_`` or ``-``); flags on the command
line override it.  Everything is validated here, before any process group, model or file is made.
"""

from __future__ import annotations

import argparse
import math
import os

import yaml

from salt_megatron.data.blend import extra_valid_errors
from salt_megatron.data.tokenizer_types import TOKENIZER_TYPES
from salt_megatron.distributed import data_parallel_size
from salt_megatron.kd.checks import check_kd_weight, check_temperature
from salt_megatron.training.guards import add_exit_args
from salt_megatron.training.metrics import LOG_FORMATS
from salt_megatron.training.performance_arguments import add_performance_args, resolve_performance_args
from salt_megatron.training.salt_arguments import _Renamed, add_salt_args
from salt_megatron.errors import ArgumentParser, UsageError, one_line, require_modules


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention; default: MHA")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (Llama style) instead of GeLU")
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute"), default="rope")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


def add_trained_model_args(p: argparse.ArgumentParser, load_help: str) -> None:
    """The flags of a command that reads a trained model and a dataset (score, cache-teacher, evaluate): --config,
    --load, --model-config, the data and the distributed groups."""
    p.add_argument("--config", default=None)
    p.add_argument("--load", required=True, help=f"{load_help} (salt_megatron's or Megatron-LM's torch_dist)")
    p.add_argument("--model-config", default=None, metavar="YAML",
                   help="a Megatron-LM checkpoint without readable args: its Megatron-LM model flags")
    add_data_args(p)
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--check-only", action="store_true",
                   help="check the flags, input files and checkpoints, then exit without starting (the launchers in "
                        "examples/ run this once before starting every rank)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used otherwise")


def add_data_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="an indexed dataset (PREFIX_train/PREFIX_valid from `prepare`, or one .bin/.idx), or a blend: "
                        "P1 P2 ... (weighted by size) or W1 P1 W2 P2 ... (Megatron-LM's forms)")
    g.add_argument("--split", default=None, metavar="969,30,1",
                   help="cut each --data-path dataset by document into train,valid,test (Megatron-LM's --split); "
                        "default: prepare's _train/_valid files")
    g.add_argument("--train-data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="the training blend, used as given")
    g.add_argument("--valid-data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="the validation blend, used as given")
    g.add_argument("--data-args-path", default=None, metavar="FILE", help="a file holding the --data-path list")
    g.add_argument("--per-split-data-args-path", default=None, metavar="JSON",
                   help='{"train": [...], "valid": [...]}: the --train/--valid-data-path lists')
    g.add_argument("--extra-valid-data-path", nargs="+", default=[], metavar="NAME=PREFIX",
                   help="more held-out sets (indexed datasets, same tokenizer) evaluated at every evaluation; "
                        "logged as val_loss_NAME")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model or Hugging Face tokenizer; default: what prepare wrote beside DATA_PATH")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="Megatron-LM's tokenizer types (default: what --tokenizer-model, or prepare's file, is)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: the number of ids")
    g.add_argument("--data-cache-path", default=None, help="where GPTDataset caches its index files")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234, help="initialisation and training-data order")
    g.add_argument("--eval-seed", type=int, default=1234,
                   help="the validation windows' shuffle, apart from --seed: every run (any --seed) and its teacher "
                        "evaluate the same windows")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp16", action="store_true")
    g = p.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: train iters")
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory to write")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (latest complete one)")
    g.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    g = p.add_argument_group("resuming with other settings than the checkpoint's (each is refused by default)")
    g.add_argument("--override-salt-schedule", action="store_true",
                   help="accept another teacher, ω, n_KD, transition or τ than the checkpoint's")
    g.add_argument("--override-data", action="store_true",
                   help="accept other data, seed, global batch size or KD-phase selection than the checkpoint's")
    lr = g.add_mutually_exclusive_group()
    lr.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                    dest="override_opt_param_scheduler", action="store_true",
                    help="the LR flags replace the checkpoint's LR schedule (Megatron-LM's flag)")
    lr.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                    dest="use_checkpoint_opt_param_scheduler", action="store_true",
                    help="keep the checkpoint's LR schedule whatever the LR flags say (Megatron-LM's flag)")


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=None, help="default: only at the end")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per evaluation")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None, help="append one JSON line per log/eval event (rank last)")
    g.add_argument("--log-format", choices=LOG_FORMATS, default="salt",
                   help="console lines: compact (salt) or Megatron-LM's iteration/validation lines (megatron)")


def add_deepspeed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", action="store_true", help="train the student through deepspeed.initialize")
    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (ZeRO stage, precision, batch sizes); DeepSpeed's own spelling works too")


def build_pretrain_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="salt-megatron pretrain",
        description="Pretrain a GPT model on megatron-core; with --teacher-load, SALT (KD from a small LM first).",
    )
    p.add_argument("--config", default=None, help="YAML file of flag defaults (command-line flags win)")
    for add in (add_model_args, add_parallel_args, add_performance_args, add_data_args, add_training_args,
                add_checkpoint_args, add_exit_args, add_logging_args, add_deepspeed_args, add_salt_args):
        add(p)
    return p


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` YAML file supplies defaults for any flag it names."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        if not os.path.isfile(known.config):
            parser.error(f"--config {known.config}: no such file")
        try:
            with open(known.config, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            parser.error(f"--config {known.config}: not valid YAML ({one_line(str(e))})")
        if not isinstance(values, dict):
            parser.error(f"--config {known.config}: expected a mapping of flag names to values")
        dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
        renamed = {a.option_strings[0].lstrip("-").replace("-", "_"): a.new_name
                   for a in parser._actions if isinstance(a, _Renamed)}
        defaults = {}
        for key, value in values.items():
            dest = str(key).lstrip("-").replace("-", "_")
            if dest in renamed:
                parser.error(f"--config {known.config}: {key!r} was renamed {renamed[dest].lstrip('-')}")
            if dest not in dests:
                parser.error(f"--config {known.config}: unknown setting {key!r}")
            defaults[dest] = value
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate_pretrain_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Fill derived defaults and refuse contradictions with one clear message, before anything is built."""
    errors = []
    if args.deepspeed:
        from salt_megatron.training.deepspeed_config import reconcile_config

        errors += reconcile_config(args, world_size)
    elif args.deepspeed_config:
        errors.append("--deepspeed-config given without --deepspeed")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % mp:
        errors.append(f"world size {world_size} is not divisible by TP x PP = {mp}")
    dp = data_parallel_size(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        errors.append(
            f"--global-batch-size ({args.global_batch_size}) must be a multiple of --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({dp})"
        )
    if (args.bf16 or args.fp16) and not args.deepspeed and not _cuda_available():
        errors.append("--bf16/--fp16 need a GPU (megatron-core's mixed-precision optimizer keeps CUDA tensors); "
                      "on a CPU train in fp32")
    if args.train_iters < 1:
        errors.append("--train-iters must be >= 1")
    errors += resolve_performance_args(args, cuda=_cuda_available())
    errors += extra_valid_errors(args)
    if args.num_layers % args.pipeline_model_parallel_size:
        errors.append(f"--num-layers ({args.num_layers}) must be divisible by --pipeline-model-parallel-size")
    if args.num_attention_heads % args.tensor_model_parallel_size:
        errors.append("--num-attention-heads must be divisible by --tensor-model-parallel-size")
    if args.hidden_size % args.num_attention_heads:
        errors.append("--hidden-size must be divisible by --num-attention-heads")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.min_lr > args.lr:
        errors.append(f"--min-lr ({args.min_lr}) is larger than --lr ({args.lr})")
    if not (args.data_path or args.train_data_path or args.data_args_path or args.per_split_data_args_path):
        errors.append("give --data-path (or --train-data-path)")
    teacher_flag = "--teacher-cache" if args.teacher_cache is not None else "--teacher-load"
    if args.teacher_cache is not None:
        errors.extend(_teacher_cache_errors(args))
    if args.kd_fused_linear:
        errors.extend(_fused_linear_errors(args))
    if args.teacher_load is not None or args.teacher_cache is not None:
        if args.kd_steps is None:
            errors.append(f"{teacher_flag} needs --kd-steps (n_KD; the paper uses ~17% of --train-iters)")
        elif args.kd_steps > args.train_iters:
            errors.append(f"--kd-steps ({args.kd_steps}) exceeds --train-iters ({args.train_iters})")
        elif args.kd_steps < 0:
            errors.append("--kd-steps must be >= 0")
        for check, value, flag in ((check_kd_weight, args.kd_weight, "--kd-weight"),
                                   (check_temperature, args.kd_temperature, "--kd-temperature")):
            try:
                check(value, name=flag)
            except ValueError as e:
                errors.append(str(e))
        if args.kd_impl == "fused" and args.kd_steps:  # the kernel is loaded (or JIT-built) now, not at step 1
            from salt_megatron.kd.fused_kernels import kernels_for

            try:
                kernels_for("cuda" if _cuda_available() else "cpu", required=True)
            except RuntimeError as e:
                errors.append(f"--kd-impl fused: {e}")
        if args.kd_decay_steps is not None and args.kd_steps is not None and not (
            0 < args.kd_decay_steps <= max(args.kd_steps, 1)
        ):
            errors.append("--kd-decay-steps must be in [1, --kd-steps]")
        if args.kd_transition == "auto" and (args.kd_auto_window < 1 or not math.isfinite(args.kd_auto_margin)):
            errors.append("--kd-auto-window must be >= 1 and --kd-auto-margin a finite number of nats")
        if args.kd_token_topk < 1:
            errors.append("--kd-token-topk must be >= 1")
    elif args.kd_steps:
        errors.append("--kd-steps given without --teacher-load (or --teacher-cache)")
    if args.kd_data_selection != "none":
        if args.teacher_load is None and args.teacher_cache is None:
            errors.append("--kd-data-selection needs --teacher-load or --teacher-cache (it selects the KD phase's "
                          "data)")
        if not 0.0 < args.kd_select_fraction <= 1.0:
            errors.append(f"--kd-select-fraction must be in (0, 1], got {args.kd_select_fraction}")
        skip = args.kd_select_skip_fraction if args.kd_data_selection == "band" else 0.0
        if not 0.0 <= skip < 1.0 or skip + args.kd_select_fraction > 1.0:
            errors.append("--kd-select-skip-fraction + --kd-select-fraction must be <= 1")
    if args.exit_interval is not None and args.exit_interval < 1:
        errors.append("--exit-interval must be >= 1")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        errors.append("--exit-duration-in-mins must be > 0")
    if args.save_interval is not None and args.save_interval < 1:
        errors.append("--save-interval must be >= 1")
    if args.save_interval is not None and args.save is None:
        errors.append("--save-interval needs --save")
    if args.tensorboard_dir:
        try:
            require_modules("tensorboard", "tensorboard")
        except UsageError as e:
            errors.append(f"--tensorboard-dir: {e}")
    if errors:
        raise UsageError("; ".join(errors))
    return args


def _teacher_cache_errors(args) -> list[str]:
    """--teacher-cache replaces the teacher: what needs the teacher's full logits cannot come with it."""
    errors = []
    if args.teacher_load is not None:
        errors.append("--teacher-cache and --teacher-load: give one (the cache replaces the teacher)")
    if args.kd_transition == "auto":
        errors.append("--kd-transition auto compares with the teacher's CE on the true tokens, which a top-K cache "
                      "does not hold: use --teacher-load")
    if args.kd_token_weighting != "none":
        errors.append("--kd-token-weighting reads the teacher's full logits: use --teacher-load")
    return errors


def _fused_linear_errors(args) -> list[str]:
    """--kd-fused-linear never forms the logits; what reads them, or feeds the output layer otherwise, cannot come."""
    if args.teacher_load is None:
        return ["--kd-fused-linear needs --teacher-load (it is the online KD phase's loss)"]
    reasons = (("--kd-transition auto", args.kd_transition == "auto", "reads the teacher's logits"),
               ("--kd-token-weighting", args.kd_token_weighting != "none", "reads the teacher's logits"),
               ("--sequence-parallel", args.sequence_parallel, "another output-layer input, not wired to it"),
               ("--deepspeed", args.deepspeed, "not wired to it"))
    return [f"--kd-fused-linear does not go with {flag} ({why})" for flag, on, why in reasons if on]


def params_dtype(args):
    """The student's (and the teacher's) weight dtype from --bf16 / --fp16."""
    import torch

    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
