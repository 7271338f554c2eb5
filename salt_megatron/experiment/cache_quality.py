"""``salt-megatron experiment --preset teacher-cache``: does a student distilled from the teacher's cached top-K
end where one distilled from the running teacher ends, and what does the cache save?

Per paired seed, three SALT students that differ only in where the teacher's distribution comes from: the running
teacher (``--teacher-load``), and top-64 and top-16 caches (``--teacher-cache``).  A cache holds the windows of one
seed's KD phase (``cache-teacher --windows kd``; windows are those of the seed's one-epoch GPTDataset), so each seed
writes its own, which every student of that seed could share.  Reported: final validation losses, their paired
differences to the online student (t-test, CI), the KD value's approximation error at step 0 (same weights, same
batch), step times and wall-clock with the cache's writing counted, and the bytes the cache takes.
"""

from __future__ import annotations

import math
import os
import statistics

from salt_megatron.experiment.analysis import is_kd_step, plain_step_seconds
from salt_megatron.experiment.stages import prepare_data, pretrain_once, run_flags, write_teacher_cache
from salt_megatron.files import write_text_atomically

KS = (64, 16)
VARIANTS = {"online": "SALT, the teacher run at every KD step", **{
    f"cache_k{k}": f"SALT from the teacher's cached top-{k} (+ one bucket for the rest of its mass)" for k in KS}}


def run(p: dict, out: str, report_dir: str) -> str:
    prefix, shakespeare, _ = prepare_data(out, p)
    eval_flags = ["--eval-interval", str(p["eval_interval"]), "--eval-iters", str(p["eval_iters"]),
                  "--extra-valid-data-path", f"shakespeare={shakespeare}"]
    teacher = pretrain_once(os.path.join(out, "teacher"), ["--data-path", prefix, *run_flags(p, "teacher", eval_flags),
                                                           "--seed", "1000"], os.path.join(out, "teacher.log"))
    teacher_ckpt = os.path.join(out, "teacher", "checkpoint")
    n_kd = max(1, round(p["kd_fraction"] * p["student_iters"]))
    kd = ["--kd-steps", str(n_kd), "--kd-weight", str(p["kd_weight"]), "--kd-temperature", str(p["kd_temperature"])]
    results, caches = [], {}
    for seed in range(1, p["seeds"] + 1):
        for name in VARIANTS:
            if name == "online":
                flags = ["--teacher-load", teacher_ckpt, *kd]
            else:
                k = int(name.removeprefix("cache_k"))
                path, caches[(seed, k)] = write_teacher_cache(out, p, prefix, teacher_ckpt, seed, k, n_kd)
                flags = ["--teacher-cache", path, *kd]
            d = os.path.join(out, "runs", f"{name}-seed{seed}")
            print(f"[{name} seed {seed}] {VARIANTS[name]}", flush=True)
            results.append(pretrain_once(d, ["--data-path", prefix, *run_flags(p, "student", eval_flags), *flags,
                                             "--seed", str(seed)], d + ".log", variant=name, seed=seed,
                                         flags=flags))
    return write_cache_report(report_dir, p=p, n_kd=n_kd, teacher=teacher, results=results, caches=caches)


def _final(result: dict, key: str = "val_loss") -> float:
    return max(result["eval"], key=lambda r: r["step"])[key]


def _kd_step_ms(result: dict) -> float:
    return 1e3 * statistics.median(r["step_time_s"] for r in result["train"] if r["kd_weight"] > 0)


