"""The numbers of the reproduction report, from the runs' ``result.json`` files (no plotting, no files).

Variants are compared with the baseline *of the same seed* (same student initialisation and data order): the
paired difference removes most of the seed-to-seed noise, which at this scale is as large as the effect.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# the held-out sets every run evaluates: metric key → label
EVAL_SETS = {
    "val_loss": "SOTU, held-out years (1990-)",
    "val_loss_shakespeare": "Shakespeare's plays (other source)",
}


def curve(result: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of one run on one held-out set, in step order."""
    rows = sorted((r["step"], r[key]) for r in result["eval"] if key in r)
    return np.array([s for s, _ in rows], dtype=float), np.array([v for _, v in rows], dtype=float)


def first_reach(steps: np.ndarray, losses: np.ndarray, target: float) -> float | None:
    """The (linearly interpolated) step at which a curve first gets to ``target`` or below; None if never."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(steps[0])
            s0, l0, s1 = steps[i - 1], losses[i - 1], steps[i]
            return float(s0 + (l0 - target) / (l0 - loss) * (s1 - s0))
    return None


def is_kd_step(row: dict) -> bool:
    """A KD-phase step: the teacher ran, or its top-K came from a cache (``--teacher-cache``: ω > 0, no teacher)."""
    return bool(row["teacher_ran"]) or row.get("kd_weight", 0.0) > 0


def step_seconds(result: dict) -> np.ndarray:
    """Each step's time, as the median step time of its kind in this run (KD-phase step or not).

    Medians per kind rather than raw times: other load on the machine (a shared CI runner, a test suite) can slow a
    stretch of one run and would otherwise decide a comparison of a few percent.
    """
    ran = np.array([is_kd_step(r) for r in result["train"]])
    raw = np.array([r["step_time_s"] for r in result["train"]], dtype=float)
    out = np.empty_like(raw)
    for kind in (True, False):
        if (ran == kind).any():
            out[ran == kind] = np.median(raw[ran == kind])
    return out


def train_seconds_until(result: dict, step: float) -> float:
    """Training wall-clock (teacher forward included) of the steps up to ``step`` (interpolated)."""
    steps = np.array([r["step"] for r in result["train"]], dtype=float)
    cumulative = np.cumsum(step_seconds(result))
    return float(np.interp(step, np.concatenate(([0.0], steps)), np.concatenate(([0.0], cumulative))))


def train_seconds(result: dict) -> float:
    return float(step_seconds(result).sum())


def plain_step_seconds(result: dict, baseline: dict) -> float:
    """The median step time without the teacher, from ``result`` itself when it has such steps, else from its
    baseline (RKD).

    A whole baseline run costs ``iters`` of these: measuring it in the same run as the KD steps keeps the time saved
    a comparison within one run, which the load on a shared machine (different for each run) cannot decide.
    """
    for r in (result, baseline):
        plain = [t["step_time_s"] for t in r["train"] if not is_kd_step(t)]
        if plain:
            return float(np.median(plain))
    raise ValueError("no step without the teacher in the run or its baseline")


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


@dataclasses.dataclass
class VariantSummary:
    name: str
    seeds: list[int]
    final: dict  # eval key → list of final losses (one per seed)
    paired_diff: dict  # eval key → list of (variant - baseline) final losses over the seeds both have
    reach_fraction: dict  # eval key → list over paired seeds: fraction of steps to reach the baseline's final loss
    #                       (None: not reached)
    train_s: list  # training wall-clock per run (teacher forward included)
    kd_step_s: float  # median KD-phase step time, teacher forward or cache read included (nan if never)
    lm_step_s: float  # median step time without KD
    time_to_baseline_s: list  # per paired seed: training seconds until the baseline's final loss (None: not reached)
    saved_fraction: list  # per paired seed: 1 - time_to_baseline / (iters plain steps of this run; None: not reached)


def summarise(results: list[dict], iters: int) -> dict[str, VariantSummary]:
    """Per-variant summaries; variants without a baseline of the same seed get no paired numbers."""
    by_variant: dict[str, dict[int, dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    baselines = by_variant.get("baseline", {})
    out = {}
    for name, runs in by_variant.items():
        seeds = sorted(runs)
        final = {k: [float(curve(runs[s], k)[1][-1]) for s in seeds] for k in EVAL_SETS}
        paired = [s for s in seeds if s in baselines]
        diff, reach = {}, {}
        for k in EVAL_SETS:
            diff[k] = [float(curve(runs[s], k)[1][-1] - curve(baselines[s], k)[1][-1]) for s in paired]
            reach[k] = []
            for s in paired:
                target = curve(baselines[s], k)[1][-1]
                step = first_reach(*curve(runs[s], k), target)
                reach[k].append(None if step is None else step / iters)
        times, saved = [], []
        for s, fraction in zip(paired, reach["val_loss"]):
            if fraction is None:
                times.append(None)
                saved.append(None)
            else:
                t = train_seconds_until(runs[s], fraction * iters)
                times.append(t)
                saved.append(1.0 - t / (iters * plain_step_seconds(runs[s], baselines[s])))
        kd_steps = [t["step_time_s"] for s in seeds for t in runs[s]["train"] if is_kd_step(t)]
        lm_steps = [t["step_time_s"] for s in seeds for t in runs[s]["train"] if not is_kd_step(t)]
        out[name] = VariantSummary(
            name=name, seeds=seeds, final=final, paired_diff=diff, reach_fraction=reach,
            train_s=[train_seconds(runs[s]) for s in seeds],
            kd_step_s=float(np.median(kd_steps)) if kd_steps else math.nan,
            lm_step_s=float(np.median(lm_steps)) if lm_steps else math.nan,
            time_to_baseline_s=times, saved_fraction=saved,
        )
    return out


def mean_curves(results: list[dict], variant: str, key: str, minus_baseline: bool = False):
    """(steps, mean, std, n) over the seeds of ``variant`` on ``key``; with ``minus_baseline`` the paired
    difference to the baseline of the same seed, step by step."""
    runs = {r["seed"]: r for r in results if r["variant"] == variant}
    base = {r["seed"]: r for r in results if r["variant"] == "baseline"}
    seeds = [s for s in sorted(runs) if not minus_baseline or s in base]
    if not seeds:
        return None
    steps = curve(runs[seeds[0]], key)[0]
    rows = []
    for s in seeds:
        st, loss = curve(runs[s], key)
        if minus_baseline:
            bst, bloss = curve(base[s], key)
            loss = loss - np.interp(st, bst, bloss)
        rows.append(np.interp(steps, st, loss))
    m = np.vstack(rows)
    return steps, m.mean(0), (m.std(0, ddof=1) if len(seeds) > 1 else np.zeros_like(steps)), len(seeds)


def evaluation_windows(results: list[dict]) -> dict:
    """{"val_windows": hash, ...}: the evaluation windows every run read, per held-out set (empty for runs from
    before the hashes were recorded).  Raises SaltError when runs read different windows: their losses would not
    be comparable."""
    from salt_megatron.errors import SaltError

    seen: dict[str, dict[str, list[str]]] = {}
    for r in results:
        for row in r["eval"]:
            for k, v in row.items():
                if k.startswith("val_windows"):
                    seen.setdefault(k, {}).setdefault(v, [])
                    name = f"{r.get('variant', 'teacher')}-seed{r.get('seed', '?')}"
                    if name not in seen[k][v]:
                        seen[k][v].append(name)
    for k, by_hash in seen.items():
        if len(by_hash) > 1:
            raise SaltError(f"the runs were evaluated on different windows ({k}: "
                            + "; ".join(f"{h}: {', '.join(names[:3])}" for h, names in by_hash.items())
                            + "): rerun them with one --eval-seed and --eval-iters")
    unrecorded = [r for r in results if not any(k.startswith("val_windows") for row in r["eval"] for k in row)]
    if seen and unrecorded:
        raise SaltError(f"{len(unrecorded)} run(s) recorded no evaluation windows (older runs): rerun them")
    return {k: next(iter(by_hash)) for k, by_hash in seen.items()}
