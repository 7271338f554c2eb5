"""`pretrain --deepspeed`: ZeRO-1 and ZeRO-2 in 2 CPU processes with SALT on, resume, and config contradictions."""

from __future__ import annotations

import json
import os

import pytest

from salt_megatron.errors import UsageError
from tests.conftest import STUDENT, pretrain

pytest.importorskip("deepspeed")


def _ds_config(tmp_path, stage, **extra):
    cfg = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", **extra}
    path = tmp_path / f"ds_zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train_with_salt_and_resume_exactly(corpus, teacher_dir, tmp_path, stage):
    save = str(tmp_path / "run")
    common = ["--data-path", corpus, *STUDENT, "--deepspeed", "--deepspeed-config", _ds_config(tmp_path, stage),
              "--global-batch-size", "8", "--train-iters", "6", "--eval-iters", "1", "--teacher-load", teacher_dir,
              "--kd-steps", "3", "--kd-weight", "0.5", "--lr-warmup-iters", "1"]
    straight, = pretrain(2, [*common, "--save", save, "--save-interval", "1"])
    losses = [h["loss"] for h in straight["train"]]
    assert len(losses) == 6 and all(x == x for x in losses)
    assert [h["teacher_ran"] for h in straight["train"]] == [True] * 3 + [False] * 3
    assert losses[1] < losses[0] * 1.5  # it trains (KD term included in steps 0-2)
    assert os.path.isdir(os.path.join(save, "iter_0000006", "deepspeed"))
    # 2 DP ranks x 2 micro-batches of 2: DeepSpeed accumulates 2 micro-batches per step
    resumed, = pretrain(2, [*common, "--load", os.path.join(save, "iter_0000002")])
    assert [h["loss"] for h in resumed["train"]] == pytest.approx(losses[2:], rel=1e-6)


def test_json_and_flags_must_agree(corpus, tmp_path):
    from salt_megatron.training.loop import main

    argv = ["--data-path", corpus, *STUDENT, "--train-iters", "2", "--deepspeed", "--deepspeed-config"]
    with pytest.raises(UsageError, match="train_micro_batch_size_per_gpu = 4 contradicts --micro-batch-size"):
        main([*argv, _ds_config(tmp_path, 1, train_micro_batch_size_per_gpu=4)])
    with pytest.raises(UsageError, match="ZeRO stage 3"):
        main([*argv, _ds_config(tmp_path, 3)])
    with pytest.raises(UsageError, match="--bf16 is set but"):
        main([*argv, _ds_config(tmp_path, 1), "--bf16"])
    with pytest.raises(UsageError, match="defines a scheduler"):
        main([*argv, _ds_config(tmp_path, 2, scheduler={"type": "WarmupLR"})])
