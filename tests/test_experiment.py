"""The reproduction experiment: its numbers (paired differences, steps and time to the baseline's loss), its plan,
the second held-out corpus, and one end-to-end run of the tiny preset that is resumed by skipping finished runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from salt_megatron.data.corpora import _markdown_to_text, shakespeare_plays
from salt_megatron.experiment import analysis
from salt_megatron.experiment.run import PRESETS, VARIANTS, planned_runs


def _result(variant, seed, sotu, shakespeare, step_times, teacher_steps=0):
    """A result.json as the runner writes it: evaluations every 10 steps, one train row per step."""
    steps = [10 * i for i in range(len(sotu))]
    return {
        "variant": variant, "seed": seed,
        "eval": [{"step": s, "val_loss": a, "val_loss_shakespeare": b} for s, a, b in zip(steps, sotu, shakespeare)],
        "train": [{"step": i + 1, "step_time_s": t, "teacher_ran": i < teacher_steps} for i, t in
                  enumerate(step_times)],
    }


def test_first_reach_interpolates_between_evaluations():
    steps, losses = np.array([0.0, 10, 20, 30]), np.array([8.0, 6.0, 5.0, 4.0])
    assert analysis.first_reach(steps, losses, 5.5) == pytest.approx(15.0)
    assert analysis.first_reach(steps, losses, 4.0) == pytest.approx(30.0)
    assert analysis.first_reach(steps, losses, 9.0) == 0.0
    assert analysis.first_reach(steps, losses, 3.9) is None


def test_summarise_pairs_each_variant_with_the_baseline_of_its_seed():
    flat = [1.0] * 30
    results = [
        _result("baseline", 1, [8, 6, 5, 4.0], [9, 7, 6, 5.0], flat),
        _result("baseline", 2, [8, 6, 5, 4.2], [9, 7, 6, 5.2], flat),
        # seed 1: reaches the baseline's final 4.0 at step 25 (between 4.5 at 20 and 3.5 at 30)
        _result("salt", 1, [8, 5.5, 4.5, 3.5], [9, 7, 6, 5.1], [2.0] * 10 + [1.0] * 20, teacher_steps=10),
        # seed 2 never gets to its baseline's 4.2; seed 3 has no baseline and is not paired
        _result("salt", 2, [8, 6, 5, 4.3], [9, 7, 6, 5.0], [2.0] * 10 + [1.0] * 20, teacher_steps=10),
        _result("salt", 3, [8, 6, 5, 3.0], [9, 7, 6, 5.0], [2.0] * 10 + [1.0] * 20, teacher_steps=10),
    ]
    s = analysis.summarise(results, iters=30)
    salt = s["salt"]
    assert salt.seeds == [1, 2, 3]
    assert salt.paired_diff["val_loss"] == pytest.approx([-0.5, 0.1])
    assert salt.paired_diff["val_loss_shakespeare"] == pytest.approx([0.1, -0.2])
    assert salt.reach_fraction["val_loss"][0] == pytest.approx(25 / 30)
    assert salt.reach_fraction["val_loss"][1] is None
    # 10 teacher steps of 2 s + 15 plain steps of 1 s to reach it; the baseline takes 30 plain steps of 1 s
    assert salt.time_to_baseline_s[0] == pytest.approx(35.0)
    assert salt.saved_fraction[0] == pytest.approx(1 - 35 / 30)
    assert salt.kd_step_s == 2.0 and salt.lm_step_s == 1.0
    assert s["baseline"].paired_diff["val_loss"] == [0.0, 0.0]


def test_time_saved_is_measured_within_the_variants_own_run():
    """A run on a machine twice as loaded (every step 2x) saves the same share: the baseline's 30 plain steps are
    timed in the variant's own run; RKD, without plain steps, takes its baseline's."""
    base = _result("baseline", 1, [8, 6, 5, 4.0], [9, 7, 6, 5.0], [1.0] * 30)
    slow = _result("salt", 1, [8, 5.5, 4.5, 3.5], [9, 7, 6, 5.1], [4.0] * 10 + [2.0] * 20, teacher_steps=10)
    rkd = _result("rkd", 1, [8, 5.5, 4.5, 3.5], [9, 7, 6, 5.1], [1.5] * 30, teacher_steps=30)
    s = analysis.summarise([base, slow, rkd], iters=30)
    assert s["salt"].saved_fraction[0] == pytest.approx(1 - 70 / 60)  # 10 x 4 s + 15 x 2 s vs 30 x 2 s
    assert s["rkd"].saved_fraction[0] == pytest.approx(1 - 25 * 1.5 / 30)


def test_the_cache_savings_come_from_the_step_ratios_of_the_runs():
    """Online runs: KD steps 1.5x their plain steps; cached runs: 1.1x (KD rows with ω > 0 and no teacher).  Six
    cached KD steps at a 2 s baseline plain step save 6 x 0.4 x 2 = 4.8 s; the caches took 3 s to write."""
    from salt_megatron.experiment.cache_quality import cache_savings_lines

    def run(flag, kd_time, plain_time, n_kd=3, n=6):
        rows = [{"step": i + 1, "step_time_s": kd_time if i < n_kd else plain_time, "teacher_ran": flag == "load"
                 and i < n_kd, "kd_weight": 0.5 if i < n_kd else 0.0} for i in range(n)]
        return {"flags": [f"--teacher-{flag}", "x"], "train": rows}

    results = [run("load", 3.0, 2.0), run("load", 1.5, 1.0), run("cache", 2.2, 2.0), run("cache", 1.1, 1.0)]
    lines = cache_savings_lines(results, {1: {"seconds": 1.0, "bytes": 2e6}, 2: {"seconds": 2.0, "bytes": 1e6}}, 2.0)
    assert "seeds 1, 2, 3 s of `cache-teacher` in all (3.0 MB), read by 2 students for 6 KD-phase steps" in lines[0]
    assert "running 1.500 (2 runs), from a cache 1.100 (2 runs)" in lines[1]
    assert "saved 5 s of training; with the writing counted, +2 s: the caches paid for themselves" in lines[1]
    assert "not measured" in cache_savings_lines(results[2:], {1: {"seconds": 1.0, "bytes": 1}}, 2.0)[1]
    assert "one for seed 1, 1 s of" in cache_savings_lines(results, {1: {"seconds": 1.0, "bytes": 1}}, 2.0)[0]


def test_step_times_are_per_kind_medians():
    noisy = [1.0, 1.0, 9.0, 1.0, 3.0, 3.0, 3.0]  # one slow plain step (machine load) must not count
    r = _result("salt", 1, [1.0], [1.0], noisy, teacher_steps=0)
    assert analysis.train_seconds(r) == pytest.approx(3.0 * 7)
    r = _result("salt", 1, [1.0], [1.0], [2.0, 2.0, 50.0, 1.0, 1.0], teacher_steps=3)
    assert analysis.train_seconds(r) == pytest.approx(2 * 3 + 1 * 2)


def test_mean_curves_of_paired_differences():
    results = [_result("baseline", s, [8, 6, 4.0 + s / 10], [9, 7, 5.0], [1.0]) for s in (1, 2)]
    results += [_result("v", s, [8, 5.8, 3.9 + s / 10], [9, 7, 5.0], [1.0]) for s in (1, 2)]
    steps, mean, sd, n = analysis.mean_curves(results, "v", "val_loss", minus_baseline=True)
    assert n == 2 and list(steps) == [0, 10, 20]
    assert mean == pytest.approx([0.0, -0.2, -0.1])
    assert sd == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("diffs", [[-0.05, -0.06, -0.04], [0.05, 0.061, 0.04, 0.2], [-0.05, 0.04, -0.02],
                                   [-0.031, -0.012, 0.004, -0.02, -0.025, -0.018], [0.3, -0.2]])
def test_paired_statistics_match_scipy(diffs):
    stats = pytest.importorskip("scipy.stats")
    from salt_megatron.experiment.stats import paired_test

    got = paired_test(diffs)
    want = stats.ttest_1samp(diffs, 0.0)
    assert got.df == len(diffs) - 1 and got.t == pytest.approx(want.statistic, rel=1e-9)
    assert got.p == pytest.approx(want.pvalue, rel=1e-7)
    ci = want.confidence_interval(0.95)
    assert got.ci == pytest.approx((ci.low, ci.high), rel=1e-7)
    negatives, positives = sum(x < 0 for x in diffs), sum(x > 0 for x in diffs)
    assert got.sign_p == pytest.approx(stats.binomtest(negatives, negatives + positives, 0.5).pvalue, rel=1e-12)
    assert got.verdict == ("no significant difference" if want.pvalue >= 0.05 else
                           "better" if got.mean < 0 else "worse")


def test_one_seed_gets_no_verdict():
    from salt_megatron.experiment.stats import paired_test

    assert paired_test([-0.3]).verdict == "single seed: no verdict" and paired_test([]) is None
    assert math.isnan(analysis.mean_std([1.0])[1])


def test_the_default_plan_has_the_issues_seed_counts_seed_major():
    plan = planned_runs(PRESETS["default"], list(VARIANTS))
    counts = {v: sum(1 for name, _ in plan if name == v) for v in VARIANTS}
    assert counts == {"baseline": 5, "salt_step20": 5, "salt_ds": 3, "rkd": 1, "salt_step10": 1, "salt_step40": 1,
                      "salt_linear": 1}
    assert [s for _, s in plan] == sorted(s for _, s in plan)  # all of seed 1 first
    assert {v for v, s in plan if s == 1} == set(VARIANTS)


def test_shakespeare_markdown_becomes_plain_script_text():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n"
    assert _markdown_to_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n"
    plays = shakespeare_plays()
    assert len(plays) >= 30 and sum(len(p["text"]) for p in plays) > 3_000_000
    hamlet = next(p for p in plays if p["title"] == "hamlet")
    assert "To be, or not to be" in hamlet["text"] and "**" not in hamlet["text"]


def _experiment(out, *extra):
    cmd = [sys.executable, "-m", "salt_megatron.cli", "experiment", "--preset", "tiny", "--out", str(out),
           "--variants", "salt_step20", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_tiny_experiment_with_a_shared_teacher_cache_then_resumes_by_skipping(tmp_path):
    """One run of the tiny preset (it takes minutes, so one run proves both things):
    - --teacher-cache-topk: seed 1 has two students that read its ordinary KD windows (SALT 20% and RKD), so one
      cache serves both and neither runs the teacher; seed 2 has one (SALT 20%), which runs the teacher.  The report
      accounts for the cache.
    - a rerun skips the finished runs and starts a killed one (no result.json) over; another preset or another cache
      setting in the same directory is refused."""
    out = tmp_path / "exp"
    first = _experiment(out, "rkd", "--teacher-cache-topk", "8")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(os.listdir(out / "runs")) == ["baseline-seed1", "baseline-seed2", "rkd-seed1", "salt_step20-seed1",
                                                "salt_step20-seed2"]
    assert sorted(os.listdir(out / "caches")) == ["seed1-k8.cost.json", "seed1-k8.ids.npy", "seed1-k8.json",
                                                  "seed1-k8.log", "seed1-k8.logprobs.npy", "seed1-k8.rest.npy",
                                                  "seed1-k8.windows.npy"]
    runs = {name: json.loads((out / "runs" / name / "result.json").read_text())
            for name in ("salt_step20-seed1", "rkd-seed1", "salt_step20-seed2")}
    iters = PRESETS["tiny"]["student_iters"]
    for name in runs:
        assert {"val_loss", "val_loss_shakespeare"} <= set(runs[name]["eval"][-1])
        assert runs[name]["eval"][-1]["step"] == iters
    for name, kd in (("salt_step20-seed1", round(0.2 * iters)), ("rkd-seed1", iters)):
        assert "--teacher-cache" in runs[name]["flags"] and "--teacher-load" not in runs[name]["flags"]
        assert not any(r["teacher_ran"] for r in runs[name]["train"])
        assert sum(r["kd_weight"] > 0 for r in runs[name]["train"]) == kd
    assert sum(r["teacher_ran"] for r in runs["salt_step20-seed2"]["train"]) == round(0.2 * iters)
    report = (out / "report" / "report.md").read_text()
    assert "| salt_step20 | 2 |" in report and (out / "report" / "curves.png").stat().st_size > 10_000
    assert f"read by 2 students for {round(0.2 * iters) + iters} KD-phase steps that ran no teacher" in report
    assert "with the writing counted" in report and "--teacher-cache-topk 8" in report
    # a killed run (no result.json) starts over; finished ones are skipped
    os.remove(out / "runs" / "salt_step20-seed2" / "result.json")
    before = (out / "runs" / "baseline-seed1" / "result.json").stat().st_mtime_ns
    second = _experiment(out, "rkd", "--teacher-cache-topk", "8")
    assert second.returncode == 0, second.stdout[-3000:]
    assert second.stdout.count("finished earlier") == 4
    assert "[salt_step20 seed 2]" in second.stdout
    assert (out / "runs" / "baseline-seed1" / "result.json").stat().st_mtime_ns == before
    assert (out / "runs" / "salt_step20-seed2" / "result.json").exists()
    # another preset, or another cache setting, in the same directory is refused
    third = subprocess.run([sys.executable, "-m", "salt_megatron.cli", "experiment", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert third.returncode != 0 and "another preset" in third.stderr
    other = _experiment(out, "rkd")
    assert other.returncode != 0 and "--teacher-cache-topk 8" in other.stderr


def test_the_paper_regime_gate_and_verdict():
    from salt_megatron.experiment.paper_regime import gate, preregistration
    from salt_megatron.experiment.paper_report import verdict

    teacher = _result("teacher", 1000, [8.0, 6.0, 5.0, 4.9], [9.0] * 4, [1.0])
    late = _result("baseline", 101, [8.0, 6.5, 5.2, 4.7], [9.0] * 4, [1.0])  # below 4.9 between steps 20 and 30
    g = gate(late, teacher, iters=30)
    assert g["cross_step"] == pytest.approx(20 + 0.3 / 0.5 * 10) and g["gap"] == pytest.approx(0.2) and g["passed"]
    assert not gate(_result("baseline", 101, [8.0, 4.8, 4.8, 4.85], [9.0] * 4, [1.0]), teacher, 30)["passed"]
    early = _result("baseline", 101, [8.0, 4.85, 4.8, 4.75], [9.0] * 4, [1.0])  # passes it inside the KD phase
    assert gate(early, teacher, iters=200)["cross_step"] < round(0.17 * 200) and not gate(early, teacher, 200)["passed"]
    base = [_result("baseline", s, [8.0, 6.0, 5.0, 4.0 + s / 100], [9.0] * 4, [1.0]) for s in range(1, 7)]
    better = [_result("salt", s, [8.0, 5.5, 4.0, 3.96 + s / 100], [9.0] * 4, [1.0]) for s in range(1, 7)]
    tied = [_result("tied", s, [8.0, 6.0, 5.0, 4.0 + s / 100 + (0.01 if s % 2 else -0.01)], [9.0] * 4, [1.0])
            for s in range(1, 7)]
    s = analysis.summarise(base + better + tied, iters=30)
    good, none = verdict(s["salt"], 30), verdict(s["tied"], 30)
    assert good["h1"] and good["h2"] and good["success"] and good["test"].mean == pytest.approx(-0.04)
    assert not none["h1"] and not none["success"]
    text = preregistration(dict(PRESETS["paper-regime"], student_lr=None))
    assert "H1" in text and "p < 0.05" in text and "seed 101" in text


def test_the_teacher_cache_report_computes_its_numbers_from_the_runs(tmp_path):
    from salt_megatron.experiment.cache_quality import write_cache_report

    p = dict(PRESETS["teacher-cache"])
    finals = {"online": [4.0, 4.2, 4.1], "cache_k64": [4.01, 4.22, 4.12], "cache_k16": [4.1, 4.3, 4.2]}
    results = []
    for name, values in finals.items():
        for seed, final in enumerate(values, 1):
            step0 = 7.0 + (0.05 if name == "cache_k16" else 0.0)  # the KD term's error at step 0, times ω = 0.5
            train = [{"step": i, "loss": step0 if i == 0 else 5.0, "kd_weight": 0.5 if i < 2 else 0.0,
                      "step_time_s": 0.2 if i >= 2 else (0.3 if name == "online" else 0.22),
                      "teacher_ran": name == "online" and i < 2}
                     for i in range(4)]
            results.append({"variant": name, "seed": seed, "wall_s": 100.0 if name == "online" else 80.0,
                            "train": train, "eval": [{"step": 4, "val_loss": final, "val_loss_shakespeare": 5.0,
                                                      "val_windows": "abc"}]})
    caches = {(s, k): {"seconds": 10.0, "bytes": 1} for s in (1, 2, 3) for k in (64, 16)}
    teacher = {"eval": [{"step": 4, "val_loss": 4.5, "val_windows": "abc"}]}
    report = open(write_cache_report(str(tmp_path), p=p, n_kd=2, teacher=teacher, results=results,
                                     caches=caches)).read()
    assert "| top-64 | +0.0167 |" in report and "| top-16 | +0.1000 |" in report
    assert "| 1.00e-01 nats |" in report and "| 0.00e+00 nats |" in report  # 0.05 / ω
    # KD-phase ÷ plain step inside each run: online 0.3 / 0.2, cached 0.22 / 0.2
    assert "| online | 1.500 | 300.0 ms | 100.0 s | — | — |" in report
    assert "| cache_k64 | 1.100 | 220.0 ms | 80.0 s | 10.0 s | 388 (dense fp16: 4096) |" in report
    # (1.5 - 1.1) x 200 ms = 80 ms a KD step, 0.16 s over 2 KD steps: 10 s of writing pays back at the 63rd student
    assert "costs 80 ms less than with the running teacher (at the online runs' plain step, 200 ms): 0.2 s over " \
           "the 2 KD steps of one student; writing it (10.0 s, process start included) is paid back once 63 " \
           "students of a seed read it" in report
