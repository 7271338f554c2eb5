"""--kd-transition auto: KD from step 0, off for good once the student's CE on the KD batches is within the margin
of the teacher's (window mean); every rank switches at the same step (pipeline stages too), and a resume just
before the switch continues exactly."""

from __future__ import annotations

import os

import pytest

from salt_megatron.schedule import SaltSchedule
from tests.conftest import STUDENT, _pretrain_worker
from tests.dist_utils import run_workers


def test_the_switch_rule():
    s = SaltSchedule(kd_weight=0.5, kd_steps=100, transition="auto", auto_window=3, auto_margin=0.1)
    assert not s.auto_switch_due([0.0, 0.0])  # a window not yet full
    assert not s.auto_switch_due([0.5, 0.1, 0.0]) and s.auto_switch_due([0.5, 0.15, 0.1, 0.0])
    assert s.weight(10) == 0.5 and s.weight(10, ended_at=10) == 0.0 and s.weight(9, ended_at=10) == 0.5
    assert s.weight(100) == 0.0 and not s.teacher_needed(12, ended_at=11)
    assert not SaltSchedule(kd_weight=0.5, kd_steps=100).auto_switch_due([-1.0] * 30)  # only for auto
    with pytest.raises(ValueError):
        SaltSchedule(kd_weight=0.5, kd_steps=10, transition="auto", auto_window=0)


def test_every_rank_switches_at_the_same_step_and_resume_is_exact(corpus, teacher_dir, tmp_path):
    save = str(tmp_path / "run")
    common = ["--data-path", corpus, *STUDENT, "--pipeline-model-parallel-size", "2", "--global-batch-size", "4",
              "--train-iters", "12", "--eval-iters", "1", "--teacher-load", teacher_dir, "--kd-steps", "12",
              "--kd-transition", "auto", "--kd-auto-window", "2", "--kd-auto-margin", "0.3"]
    first, last = run_workers(_pretrain_worker, 2, [[*common, "--save", save, "--save-interval", "1"]])
    switch = last[0]["kd_ended_at"]
    assert first[0]["kd_ended_at"] == switch and 2 < switch < 12, switch  # rank 0: the first stage, no loss
    losses = [r["loss"] for r in last[0]["train"]]
    omegas = [r["kd_weight"] for r in last[0]["train"]]
    assert omegas == [0.5] * switch + [0.0] * (12 - switch)
    assert last[0]["teacher_forward_calls"] == switch * 2  # two micro-batches a step, only while ω > 0
    # resumed one step before the switch: the saved window of gaps carries it to the same step
    resume_at = switch - 1
    _, resumed = run_workers(_pretrain_worker, 2, [[*common, "--load", os.path.join(save, f"iter_{resume_at:07d}")]])
    assert resumed[0]["kd_ended_at"] == switch
    assert [r["loss"] for r in resumed[0]["train"]] == pytest.approx(losses[resume_at:], rel=1e-6)
