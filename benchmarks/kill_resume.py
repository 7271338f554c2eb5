#!/usr/bin/env python
"""kill -9 at random moments of `pretrain` (saves included), `score`, `cache-teacher` and `prepare`; each time, the
next run must resume (or redo) the work and end exactly where an uninterrupted run ends: the same losses and final
weights, a byte-identical score sidecar and teacher cache, byte-identical prepared files.  Prints what it counted.

    python benchmarks/kill_resume.py [--runs 10] [--kills-per-run 2] [--seed 0] [--workdir DIR]

A killed run is rerun with the same command (`--load` = `--save`, as the launchers do) until it finishes.  A state
the next run cannot resume from, or one it silently misreads (other losses, other weights, other bytes), is a
failure; the exit code is the number of failures.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--make-vocab-size-divisible-by", "16",
         "--eval-iters", "1", "--log-interval", "1000"]
ITERS = 12


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "salt_megatron.cli", *map(str, args)]


def run(cmd, kill_after: float | None = None, watch: str | None = None) -> dict:
    """Run ``cmd``; with ``kill_after``, SIGKILL it that many seconds in (unless it ends first).  Returns what
    happened: finished (exit code) or killed, and whether a save was in progress in ``watch`` at the kill."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a session of its own: the kill reaches its helper processes (the checkpoint writer's) too, as a scheduler's does
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            mid_save = watch is not None and bool(glob.glob(os.path.join(watch, "*.tmp-*")))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed": True, "mid_save": mid_save}
    err = proc.communicate()[1]
    return {"killed": False, "code": proc.returncode, "stderr": err}


def make_corpus(work: str) -> tuple[str, str]:
    from salt_megatron.data.corpora import sotu_speeches

    speeches = sotu_speeches()
    text = os.path.join(work, "train.jsonl")
    with open(text, "w") as f:
        for r in speeches[100:130]:
            f.write(json.dumps({"text": r["text"][:20000]}) + "\n")
    return text, os.path.join(work, "corpus")


def prepared_files(prefix: str) -> list[str]:
    return sorted(glob.glob(prefix + ".*") + glob.glob(prefix + "_*.*"))


def check_prepare(text, reference, reference_files, work, kills, rng, timing) -> tuple[int, int]:
    failures = 0
    for k in range(kills):
        prefix = os.path.join(work, f"prep{k}", "corpus")
        cmd = cli("prepare", "--input", text, "--output-prefix", prefix, "--vocab-size", "512", "--workers", "1")
        outcome = run(cmd, kill_after=rng.uniform(0.2, timing))
        left = [p for p in prepared_files(prefix) if ".tmp-" not in p]
        if outcome["killed"] and left and len(left) != len(reference_files):
            print(f"  prepare kill {k}: a partial set of outputs is visible: {left}")
            failures += 1
        done = run(cmd)
        same = done["code"] == 0 and [os.path.basename(p) for p in prepared_files(prefix) if ".tmp-" not in p] == \
            [os.path.basename(p) for p in reference_files] and all(
            filecmp.cmp(p, os.path.join(os.path.dirname(reference), os.path.basename(p)), shallow=False)
            for p in prepared_files(prefix) if not p.endswith(".json"))
        failures += not same
        if not same:
            print(f"  prepare kill {k}: the rerun differs from an uninterrupted prepare "
                  f"({done.get('stderr', '')[-300:]})")
    return kills, failures


def final_state(save: str) -> tuple:
    from salt_megatron import checkpointing

    meta = checkpointing.read_meta(save)
    return meta["step"], meta["fingerprint"]


def losses(metrics: str) -> dict[int, float]:
    """step -> loss of the last time each step was logged (a killed run logs steps that its rerun logs again)."""
    out = {}
    with open(metrics) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "train":
                out[row["step"]] = row["loss"]
    return out


