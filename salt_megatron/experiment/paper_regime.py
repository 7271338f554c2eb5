"""``salt-megatron experiment --preset paper-regime``: does SALT hold where the paper says it does?

The paper's regime: a teacher of about half the student's parameters, trained on the same corpus, tokenizer and
token budget (under one epoch), which the student overtakes during training.  In order, each stage skipped on a
rerun when its result exists:

1. the pre-registration (hypotheses, success criteria, variants, seeds, selection rules) is written to
   ``OUT/preregistration.md`` before any run, and copied verbatim into the report;
2. a learning-rate sweep per model (teacher, and baseline student on a seed outside the paired ones); each model
   trains at its best final validation loss;
3. the gate: the baseline student must pass the teacher after n_KD and end at least ``GATE_NATS`` below it, else
   the regime is not the paper's and no SALT run is made;
4. a token-weighting pilot on one more unpaired seed picks the weighting SALT + weighting uses;
5. the paired runs: baseline, SALT (step, n_KD = 17%), SALT auto, SALT + the weighting, RKD;
6. ``salt_megatron.experiment.paper_report`` computes the verdict against the pre-registered criteria.
"""

from __future__ import annotations

import os
import time

from salt_megatron.experiment.paper_report import (GATE_NATS, IN_VERDICT, MARGIN_NATS, N_KD, REACH_FRACTION,
                                                   REACH_SEEDS, final_loss, write_paper_report)
from salt_megatron.experiment.stages import atomic_json, prepare_data, pretrain_once, run_flags
from salt_megatron.errors import UsageError
from salt_megatron.files import write_text_atomically

SWEEP_SEED, PILOT_SEED = 101, 102  # unpaired seeds: choices are never made on the seeds the verdict uses
WEIGHTINGS = ("teacher_top1", "teacher_topk", "teacher_prob")

VARIANTS = {
    "baseline": "no teacher",
    "salt": "SALT: KD (ω0 = 0.5) for the first 17% of the steps, then plain training",
    "salt_auto": "SALT auto: KD from step 0 until the student's CE on the KD batches is within 0.05 nats of the "
                 "teacher's (20-step mean), at most 50% of the steps",
    "salt_weighted": "SALT with per-token ω (the pilot's best --kd-token-weighting), KD for the first 17%",
    "rkd": "RKD: KD for the whole run",
}


