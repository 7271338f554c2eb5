"""Cluster life: SIGTERM/SIGUSR1 and --exit-duration-in-mins checkpoint at the next step and exit 0, and the resumed
run's losses are an uninterrupted run's; --exit-interval; a NaN loss stops the run in one line, nothing saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.cli_run import ROOT, run_cli, train_losses
from tests.conftest import STUDENT

LONG = [*STUDENT, "--eval-iters", "1", "--log-interval", "1", "--train-iters", "400", "--eval-interval", "0"]


def _tracker(d) -> int:
    return int((d / "latest_checkpointed_iteration.txt").read_text())


def _start(argv, *, torchrun: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "salt_megatron.cli", "pretrain", *map(str, argv)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29700 + os.getpid() % 200), "-m", "salt_megatron.cli", "pretrain", *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _signal_when_training(proc: subprocess.Popen, sig, *, workers_only: bool = False, after_step: int = 3) -> str:
    """Read the run's output until step ``after_step`` is logged, send ``sig`` (to the workers of a torchrun), then
    return the whole output once the run has ended."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and f"/{LONG[-3]} |" in line and int(line.split()[1].split("/")[0]) >= after_step:
            break
    else:
        raise AssertionError("".join(lines[-30:]))
    targets = psutil.Process(proc.pid).children(recursive=True) if workers_only else [psutil.Process(proc.pid)]
    for target in targets:
        target.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return "".join(lines) + out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_at_the_next_step_exits_0_and_resumes_exactly(corpus, tmp_path, sig):
    run, reference = tmp_path / "run", tmp_path / "reference"
    proc = _start(["--data-path", corpus, *LONG, "--save", run, "--metrics-file", tmp_path / "run.jsonl"])
    out = _signal_when_training(proc, sig)
    assert proc.returncode == 0, out[-3000:]
    stopped = _tracker(run)
    assert 3 <= stopped < 400 and f"step {stopped}: {signal.Signals(sig).name} received" in out, out[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["iter_%07d" % stopped, "latest_checkpointed_iteration.txt"]
    # resume to a few steps later (--exit-interval stops it there), and an uninterrupted run to the same step
    until = stopped + 3
    resumed = run_cli("pretrain", "--data-path", corpus, *LONG, "--load", run, "--save", run, "--exit-interval",
                      until, "--metrics-file", tmp_path / "run.jsonl")
    assert resumed.returncode == 0 and f"--exit-interval {until} reached" in resumed.stdout, resumed.stderr[-3000:]
    straight = run_cli("pretrain", "--data-path", corpus, *LONG, "--save", reference, "--exit-interval", until,
                       "--metrics-file", tmp_path / "reference.jsonl")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _tracker(run) == _tracker(reference) == until
    # the interrupted run's steps 1..stopped, then the resumed run's, equal the uninterrupted run's 1..until
    got, want = train_losses(tmp_path / "run.jsonl"), train_losses(tmp_path / "reference.jsonl")
    assert len(want) == until and got == want
    meta = [json.loads((d / ("iter_%07d" % until) / "salt_meta.json").read_text()) for d in (run, reference)]
    assert meta[0]["fingerprint"] == meta[1]["fingerprint"]


def test_sigterm_to_a_torchrun_dp2_run(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _start(["--data-path", corpus, *LONG, "--save", run], torchrun=True)
    out = _signal_when_training(proc, signal.SIGTERM, workers_only=True)
    assert proc.returncode == 0, out[-3000:]
    stopped = _tracker(run)
    assert 3 <= stopped < 400 and "SIGTERM received" in out
    meta = json.loads((run / ("iter_%07d" % stopped) / "salt_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == stopped


def test_exit_duration_saves_and_exits_0(corpus, tmp_path):
    run = tmp_path / "run"
    start = time.time()
    # far more steps than 3 s allow on any machine (CI's ran all 400 of LONG inside 3 s)
    proc = run_cli("pretrain", "--data-path", corpus, *LONG, "--train-iters", "1000000", "--save", run,
                   "--exit-duration-in-mins", "0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = _tracker(run)
    assert 0 < stopped < 1000000 and "--exit-duration-in-mins 0.05 reached" in proc.stdout
    assert time.time() - start < 120


def test_a_nan_loss_stops_in_one_line_and_saves_nothing(corpus, tmp_path):
    run = tmp_path / "run"
    first = run_cli("pretrain", "--data-path", corpus, *LONG[:-4], "--train-iters", "2", "--save", run)
    assert first.returncode == 0, first.stderr[-3000:]
    # an infinite LR: the first update makes the weights Inf/NaN, the next step's loss is NaN
    proc = run_cli("pretrain", "--data-path", corpus, *LONG[:-4], "--train-iters", "60", "--load", run, "--save", run,
                   "--save-interval", "1", "--lr", "inf", "--min-lr", "0", "--lr-decay-style", "constant",
                   "--clip-grad", "0", "--override-opt_param-scheduler")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    step = int(lines[0].split("error: step ")[1].split(":")[0])
    assert "stopped before saving" in lines[0] and f"iter_{step - 1:07d} is left as the latest" in lines[0], lines[0]
    assert _tracker(run) == step - 1 and not (run / f"iter_{step:07d}").exists()
