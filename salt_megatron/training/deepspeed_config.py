"""``pretrain --deepspeed --deepspeed-config ds.json``: the DeepSpeed JSON checked against the flags.

The JSON decides ZeRO stage (1 or 2), bf16/fp16 and may define the optimizer; the batch flags must agree with it
(``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``; missing entries are
filled from the flags), and a contradiction is one clear error before anything is built.  The engine itself is
``salt_megatron.training.backends.DeepSpeedBackend``.
"""

from __future__ import annotations

import json
import os

from salt_megatron.distributed import data_parallel_size


AUTO = "auto"  # what DeepSpeed (and the HF Trainer) JSONs write for "take it from the training script"


def _optimizer_values_from_flags(args) -> dict:
    """The optimizer params a DeepSpeed JSON may leave to the script, as the flags set them."""
    return {"lr": args.lr, "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_eps,
            "weight_decay": args.weight_decay}


def _autos_left(node, where="") -> list[str]:
    """Dotted keys of the "auto" values still in a JSON tree."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _autos_left(value, f"{where}.{key}" if where else key)]
    return [where] if node == AUTO else []


def _number(cfg: dict, key: str, path: str, errors: list):
    try:
        return float(cfg[key])
    except (TypeError, ValueError):
        errors.append(f"{path}: {key} = {cfg[key]!r} is not a number")
        return None


def reconcile_config(args, world_size: int) -> list[str]:
    """Load ``--deepspeed-config`` into ``args.deepspeed_config_dict``, checked against the flags.  Returns errors.

    Every "auto" the JSON holds is filled from the flags (batch sizes, gradient clipping, precision, the optimizer's
    lr / betas / eps / weight decay); one that cannot be (a scheduler's, a ZeRO stage) is refused by name.
    """
    errors = []
    path = args.deepspeed_config
    if not path or not os.path.isfile(path):
        return [f"--deepspeed needs --deepspeed-config pointing at a JSON file (got {path!r})"]
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"--deepspeed-config {path}: not valid JSON ({e})"]
    if not isinstance(cfg, dict):
        return [f"--deepspeed-config {path}: expected a JSON object"]
    if args.pipeline_model_parallel_size != 1:
        errors.append("--deepspeed trains without pipeline parallelism: use --pipeline-model-parallel-size 1")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        errors.append(f"{path}: ZeRO stage {stage!r} is not supported with megatron-core TP models (use 1 or 2)")
    dp = data_parallel_size(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)

    def agree(key, value, flag):
        if key in cfg and cfg[key] != AUTO and (not isinstance(cfg[key], int) or cfg[key] != int(value)):
            errors.append(f"{path}: {key} = {cfg[key]} contradicts {flag} ({value})")
        cfg[key] = int(value)

    if args.global_batch_size is None and isinstance(cfg.get("train_batch_size"), int):
        args.global_batch_size = cfg["train_batch_size"]
    if args.global_batch_size is None:
        accumulation = cfg.get("gradient_accumulation_steps", 1)
        args.global_batch_size = args.micro_batch_size * dp * (accumulation if isinstance(accumulation, int) else 1)
    agree("train_micro_batch_size_per_gpu", args.micro_batch_size, "--micro-batch-size")
    agree("train_batch_size", args.global_batch_size, "--global-batch-size")
    if args.global_batch_size % (args.micro_batch_size * dp) == 0:
        agree("gradient_accumulation_steps", args.global_batch_size // (args.micro_batch_size * dp),
              "--global-batch-size / (--micro-batch-size x data-parallel size)")
    for name in ("bf16", "fp16"):
        section = cfg.get(name, {})
        if section.get("enabled") == AUTO:  # the flag decides
            section["enabled"] = bool(getattr(args, name))
        in_json = bool(section.get("enabled", False))
        if getattr(args, name) and not in_json:
            errors.append(f"--{name} is set but {path} does not enable {name}: the JSON decides the precision")
        setattr(args, name, in_json)
    if args.bf16 and args.fp16:
        errors.append(f"{path} enables both bf16 and fp16")
    if "scheduler" in cfg:
        errors.append(f"{path} defines a scheduler: remove it, the LR schedule comes from --lr/--min-lr/--lr-*")
    if "optimizer" in cfg:
        params = cfg["optimizer"].setdefault("params", {})
        for key, value in _optimizer_values_from_flags(args).items():
            if params.get(key) == AUTO:
                params[key] = value
        if "lr" in params and _number(params, "lr", path, errors) not in (None, float(args.lr)):
            errors.append(f"{path}: optimizer lr {params['lr']} contradicts --lr ({args.lr})")
    if cfg.get("gradient_clipping") not in (None, AUTO):
        clip = _number(cfg, "gradient_clipping", path, errors)
        if clip is not None and clip != float(args.clip_grad):
            errors.append(f"{path}: gradient_clipping {cfg['gradient_clipping']} contradicts --clip-grad "
                          f"({args.clip_grad})")
    cfg["gradient_clipping"] = float(args.clip_grad)
    cfg.setdefault("steps_per_print", 1 << 30)  # our own log line is enough
    left = [k for k in _autos_left(cfg) if not k.startswith("scheduler")]
    if left:
        errors.append(f"{path}: no flag fills {', '.join(left)} = \"auto\": give a value")
    args.deepspeed_config_dict = cfg
    return errors