def kd_flags(name: str, p: dict, teacher: str, weighting: str | None = None) -> list[str]:
    iters = p["student_iters"]
    kd = ["--teacher-load", teacher, "--kd-weight", str(p["kd_weight"]), "--kd-temperature", "1.0"]
    n_kd = str(max(1, round(N_KD * iters)))
    return {
        "baseline": [],
        "salt": [*kd, "--kd-steps", n_kd],
        "salt_auto": [*kd, "--kd-steps", str(iters // 2), "--kd-transition", "auto", "--kd-auto-window", "20",
                      "--kd-auto-margin", "0.05"],
        "salt_weighted": [*kd, "--kd-steps", n_kd, "--kd-token-weighting", weighting or "teacher_topk"],
        "rkd": [*kd, "--kd-steps", str(iters)],
    }[name]


def preregistration(p: dict) -> str:
    iters = p["student_iters"]
    return "\n".join([
        "## Pre-registration",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, before any run of this experiment.",
        "",
        f"- Regime: teacher {p['teacher_layers']} x {p['teacher_hidden']}, student {p['student_layers']} x "
        f"{p['student_hidden']} (parameters in the report), both {iters} steps of {p['micro_batch']} x {p['seq']} "
        "tokens on the same SOTU training set and tokenizer, under one epoch.",
        f"- Learning rates: each model at the best final validation loss of the sweep {p['lr_sweep']} (student: "
        f"baseline runs on seed {SWEEP_SEED}, not a paired seed).",
        f"- Gate, checked before any SALT run: the baseline passes the teacher after n_KD = {round(N_KD * iters)} "
        f"steps (17%) and ends at least {GATE_NATS} nats below it; otherwise no SALT run is made.",
        f"- Token weighting: the one of {', '.join(WEIGHTINGS)} with the lowest final loss in a pilot on seed "
        f"{PILOT_SEED} (not a paired seed).",
        f"- Paired seeds 1..{p['seeds']}: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items())
        + f" (RKD on {p['rkd_seeds']} seeds, not part of the verdict).",
        "- H1 (SALT ends better): the mean paired difference of the final validation loss (SOTU held-out years), "
        f"variant − baseline of the same seed, is ≤ {MARGIN_NATS} nats with p < 0.05 (two-sided paired t-test).",
        f"- H2 (SALT gets there sooner): the variant reaches the baseline's final loss by {REACH_FRACTION:.0%} of "
        f"the steps in at least {REACH_SEEDS:.0%} of the seeds.",
        f"- A variant succeeds when H1 and H2 both hold; tested for {', '.join(IN_VERDICT)}.  Whatever the "
        "outcome, it is reported.",
    ])


def _lr_sweep(out, p, prefix, eval_flags) -> dict:
    runs = {"teacher": {}, "student": {}}
    for who in runs:
        for lr in p["lr_sweep"]:
            q = dict(p, **{f"{who}_lr": lr})
            seed = "1000" if who == "teacher" else str(SWEEP_SEED)
            d = os.path.join(out, "sweep", f"{who}-lr{lr:g}")
            print(f"[sweep] {who} lr {lr:g}", flush=True)
            runs[who][lr] = pretrain_once(d, ["--data-path", prefix, *run_flags(q, who, eval_flags),
                                               "--seed", seed], os.path.join(out, "sweep", f"{who}-lr{lr:g}.log"),
                                           variant=f"sweep-{who}", seed=int(seed), lr=lr)
    return runs


def gate(baseline: dict, teacher: dict, iters: int) -> dict:
    """Where the baseline's validation curve goes below the teacher's final loss, and the final gap."""
    from salt_megatron.experiment.analysis import curve, first_reach

    target = final_loss(teacher)
    cross = first_reach(*curve(baseline, "val_loss"), target)
    gap = target - final_loss(baseline)
    n_kd = round(N_KD * iters)
    return {"teacher_final": target, "baseline_final": final_loss(baseline), "cross_step": cross, "gap": gap,
            "n_kd": n_kd, "passed": cross is not None and cross > n_kd and gap >= GATE_NATS}


def run(p: dict, out: str, report_dir: str) -> str:
    started = time.time()
    prereg = os.path.join(out, "preregistration.md")
    if not os.path.exists(prereg):
        if os.path.isdir(os.path.join(out, "sweep")):
            raise UsageError(f"{out} holds runs but no pre-registration: use a fresh --out")
        write_text_atomically(prereg, preregistration(p) + "\n")
    prefix, shakespeare, data_facts = prepare_data(out, p)
    eval_flags = ["--eval-interval", str(p["eval_interval"]), "--eval-iters", str(p["eval_iters"]),
                  "--extra-valid-data-path", f"shakespeare={shakespeare}"]
    sweep = _lr_sweep(out, p, prefix, eval_flags)
    best = {who: min(runs, key=lambda lr: final_loss(runs[lr])) for who, runs in sweep.items()}
    teacher = sweep["teacher"][best["teacher"]]
    teacher_ckpt = os.path.join(out, "sweep", f"teacher-lr{best['teacher']:g}", "checkpoint")
    q = dict(p, student_lr=best["student"])
    g = gate(sweep["student"][best["student"]], teacher, p["student_iters"])
    atomic_json(os.path.join(out, "gate.json"), {**g, "lr": best})
    pilot, results, weighting = {}, [], None

    def student(name, seed, flags, where="runs"):
        d = os.path.join(out, where, f"{name}-seed{seed}")
        print(f"[{name} seed {seed}] ({time.time() - started:.0f} s so far)", flush=True)
        return pretrain_once(d, ["--data-path", prefix, *run_flags(q, "student", eval_flags),
                                  *flags, "--seed", str(seed)], os.path.join(d + ".log"), variant=name, seed=seed,
                              flags=flags)

    if g["passed"]:
        for w in WEIGHTINGS:
            pilot[w] = student(w, PILOT_SEED, kd_flags("salt_weighted", q, teacher_ckpt, w), where="pilot")
        weighting = min(WEIGHTINGS, key=lambda w: final_loss(pilot[w]))
        for seed in range(1, p["seeds"] + 1):
            for name in VARIANTS:
                if name != "rkd" or seed <= p["rkd_seeds"]:
                    results.append(student(name, seed, kd_flags(name, q, teacher_ckpt, weighting)))
    else:
        print(f"the gate failed ({g}): no SALT runs", flush=True)
    return write_paper_report(report_dir, p=q, prereg=open(prereg).read(), sweep=sweep, best=best, gate=g,
                              pilot=pilot, weighting=weighting, results=results, teacher=teacher,
                              data_facts=data_facts, variants=VARIANTS)
