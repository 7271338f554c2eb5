"""What a checkpoint records about its run, compared on resume: a changed flag is refused, naming it, unless the
override for its group is given (Megatron-LM's ``--override-opt_param-scheduler`` is the model).

Groups, and what lets a resume change them:

* architecture, tokenizer: nothing (the weights would not fit);
* SALT schedule (teacher, ω, n_KD, transition, decay, τ, τ²): ``--override-salt-schedule``;
* data (training/validation blends and --split, seed, global batch size, KD-phase selection and its score sidecar):
  ``--override-data``;
* LR schedule (lr, min lr, warmup, decay iterations and style, weight decay): ``--override-opt_param-scheduler``
  (the flags win) or ``--use-checkpoint-opt_param-scheduler`` (the checkpoint wins, as Megatron-LM).

An override is logged and stored in every later checkpoint (``overrides`` in ``salt_meta.json``).
"""

from __future__ import annotations

from salt_megatron.errors import ResumeMismatch

ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_query_groups",
                "seq_length", "vocab_size", "padded_vocab_size", "normalization", "activation",
                "position_embedding_type", "untie_embeddings_and_output_weights")
GROUPS = {  # group -> (the override flag's dest, the record's keys)
    "SALT schedule": ("override_salt_schedule", ("teacher_fingerprint", "kd_weight", "kd_steps", "kd_transition",
                                                 "kd_decay_steps", "kd_temperature", "kd_no_temperature_squared",
                                                 "kd_auto_window", "kd_auto_margin", "kd_token_weighting",
                                                 "kd_token_topk")),
    "data": ("override_data", ("train_data", "valid_data", "split", "seed", "eval_seed", "global_batch_size",
                               "kd_data_selection", "kd_select_fraction", "kd_select_skip_fraction", "kd_select_by",
                               "score_sidecar")),
    "LR schedule": ("override_opt_param_scheduler", ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters",
                                                     "lr_decay_style", "weight_decay")),
}
# how a record key is named to the user: the flag that sets it
FLAG = {"teacher_fingerprint": "--teacher-load / --teacher-cache (the teacher's weights)",
        "train_data": "the training data", "valid_data": "the validation data",
        "score_sidecar": "the score sidecar (--kd-scored-data-path)"}


def _flag(key: str) -> str:
    return FLAG.get(key, "--" + key.replace("_", "-"))


def run_record(args, *, arch, tokenizer_hash: str, sources, teacher_fingerprint: list | None,
               sidecar_hash: str | None) -> dict:
    """What this run is, in the terms a resume is checked against (stored as ``run_record`` in each checkpoint)."""
    keys = GROUPS["SALT schedule"][1][1:]
    salt = {k: getattr(args, k) if args.teacher_load or args.teacher_cache else None for k in keys}
    selecting = args.kd_data_selection != "none"
    return {
        "architecture": {k: getattr(arch, k) for k in ARCHITECTURE},
        "tokenizer_hash": tokenizer_hash,
        "teacher_fingerprint": teacher_fingerprint, **salt,
        # one dataset: its absolute prefix (as before blends); a blend: [[weight, prefix], ...]
        "train_data": sources.train.record(), "valid_data": sources.valid and sources.valid.record(),
        "split": sources.split,
        "seed": args.seed, "eval_seed": args.eval_seed, "global_batch_size": args.global_batch_size,
        "kd_data_selection": args.kd_data_selection,
        **{k: getattr(args, k) if selecting else None
           for k in ("kd_select_fraction", "kd_select_skip_fraction", "kd_select_by")},
        "score_sidecar": sidecar_hash,
        **{k: getattr(args, k) for k in GROUPS["LR schedule"][1]},
    }


def _recorded(meta: dict) -> dict:
    """The record of a checkpoint; one written before records existed gives what its flags and arch say."""
    if "run_record" in meta:
        return meta["run_record"]
    flags = meta.get("args", {})
    record = {"architecture": meta.get("arch"), "tokenizer_hash": meta.get("tokenizer_hash")}
    for _, keys in GROUPS.values():
        record.update({k: flags[k] for k in keys if k in flags})
    if not (flags.get("teacher_load") or flags.get("teacher_cache")):  # as run_record: a baseline has no SALT settings
        record.update({k: None for k in GROUPS["SALT schedule"][1] if k in record})
    if flags.get("kd_data_selection", "none") == "none":
        record.update({k: None for k in ("kd_select_fraction", "kd_select_skip_fraction") if k in record})
    return record


def _shown(key: str, value) -> str:
    if key == "teacher_fingerprint":
        return "none (no teacher)" if value is None else "a model"
    return repr(value) if isinstance(value, str) else str(value)


def check_resume(meta: dict, current: dict, args) -> list[dict]:
    """Compare ``current`` (:func:`run_record`) with what checkpoint ``meta`` recorded.

    Raises :class:`ResumeMismatch` naming every changed flag of a group without its override; returns the
    overridden changes ``[{"group", "changes": {key: [checkpoint, now]}}]`` for the log and the next checkpoint.
    """
    saved, path = _recorded(meta), meta.get("path", "the checkpoint")
    arch_saved, arch_now = saved.get("architecture") or {}, current["architecture"]
    arch_changes = [f"{k} {arch_now[k]} (checkpoint: {arch_saved[k]})" for k in ARCHITECTURE
                    if k in arch_saved and arch_saved[k] != arch_now[k]]
    if arch_changes:
        raise ResumeMismatch(f"cannot resume from {path}: the model differs ({'; '.join(arch_changes)}); the "
                             "architecture, TP size and --make-vocab-size-divisible-by must match the checkpoint's")
    if saved.get("tokenizer_hash") not in (None, current["tokenizer_hash"]):
        raise ResumeMismatch(f"cannot resume from {path}: it was trained with another tokenizer")
    refused, overridden = [], []
    for group, (override, keys) in GROUPS.items():
        changes = {k: [saved[k], current[k]] for k in keys if k in saved and saved[k] != current[k]}
        if not changes:
            continue
        if getattr(args, override, False) or (group == "LR schedule" and args.use_checkpoint_opt_param_scheduler):
            overridden.append({"group": group, "changes": changes})
            continue
        listed = "; ".join(f"{_flag(k)} {_shown(k, now)} (checkpoint: {_shown(k, then)})"
                           for k, (then, now) in changes.items())
        refused.append(f"{group}: {listed} [--{override.replace('_', '-').replace('opt-param', 'opt_param')} "
                       "accepts the change]")
    if refused:
        raise ResumeMismatch(f"cannot resume from {path} with other settings than it was saved with: "
                             + " | ".join(refused))
    return overridden