def write_cache_report(report_dir: str, *, p: dict, n_kd: int, teacher: dict, results: list, caches: dict) -> str:
    from salt_megatron.data.teacher_cache import bytes_per_token
    from salt_megatron.experiment.analysis import evaluation_windows
    from salt_megatron.experiment.stats import paired_test

    evaluation_windows([*results, teacher])  # refuses runs evaluated on different windows
    by = {(r["variant"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    lines = ["# The offline teacher: cached top-K against the running teacher", "",
             "Command: `salt-megatron experiment --preset teacher-cache` (this CPU, 2 cores).", "",
             f"- Teacher: {p['teacher_layers']} x {p['teacher_hidden']}, {p['teacher_iters']} steps; students: "
             f"{p['student_layers']} x {p['student_hidden']}, {p['student_iters']} steps of {p['micro_batch']} x "
             f"{p['seq']} tokens, vocabulary {p['vocab']}; SALT with ω = {p['kd_weight']}, τ = {p['kd_temperature']}, "
             f"KD for the first {n_kd} steps ({p['kd_fraction']:.0%}).",
             f"- Per seed, the same student initialisation and data order in all three variants; {len(seeds)} seeds.",
             "", "## Final validation loss (SOTU held-out years; Shakespeare in brackets)", "",
             "| seed | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for s in seeds:
        cells = [f"{_final(by[(v, s)]):.4f} ({_final(by[(v, s)], 'val_loss_shakespeare'):.4f})"
                 if (v, s) in by else "—" for v in VARIANTS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired difference to the online teacher's student (cached − online, same seed)", "",
              "| cache | mean | 95% CI | p (t-test) | verdict | |KD − KD online| at step 0 |",
              "|---|---|---|---|---|---|"]
    for k in KS:
        name = f"cache_k{k}"
        pairs = [s for s in seeds if (name, s) in by and ("online", s) in by]
        t = paired_test([_final(by[(name, s)]) - _final(by[("online", s)]) for s in pairs])
        err = max(abs(by[(name, s)]["train"][0]["loss"] - by[("online", s)]["train"][0]["loss"]) for s in pairs) \
            / p["kd_weight"]
        if t is not None:
            ci = "—" if t.n < 2 else f"[{t.ci[0]:+.4f}, {t.ci[1]:+.4f}]"
            lines.append(f"| top-{k} | {t.mean:+.4f} | {ci} | {t.p:.2f} | {t.verdict} | {err:.2e} nats |")
    lines += ["", "The step-0 KD error: the students of one seed start from the same weights and read the same first "
              "batch, so their first losses differ only by the KD term's approximation (ω x the KD difference).", "",
              "## Cost", "",
              "| variant | KD-phase step ÷ plain step, same run (median over seeds) | KD-phase step (median) | "
              "run wall-clock (mean) | cache writing | bytes per token |", "|---|---|---|---|---|---|"]
    ratio = {name: statistics.median(_kd_over_plain(by[(name, s)]) for s in seeds if (name, s) in by)
             for name in VARIANTS}
    for name in VARIANTS:
        runs = [by[(name, s)] for s in seeds if (name, s) in by]
        k = None if name == "online" else int(name.removeprefix("cache_k"))
        writing = "—" if k is None else f"{statistics.mean(caches[(s, k)]['seconds'] for s in seeds):.1f} s"
        size = "—" if k is None else f"{bytes_per_token(k)} (dense fp16: {2 * p['vocab']})"
        lines.append(f"| {name} | {ratio[name]:.3f} | {statistics.median(_kd_step_ms(r) for r in runs):.1f} ms | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.1f} s | {writing} | {size} |")
    plain_s = statistics.median(plain_step_seconds(by[("online", s)], by[("online", s)]) for s in seeds)
    lines += ["", "The wall-clock column includes process start, the teacher's loading, evaluation and whatever else "
              "ran on the machine during that run; the saving below is measured inside each run instead (KD-phase "
              "step ÷ plain step), so load that differs between runs does not enter it."]
    for k in KS:
        per_step = (ratio["online"] - ratio[f"cache_k{k}"]) * plain_s
        saved = n_kd * per_step
        writing = statistics.mean(caches[(s, k)]["seconds"] for s in seeds)
        payback = (f"writing it ({writing:.1f} s, process start included) is paid back once "
                   f"{math.ceil(writing / saved)} students of a seed read it" if saved > 0 else
                   "the cache saves nothing here")
        lines.append(f"\nTop-{k}: a KD-phase step from the cache costs {per_step * 1e3:.0f} ms less than with the "
                     f"running teacher (at the online runs' plain step, {plain_s * 1e3:.0f} ms): {saved:.1f} s over "
                     f"the {n_kd} KD steps of one student; {payback}.")
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, "report.md")
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def _kd_over_plain(result: dict) -> float | None:
    """Median KD-phase step ÷ median plain step, both in this run (None without either kind)."""
    kd = [r["step_time_s"] for r in result["train"] if is_kd_step(r)]
    if not kd or all(is_kd_step(r) for r in result["train"]):
        return None
    return statistics.median(kd) / plain_step_seconds(result, result)


def cache_savings_lines(results: list[dict], caches: dict, plain_step_s: float) -> list[str]:
    """The report's account of ``experiment --teacher-cache-topk``: what the per-seed caches cost, and the training
    time they saved, from the KD-phase/plain step ratios of the runs that read them against those that ran the
    teacher, at ``plain_step_s`` (the baseline's median plain step).  ``caches``: seed → cache-teacher's cost."""
    cached = [r for r in results if "--teacher-cache" in r.get("flags", [])]
    online = [r for r in results if "--teacher-load" in r.get("flags", [])]
    writing = sum(c["seconds"] for c in caches.values())
    steps = sum(is_kd_step(t) for r in cached for t in r["train"])
    seeds = sorted(caches)
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"each of seeds {', '.join(map(str, seeds))}"
    lines = [f"Teacher caches (`--teacher-cache-topk`): one for {which}, "
             f"{writing:.0f} s of `cache-teacher` in all ({sum(c['bytes'] for c in caches.values()) / 1e6:.1f} MB), "
             f"read by {len(cached)} students for {steps} KD-phase steps that ran no teacher."]
    ratios = {name: [x for x in map(_kd_over_plain, runs) if x is not None]
              for name, runs in (("online", online), ("cached", cached))}
    if not ratios["online"] or not ratios["cached"]:
        return lines + ["No run here has both a running teacher and plain steps (or none read a cache with plain "
                        "steps to compare): the time saved is not measured."]
    a, b = statistics.median(ratios["online"]), statistics.median(ratios["cached"])
    saved = steps * (a - b) * plain_step_s
    verdict = "the caches paid for themselves" if saved > writing else "the caches did not pay for themselves here"
    return lines + [
        f"KD-phase step ÷ plain step of the same run (medians): with the teacher running {a:.3f} "
        f"({len(ratios['online'])} runs), from a cache {b:.3f} ({len(ratios['cached'])} runs).  At the baseline's "
        f"plain step ({plain_step_s * 1e3:.0f} ms) the cached steps saved {saved:.0f} s of training; with the writing "
        f"counted, {saved - writing:+.0f} s: {verdict}."]
