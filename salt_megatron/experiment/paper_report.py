"""The paper-regime report: the pre-registration, the learning-rate sweep, the gate, the token-weighting pilot, and
the verdict of each variant against the pre-registered criteria (paired t-test, sign test, reach fraction)."""

from __future__ import annotations

import math
import os
import platform
import time

from salt_megatron.experiment.analysis import evaluation_windows, mean_std, summarise
from salt_megatron.experiment.report import _plot
from salt_megatron.experiment.stats import ALPHA, paired_test
from salt_megatron.files import write_text_atomically

# the pre-registered criteria (salt_megatron.experiment.paper_regime writes them down before any run)
N_KD = 0.17  # the paper's share of KD steps
GATE_NATS = 0.1  # the baseline must end this far below the teacher
MARGIN_NATS = -0.02  # H1: the mean paired final difference at most this, at p < 0.05
REACH_FRACTION, REACH_SEEDS = 0.85, 0.75  # H2: the baseline's final loss by 85% of the steps in 3/4 of the seeds
IN_VERDICT = ("salt", "salt_auto", "salt_weighted")


def final_loss(result: dict) -> float:
    return max(result["eval"], key=lambda r: r["step"])["val_loss"]


def parameters(layers: int, hidden: int, vocab: int) -> int:
    """Weights of a GPT with tied embeddings, RoPE, GELU MLP of 4x, LayerNorm (biases included)."""
    per_layer = 12 * hidden * hidden + 13 * hidden
    return layers * per_layer + vocab * hidden + 2 * hidden


def verdict(summary, iters: int) -> dict:
    """H1, H2 and the outcome of one variant from its paired differences and reach fractions."""
    t = paired_test(summary.paired_diff["val_loss"])
    reach = summary.reach_fraction["val_loss"]
    fast = sum(1 for f in reach if f is not None and f <= REACH_FRACTION)
    h1 = t is not None and t.n > 1 and t.p < ALPHA and t.mean <= MARGIN_NATS
    h2 = bool(reach) and fast >= REACH_SEEDS * len(reach)
    return {"test": t, "reached_fast": fast, "seeds": len(reach), "h1": h1, "h2": h2, "success": h1 and h2}