def check_cache(teacher: str, corpus: str, work: str, kills: int, rng) -> int:
    """A reference teacher cache, then ``kills`` runs killed at a random moment and rerun: byte-identical files?"""
    from salt_megatron.data.teacher_cache import cache_paths

    def cmd(path):
        return cli("cache-teacher", "--load", teacher, "--data-path", corpus, "--windows", "all", "--topk", 8,
                   "--cache-chunk-windows", 4, "--no-progress", "--cache-path", path)

    reference = os.path.join(work, "cache_reference")
    t0 = time.time()
    assert run(cmd(reference))["code"] == 0
    took = time.time() - t0
    failures = mid_work = 0
    for k in range(kills):
        path = os.path.join(work, f"cache{k}")
        run(cmd(path), kill_after=rng.uniform(0.6 * took, 0.98 * took))  # startup takes most of the first part
        mid_work += len(glob.glob(os.path.join(cache_paths(path)["partial"], "chunk_*"))) > 0
        done = run(cmd(path))
        files = [(cache_paths(path)[name], cache_paths(reference)[name]) for name in cache_paths(path)
                 if name != "partial"]
        failures += not (done["code"] == 0 and all(filecmp.cmp(a, b, shallow=False) for a, b in files))
    print(f"cache-teacher: {mid_work} of the {kills} kills left finished chunks behind (the rest came earlier)")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="pretrain runs, each killed --kills-per-run times")
    ap.add_argument("--kills-per-run", type=int, default=2)
    ap.add_argument("--score-kills", type=int, default=3)
    ap.add_argument("--cache-kills", type=int, default=3)
    ap.add_argument("--prepare-kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="salt_kill_resume_")
    os.makedirs(work, exist_ok=True)
    start = time.time()

    text, corpus = make_corpus(work)
    t0 = time.time()
    assert run(cli("prepare", "--input", text, "--output-prefix", corpus, "--vocab-size", "512",
                   "--workers", "1"))["code"] == 0
    prepare_time = time.time() - t0
    reference_files = prepared_files(corpus)

    # the uninterrupted reference runs
    reference = os.path.join(work, "reference")
    t0 = time.time()
    ref = run(cli("pretrain", "--data-path", corpus, *MODEL, "--train-iters", ITERS, "--save", reference,
                  "--save-interval", 1, "--metrics-file", os.path.join(work, "reference.jsonl")))
    assert ref["code"] == 0, ref["stderr"][-2000:]
    pretrain_time = time.time() - t0
    ref_losses, ref_state = losses(os.path.join(work, "reference.jsonl")), final_state(reference)

    kills = mid_save = resumes = failures = 0
    for r in range(args.runs):
        save, metrics = os.path.join(work, f"run{r}"), os.path.join(work, f"run{r}.jsonl")
        cmd = cli("pretrain", "--data-path", corpus, *MODEL, "--train-iters", ITERS, "--save", save, "--load", save,
                  "--save-interval", 1, "--metrics-file", metrics)
        for _ in range(args.kills_per_run):
            outcome = run(cmd, kill_after=rng.uniform(1.0, pretrain_time), watch=save)
            kills += outcome["killed"]
            mid_save += outcome.get("mid_save", False)
            if not outcome["killed"] and outcome["code"] != 0:
                print(f"  run {r}: a rerun failed: {outcome['stderr'][-500:]}")
                failures += 1
        done = run(cmd)
        resumes += 1
        ok = done["code"] == 0 and final_state(save) == ref_state and losses(metrics) == ref_losses
        if not ok:
            failures += 1
            print(f"  run {r}: did not end where the uninterrupted run ends (exit {done['code']}: "
                  f"{done['stderr'][-500:]})")
    print(f"pretrain: {args.runs} runs, {kills} kill -9 ({mid_save} during a save), {resumes} finished by rerunning "
          f"the same command; {resumes - failures if failures <= resumes else 0} ended with the uninterrupted run's "
          f"losses and weights")

    # score: the reference sidecar, then killed and rerun scoring of a copy of the dataset
    score_failures = 0
    teacher = reference  # the trained model scores the corpus
    ref_score = run(cli("score", "--load", teacher, "--data-path", corpus, "--no-progress",
                        "--score-chunk-windows", "16"))
    assert ref_score["code"] == 0, ref_score["stderr"][-2000:]
    for k in range(args.score_kills):
        copy = os.path.join(work, f"score{k}")
        os.makedirs(copy)
        for path in prepared_files(corpus):
            if "salt_scores" not in path:
                shutil.copy(path, copy)
        prefix = os.path.join(copy, "corpus")
        cmd = cli("score", "--load", teacher, "--data-path", prefix, "--no-progress", "--score-chunk-windows", "16")
        run(cmd, kill_after=rng.uniform(2.0, 12.0))
        done = run(cmd)
        same = done["code"] == 0 and all(filecmp.cmp(prefix + "_train" + suffix, corpus + "_train" + suffix,
                                                     shallow=False)
                                         for suffix in (".salt_scores.samples.npy", ".salt_scores.documents.npy"))
        score_failures += not same
    print(f"score: {args.score_kills} kill -9, {args.score_kills - score_failures} reruns gave a byte-identical "
          f"sidecar")

    cache_failures = check_cache(teacher, corpus, work, args.cache_kills, rng)
    print(f"cache-teacher: {args.cache_kills} kill -9, {args.cache_kills - cache_failures} reruns gave a "
          "byte-identical cache")

    prepare_kills, prepare_failures = check_prepare(text, corpus, reference_files, work, args.prepare_kills, rng,
                                                    prepare_time)
    print(f"prepare: {prepare_kills} kill -9, {prepare_kills - prepare_failures} reruns gave byte-identical files "
          "(and no kill left a partial set visible)")
    total = failures + score_failures + cache_failures + prepare_failures
    print(f"failures: {total} ({time.time() - start:.0f} s; work in {work})")
    return total


if __name__ == "__main__":
    sys.exit(main())
