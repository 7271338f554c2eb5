"""The stages every experiment preset is made of: the data (SOTU and Shakespeare, one tokenizer) and one
``pretrain`` run that is skipped when its ``result.json`` exists (a killed experiment resumes; an unfinished run
starts over)."""

from __future__ import annotations

import json
import os
import shutil

from salt_megatron.demo import cli_command, model_flags, read_metrics, run_stage
from salt_megatron.files import write_text_atomically


def atomic_json(path: str, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=1))


def prepare_data(out: str, p: dict) -> tuple[str, str, dict]:
    """SOTU (train + held-out years) and Shakespeare with SOTU's tokenizer; returns prefixes and data facts."""
    from salt_megatron.data.corpora import export_shakespeare, export_sotu

    prefix = os.path.join(out, "data", "sotu")
    shakespeare = os.path.join(out, "data", "shakespeare")
    cost_file = os.path.join(out, "data", "cost.json")
    if not os.path.exists(cost_file):
        seconds = 0.0
        if not os.path.exists(prefix + "_valid.idx"):
            train_jsonl, valid_jsonl = export_sotu(os.path.join(out, "text"))
            seconds += run_stage([*cli_command(), "prepare", "--input", train_jsonl, "--valid-input", valid_jsonl,
                                  "--output-prefix", prefix, "--vocab-size", str(p["vocab"]), "--workers", "2"],
                                 os.path.join(out, "prepare_sotu.log"))
        if not os.path.exists(shakespeare + "_train.idx"):
            jsonl = export_shakespeare(os.path.join(out, "text"))
            seconds += run_stage([*cli_command(), "prepare", "--input", jsonl, "--output-prefix", shakespeare,
                                  "--tokenizer-model", prefix + ".model", "--workers", "2"],
                                 os.path.join(out, "prepare_shakespeare.log"))
        atomic_json(cost_file, {"prepare_s": seconds})
    facts = {}
    for name, path in (("sotu", prefix), ("shakespeare", shakespeare)):
        with open(path + ".json") as f:
            facts[name] = json.load(f)
    return prefix, shakespeare + "_train", facts


def run_flags(p: dict, who: str, eval_flags: list[str]) -> list[str]:
    return [*model_flags(p, who, log_interval=max(10, p[f"{who}_iters"] // 20)), *eval_flags]


def _train_rows(metrics: dict) -> list[dict]:
    return [{k: r[k] for k in ("step", "step_time_s", "kd_weight", "teacher_ran", "loss", "ce")}
            for r in metrics["train"]]


def pretrain_once(run_dir: str, pretrain_args: list[str], log: str, **fields) -> dict:
    """``pretrain`` into ``run_dir`` (checkpoint, metrics) unless its ``result.json`` exists; an unfinished run
    starts over.  The result: ``fields``, the command's wall-clock, the evaluations and the per-step rows."""
    result_file = os.path.join(run_dir, "result.json")
    if not os.path.exists(result_file):
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        seconds = run_stage([*cli_command(), "pretrain", *pretrain_args, "--save", os.path.join(run_dir, "checkpoint"),
                             "--metrics-file", metrics], log)
        m = read_metrics(metrics)
        atomic_json(result_file, {**fields, "wall_s": seconds, "eval": m["eval"], "train": _train_rows(m)})
    with open(result_file) as f:
        return json.load(f)


def write_teacher_cache(out: str, p: dict, prefix: str, teacher_ckpt: str, seed: int, k: int,
                        n_kd: int) -> tuple[str, dict]:
    """The top-``k`` cache of seed ``seed``'s first ``n_kd`` steps of windows (``cache-teacher --windows kd``); its
    path and cost (``seconds`` of the whole command, ``bytes``), kept for reruns."""
    from salt_megatron.data.teacher_cache import cache_paths

    path = os.path.join(out, "caches", f"seed{seed}-k{k}")
    cost = path + ".cost.json"
    if not os.path.exists(cost):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        seconds = run_stage([*cli_command(), "cache-teacher", "--load", teacher_ckpt, "--data-path", prefix,
                             "--seq-length", str(p["seq"]), "--topk", str(k), "--kd-steps", str(n_kd),
                             "--global-batch-size", str(p["micro_batch"]), "--seed", str(seed),
                             "--micro-batch-size", str(p["micro_batch"]), "--cache-path", path, "--no-progress"],
                            path + ".log")
        arrays = [q for name, q in cache_paths(path).items() if name not in ("header", "partial")]
        atomic_json(cost, {"seconds": seconds, "bytes": sum(os.path.getsize(q) for q in arrays), "kd_steps": n_kd})
    with open(cost) as f:
        return path, json.load(f)