def write_paper_report(report_dir: str, *, p: dict, prereg: str, sweep: dict, best: dict, gate: dict, pilot: dict,
                       weighting: str | None, results: list, teacher: dict, data_facts: dict, variants: dict) -> str:
    os.makedirs(report_dir, exist_ok=True)
    iters = p["student_iters"]
    windows = evaluation_windows([*results, teacher, *pilot.values(), *sweep["student"].values()])
    params = {who: parameters(p[f"{who}_layers"], p[f"{who}_hidden"], p["vocab"]) for who in ("teacher", "student")}
    tokens = iters * p["micro_batch"] * p["seq"]
    train_tokens = data_facts["sotu"]["train"]["tokens"]
    lines = [
        "# Does SALT hold in the paper's regime?",
        "",
        f"Produced by `salt-megatron experiment --preset paper-regime` on {time.strftime('%Y-%m-%d')} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores); every number comes from the runs' `result.json`.",
        "",
        prereg.strip(),
        "",
        "## Setup as run",
        "",
        f"- Teacher {p['teacher_layers']} x {p['teacher_hidden']} ({params['teacher'] / 1e6:.2f}M parameters), "
        f"student {p['student_layers']} x {p['student_hidden']} ({params['student'] / 1e6:.2f}M): the teacher has "
        f"{params['teacher'] / params['student']:.2f}x the student's parameters.",
        f"- Both train {iters} steps x {p['micro_batch']} x {p['seq']} = {tokens:,} tokens on the SOTU training "
        f"set ({train_tokens:,} tokens: {tokens / train_tokens:.2f} epochs), vocabulary {p['vocab']}.",
        f"- Evaluation: the same {p['eval_iters']} x {p['micro_batch']} windows of {p['seq']} tokens per held-out "
        f"set for every run (`--eval-seed`; window hashes "
        + (", ".join(f"`{v}`" for v in windows.values()) or "not recorded") + f"), every {p['eval_interval']} steps.",
        "",
        "## Learning-rate sweep",
        "",
        "| model | " + " | ".join(f"lr {lr:g}" for lr in p["lr_sweep"]) + " | chosen |",
        "|---|" + "---|" * (len(p["lr_sweep"]) + 1),
        *[f"| {who} | " + " | ".join(f"{final_loss(sweep[who][lr]):.4f}" for lr in p["lr_sweep"])
          + f" | {best[who]:g} |" for who in ("teacher", "student")],
        "",
        "## Gate",
        "",
        f"Teacher final loss {gate['teacher_final']:.4f}; baseline (seed 101) final {gate['baseline_final']:.4f}, "
        + (f"below the teacher from step {gate['cross_step']:.0f}" if gate["cross_step"] is not None
           else "never below the teacher")
        + f"; n_KD = {gate['n_kd']}; final gap {gate['gap']:+.4f} nats.  "
        + ("**Passed**: the student overtakes the teacher after the KD phase and ends clearly better, the paper's "
           "regime." if gate["passed"] else "**Failed**: this is not the paper's regime, so no SALT run was made."),
    ]
    if gate["passed"]:
        lines += _results(p, pilot, weighting, results, variants, iters, report_dir)
    path = os.path.join(report_dir, "report.md")
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def _results(p, pilot, weighting, results, variants, iters, report_dir) -> list[str]:
    s = summarise(results, iters)
    _plot(results, [v for v in variants if v in s], report_dir, {}, iters)
    out = [
        "",
        "## Token-weighting pilot (seed 102)",
        "",
        "| weighting | final loss |",
        "|---|---|",
        *[f"| {w} | {final_loss(r):.4f} |" for w, r in pilot.items()],
        "",
        f"Chosen: `{weighting}`.",
        "",
        "## Results",
        "",
        "Final validation loss (SOTU held-out years), and the paired difference variant − baseline of the same "
        "seed with its paired t-test and sign test:",
        "",
        "| variant | seeds | final loss | paired diff | 95% CI | t (df) | p | sign test | reaches baseline by 85% "
        "| Shakespeare paired diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for v in variants:
        if v not in s:
            continue
        x = s[v]
        m, sd = mean_std(x.final["val_loss"])
        row = [v, str(len(x.seeds)), f"{m:.4f} ± {sd:.4f}" if math.isfinite(sd) else f"{m:.4f}"]
        if v == "baseline":
            row += ["—"] * 7
        else:
            verdicts[v] = d = verdict(x, iters)
            t = d["test"]
            shakespeare = paired_test(x.paired_diff["val_loss_shakespeare"])
            row += [f"{t.mean:+.4f}", f"[{t.ci[0]:+.4f}, {t.ci[1]:+.4f}]" if t.n > 1 else "—",
                    f"{t.t:.2f} ({t.df})" if t.n > 1 else "—", f"{t.p:.3g}" if t.n > 1 else "one seed",
                    f"lower in {t.negatives}/{t.n}, p = {t.sign_p:.3g}", f"{d['reached_fast']}/{d['seeds']}",
                    f"{shakespeare.mean:+.4f} (p = {shakespeare.p:.3g})" if shakespeare.n > 1 else
                    f"{shakespeare.mean:+.4f}"]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "![validation curves](curves.png)", "", "![paired differences](paired_differences.png)", "",
            "## Verdict against the pre-registered criteria", ""]
    for v in IN_VERDICT:
        if v in verdicts:
            d = verdicts[v]
            out.append(f"- **{v}**: H1 (mean paired difference ≤ {MARGIN_NATS} at p < {ALPHA}) "
                       f"{'holds' if d['h1'] else 'does not hold'} (mean {d['test'].mean:+.4f}, p = "
                       f"{d['test'].p:.3g}); H2 (baseline's final loss by {REACH_FRACTION:.0%} of the steps in ≥ "
                       f"{REACH_SEEDS:.0%} of the seeds) {'holds' if d['h2'] else 'does not hold'} "
                       f"({d['reached_fast']} of {d['seeds']}).  **{'Success' if d['success'] else 'No success'}.**")
    switches = [(r["seed"], next((t["step"] for t in r["train"] if t["kd_weight"] == 0), None))
                for r in results if r["variant"] == "salt_auto"]
    if switches:
        cap = iters // 2
        out.append("- SALT auto ran KD for " + ", ".join(
            f"{step - 1 if step else iters} steps{' (its cap: never caught up)' if step and step - 1 >= cap else ''} "
            f"(seed {seed})" for seed, step in switches)
            + f" of {iters}; the fixed schedule runs it for {round(N_KD * iters)}.")
    return out
