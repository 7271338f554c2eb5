"""Nothing lost, nothing silent: each case a user hit on 0.1 (see the issue), reproduced as a command a user runs.

* a --load/--save directory holding another tool's checkpoint is refused, never silently orphaned;
* resuming with another SALT schedule (a larger --kd-steps after the KD phase ended) is refused, or logged and
  recorded with --override-salt-schedule;
* a rerun that would reach an existing iter_* directory refuses before training and leaves it untouched;
* a corrupt .idx, a missing tokenizer and `evaluate --load` of a missing directory are one line, not a traceback;
* a DeepSpeed JSON written for the HF Trainer ("auto" everywhere) is filled from the flags;
* the logged loss is (1-ω)·CE + ω·τ²·KD of the logged parts with several micro-batches, on 1 and 2 processes;
* a checkpoint write that fails (a file size limit) leaves the previous checkpoint and tracker and ends in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from tests.cli_run import assert_refused, refused_in_process, run_cli
from tests.conftest import STUDENT, pretrain

# a fixed LR decay length: runs of different lengths resume one another without changing their LR schedule
TINY = [*STUDENT, "--eval-iters", "1", "--log-interval", "100", "--lr-decay-iters", "10"]


def _tracker(d) -> str:
    return (d / "latest_checkpointed_iteration.txt").read_text().strip()


def test_another_tools_checkpoint_is_refused_not_orphaned(corpus, tmp_path, capfd):
    run = tmp_path / "run"
    (run / "iter_0000100").mkdir(parents=True)
    (run / "iter_0000100" / "model.pt").write_bytes(b"not ours")
    (run / "latest_checkpointed_iteration.txt").write_text("100")
    refused_in_process(capfd, ["pretrain", "--data-path", corpus, *TINY, "--train-iters", "2", "--load", run, "--save",
                               run], r"no complete checkpoint in .*step 100.*iter_0000100 is not a complete salt_megatron")
    assert _tracker(run) == "100" and sorted(os.listdir(run)) == ["iter_0000100", "latest_checkpointed_iteration.txt"]
    # and a fresh run into it (no --load) is refused too
    refused_in_process(capfd, ["pretrain", "--data-path", corpus, *TINY, "--train-iters", "2", "--save", run],
                       r"already holds checkpoints .*that this run does not resume from")


@pytest.fixture(scope="module")
def kd_run(corpus, teacher_dir, tmp_path_factory):
    """4 steps with KD for the first 2, saved at every step."""
    save = tmp_path_factory.mktemp("kd_run") / "run"
    pretrain(1, ["--data-path", corpus, *TINY, "--train-iters", "4", "--teacher-load", teacher_dir, "--kd-steps", "2",
                 "--save", str(save), "--save-interval", "1"])
    return save


def test_resuming_with_a_larger_kd_steps_is_refused_unless_overridden(corpus, teacher_dir, kd_run, tmp_path, capfd):
    argv = ["pretrain", "--data-path", corpus, *TINY, "--train-iters", "6", "--teacher-load", teacher_dir,
            "--kd-steps", "5", "--load", kd_run]
    refused_in_process(capfd, argv, r"SALT schedule: --kd-steps 5 \(checkpoint: 2\).*--override-salt-schedule")
    save = tmp_path / "continued"
    proc = run_cli(*argv, "--override-salt-schedule", "--save", save)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with another SALT schedule than the checkpoint's, as asked: kd_steps 5 (checkpoint: 2)" \
        in proc.stdout
    meta = json.loads((save / "iter_0000006" / "salt_meta.json").read_text())
    assert meta["overrides"] == [{"group": "SALT schedule", "changes": {"kd_steps": [2, 5]}, "at_step": 4}]


def test_a_rerun_never_overwrites_an_existing_iteration_directory(corpus, teacher_dir, kd_run, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(kd_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("iter_*/*")}
    refused_in_process(capfd, ["pretrain", "--data-path", corpus, *TINY, "--train-iters", "4", "--teacher-load",
                               teacher_dir, "--kd-steps", "2", "--load", run / "iter_0000002", "--save", run,
                               "--save-interval", "1"], r"would overwrite .*iter_0000003 \(and 1 more\)")
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("iter_*/*")} == before and _tracker(run) == "4"


def test_bad_files_are_one_line_not_a_traceback(corpus, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    for suffix in ("_train.bin", "_train.idx", ".model"):
        shutil.copy(corpus + suffix, data / f"c{suffix}")
    (data / "c_train.idx").write_bytes(os.urandom(200))
    assert_refused(run_cli("pretrain", "--data-path", data / "c", *TINY, "--train-iters", "2"),
                   r"c_train.idx is not a Megatron indexed-dataset index")
    refused_in_process(capfd, ["pretrain", "--data-path", corpus, *TINY, "--train-iters", "2", "--tokenizer-model",
                               tmp_path / "missing.model"], r"tokenizer model not found: .*missing")
    refused_in_process(capfd, ["evaluate", "--load", tmp_path / "nope", "--data-path", corpus],
                       r"checkpoint directory .*nope does not exist")


def test_deepspeed_json_with_auto_values_is_filled_from_the_flags(tmp_path):
    from salt_megatron.training.arguments import build_pretrain_parser, parse_with_config, validate_pretrain_args

    cfg = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto"}}}
    path = tmp_path / "hf.json"
    path.write_text(json.dumps(cfg))
    args = validate_pretrain_args(parse_with_config(build_pretrain_parser(), [
        "--data-path", "x", "--deepspeed", "--deepspeed-config", str(path), "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "3e-4", "--clip-grad", "0.5", "--adam-beta2", "0.99"]), world_size=2)
    got = args.deepspeed_config_dict
    assert got["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
    assert (got["train_micro_batch_size_per_gpu"], got["train_batch_size"], got["gradient_accumulation_steps"]) == \
        (2, 8, 2)
    assert got["gradient_clipping"] == 0.5 and got["bf16"] == {"enabled": False}


@pytest.mark.parametrize("world_size", [1, 2])
def test_logged_loss_is_the_weighted_sum_of_the_logged_parts(corpus, teacher_dir, world_size):
    omega, tau = 0.5, 2.0
    history, = pretrain(world_size, ["--data-path", corpus, *TINY, "--train-iters", "3", "--global-batch-size", "8",
                                     "--micro-batch-size", "2", "--teacher-load", teacher_dir, "--kd-steps", "2",
                                     "--kd-weight", str(omega), "--kd-temperature", str(tau)])
    for h in history["train"]:
        expected = h["ce"] if h["kd"] is None else (1 - omega) * h["ce"] + omega * tau ** 2 * h["kd"]
        assert h["loss"] == pytest.approx(expected, rel=1e-5), h
    assert history["train"][0]["kd"] is not None and history["train"][2]["kd"] is None


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_says_so(corpus, tmp_path):
    run = tmp_path / "run"
    first = run_cli("pretrain", "--data-path", corpus, *TINY, "--train-iters", "2", "--save", run)
    assert first.returncode == 0, first.stderr[-3000:]
    # files of at most 64 KiB: the next checkpoint's shards cannot be written (EFBIG, Python ignores SIGXFSZ)
    proc = run_cli("pretrain", "--data-path", corpus, *TINY, "--train-iters", "3", "--load", run, "--save", run,
                   shell_prefix="ulimit -f 64")
    # the run ends with one line (what the checkpoint library logged about its failing writer may come before it)
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^salt-megatron pretrain: error: could not write the checkpoint .*iter_0000003 \(.*files are "
                     r"limited to 65536 bytes here \(ulimit -f\)\); .*iter_0000002 is left as the latest", last), last
    assert _tracker(run) == "2" and sorted(os.listdir(run)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    resumed = run_cli("pretrain", "--data-path", corpus, *TINY, "--train-iters", "3", "--load", run, "--save", run)
    assert resumed.returncode == 0 and _tracker(run) == "3", resumed.stderr[-3000:]


def test_a_failed_dataset_write_keeps_the_previous_dataset_and_says_so(corpus, tmp_path):
    """prepare into a prefix that holds a dataset, with files limited to 16 KiB: the old files stay as they were."""
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"document number {i} " * 200}) + "\n" for i in range(40)))
    out = tmp_path / "data" / "p"
    args = ["prepare", "--input", text, "--output-prefix", out, "--tokenizer-model", corpus + ".model", "--workers", "1"]
    assert run_cli(*args).returncode == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    proc = run_cli(*args, shell_prefix="ulimit -f 16")
    # the progress bar (stderr) comes first; the run ends with one line of its own
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(r"salt-megatron prepare: error: could not write .*p_train.bin.*\(File too large; files are "
                    r"limited to 16384 bytes here \(ulimit -f\)\); nothing was replaced$", last), last
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_override_opt_param_scheduler_really_uses_the_flags_lr(corpus, tmp_path):
    """megatron-core keeps max/min LR in the optimizer's param groups too; restored from the checkpoint they used to
    win over the flags (and megatron-core asserted when both scheduler switches were set)."""
    run = tmp_path / "run"
    first = run_cli("pretrain", "--data-path", corpus, *TINY, "--train-iters", "2", "--save", run)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = run_cli("pretrain", "--data-path", corpus, *TINY, "--train-iters", "3", "--load", run, "--save", run,
                   "--lr", "5e-3", "--min-lr", "0", "--lr-decay-style", "constant", "--log-interval", "1",
                   "--override-opt_param-scheduler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"step +3/3 \| .*\| lr 5\.00e-03 \|", proc.stdout), proc.stdout[-2000:]
