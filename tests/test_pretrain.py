"""`salt-megatron pretrain` end to end on CPU processes: TP=2, DP=2, PP=2, with and without a teacher, resume,
crash safety, and each refusal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from salt_megatron.errors import SaltError
from tests.conftest import STUDENT, TEACHER, pretrain
from tests.dist_utils import run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _losses(history):
    return [h["loss"] for h in history["train"]]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 1), (1, 2)], ids=["TP2", "DP2", "PP2"])
def test_two_process_runs_with_and_without_teacher(corpus, teacher_dir, tp, pp):
    common = ["--data-path", corpus, *STUDENT, "--tensor-model-parallel-size", str(tp),
              "--pipeline-model-parallel-size", str(pp), "--global-batch-size", "4", "--train-iters", "4",
              "--eval-iters", "1"]
    base, salt = pretrain(2, common, [*common, "--teacher-load", teacher_dir, "--kd-steps", "2", "--kd-weight", "0.5",
                                      "--kd-temperature", "2.0"])
    for h in (base, salt):
        assert len(h["train"]) == 4 and all(x == x and x < 10 for x in _losses(h))
        assert len(h["eval"]) == 1
    assert base["teacher_forward_calls"] == 0
    # the teacher runs exactly while ω > 0: steps 0 and 1, each with global/(micro x DP) micro-batches
    micro = 4 // (2 * (2 // (tp * pp)))
    assert salt["teacher_forward_calls"] == 2 * micro
    assert [h["teacher_ran"] for h in salt["train"]] == [True, True, False, False]
    assert [h["kd"] is not None for h in salt["train"]] == [True, True, False, False]
    # identical data and init: the runs agree until the teacher's term enters the first update
    assert salt["train"][0]["ce"] == pytest.approx(base["train"][0]["ce"], rel=1e-6)
    assert salt["train"][1]["ce"] != pytest.approx(base["train"][1]["ce"], rel=1e-6)


def test_resume_is_exact_across_the_kd_switch(corpus, teacher_dir, tmp_path):
    """12 straight steps vs 6 (or 5, or 7) + resume: the same losses, with the KD→LM switch at step 6."""
    save = str(tmp_path / "run")
    common = ["--data-path", corpus, *STUDENT, "--tensor-model-parallel-size", "2", "--global-batch-size", "4",
              "--train-iters", "12", "--teacher-load", teacher_dir, "--kd-steps", "6", "--kd-weight", "0.5",
              "--eval-iters", "1", "--lr-warmup-iters", "2"]
    straight, = pretrain(2, [*common, "--save", save, "--save-interval", "1"])
    runs = []
    for resume_at in (5, 6, 7):
        ckpt = os.path.join(save, f"iter_{resume_at:07d}")
        runs.append([*common, "--load", ckpt])
    resumed = pretrain(2, *runs)
    full = _losses(straight)
    assert len(full) == 12
    for resume_at, h in zip((5, 6, 7), resumed):
        tail = _losses(h)
        assert len(tail) == 12 - resume_at
        for a, b in zip(tail, full[resume_at:]):
            assert a == pytest.approx(b, rel=1e-6)
        assert h["teacher_forward_calls"] == max(0, 6 - resume_at) * 2


def test_sigkill_mid_save_leaves_previous_checkpoint_loadable(corpus, tmp_path):
    from salt_megatron import checkpointing

    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "salt_megatron.cli", "pretrain", "--data-path", corpus, *TEACHER,
           "--train-iters", "200", "--save", str(save), "--save-interval", "1", "--eval-iters", "1"]
    # a session of its own: the kill reaches the checkpoint writer's helper processes too, as a scheduler's would
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    killed_mid_save = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if save.exists() and any(".tmp-" in n for n in os.listdir(save)) and \
                    checkpointing.find_latest_checkpoint(str(save)) is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_mid_save = True
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert killed_mid_save, "never saw a save in progress"
    latest = checkpointing.find_latest_checkpoint(str(save))
    assert latest is not None and ".tmp-" not in latest
    meta = checkpointing.read_meta(str(save))
    # resuming from what is left works and continues from the step after it
    # (a shorter run than the killed one: its LR schedule decays sooner, which the checkpoint's record would refuse)
    h, = pretrain(1, ["--data-path", corpus, *TEACHER, "--train-iters", str(meta["step"] + 1), "--load", str(save),
                      "--eval-iters", "1", "--use-checkpoint-opt_param-scheduler"])
    assert [x["step"] for x in h["train"]] == [meta["step"] + 1]


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one clear message, before any training step
# ---------------------------------------------------------------------------------------------------------------


def _refusal(argv) -> str:
    from salt_megatron.training.loop import main

    with pytest.raises(SaltError) as e:
        main(argv)
    return str(e.value)


def test_refuses_kd_steps_beyond_train_iters(corpus, teacher_dir):
    msg = _refusal(["--data-path", corpus, *STUDENT, "--train-iters", "4", "--teacher-load", teacher_dir,
                    "--kd-steps", "5"])
    assert "--kd-steps (5) exceeds --train-iters (4)" in msg


def test_refuses_missing_or_incomplete_teacher(corpus, teacher_dir, tmp_path):
    msg = _refusal(["--data-path", corpus, *STUDENT, "--train-iters", "4", "--teacher-load", str(tmp_path / "nope"),
                    "--kd-steps", "2"])
    assert "does not exist" in msg
    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    for p in broken.glob("iter_*/salt_meta.json"):
        p.unlink()
    msg = _refusal(["--data-path", corpus, *STUDENT, "--train-iters", "4", "--teacher-load", str(broken),
                    "--kd-steps", "2"])
    assert "no complete checkpoint" in msg


def test_refuses_teacher_with_another_tokenizer(corpus, teacher_dir, tmp_path):
    from salt_megatron.data.prepare import prepare

    other = tmp_path / "other"
    text = tmp_path / "t.jsonl"
    with open(text, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"a different corpus line {i} with other words {i * 7}"}) + "\n")
    prepare([str(text)], str(other), vocab_size=320, workers=1, progress=False)
    msg = _refusal(["--data-path", str(other), *STUDENT, "--train-iters", "4", "--teacher-load", teacher_dir,
                    "--kd-steps", "2"])
    assert "another tokenizer" in msg


def test_refuses_teacher_with_other_padded_vocab(corpus, teacher_dir):
    argv = ["--data-path", corpus, *STUDENT, "--train-iters", "4", "--teacher-load", teacher_dir, "--kd-steps", "2"]
    argv[argv.index("--make-vocab-size-divisible-by") + 1] = "384"
    assert "padded vocab sizes differ" in _refusal(argv)


def _edit_meta(src, dst, **changes):
    shutil.copytree(src, dst)
    for p in dst.glob("iter_*/salt_meta.json"):
        meta = json.loads(p.read_text())
        meta.update({k: (v(meta) if callable(v) else v) for k, v in changes.items()})
        p.write_text(json.dumps(meta))


def test_refuses_untrained_teacher(corpus, teacher_dir, tmp_path):
    at_init = tmp_path / "init"
    _edit_meta(teacher_dir, at_init, fingerprint=lambda m: m["init_fingerprint"])
    msg = _refusal(["--data-path", corpus, *STUDENT, "--train-iters", "4", "--teacher-load", str(at_init),
                    "--kd-steps", "2"])
    assert "random initialisation" in msg


def _refusal_worker(rank, world_size, argv):
    from salt_megatron.training.loop import main

    try:
        main(argv)
    except SaltError as e:
        return str(e)
    return None


def test_refuses_teacher_whose_weights_do_not_match_its_fingerprint(corpus, teacher_dir, tmp_path):
    wrong = tmp_path / "wrong"
    _edit_meta(teacher_dir, wrong, fingerprint=lambda m: [m["fingerprint"][0]] + [x * 1.5 + 1 for x in m["fingerprint"][1:]])
    msg = run_workers(_refusal_worker, 1, ["--data-path", corpus, *STUDENT, "--train-iters", "4", "--teacher-load",
                                           str(wrong), "--kd-steps", "2"])[0]
    assert msg is not None and "did not load" in msg


# ---------------------------------------------------------------------------------------------------------------
# --extra-valid-data-path: more held-out sets, evaluated with the main one
# ---------------------------------------------------------------------------------------------------------------


def test_extra_validation_sets_are_evaluated_and_logged(corpus, tmp_path):
    metrics = tmp_path / "m.jsonl"
    (history,) = pretrain(1, ["--data-path", corpus, *STUDENT, "--train-iters", "4", "--eval-interval", "2",
                              "--eval-iters", "1", "--extra-valid-data-path", f"again={corpus}_valid",
                              f"train={corpus}_train.bin", "--metrics-file", str(metrics)])
    evals = history["eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        # the same windows as the main validation set (same prefix, same seed): the same loss
        assert e["val_loss_again"] == pytest.approx(e["val_loss"], rel=1e-6)
        assert e["val_loss_train"] != e["val_loss"] and e["val_loss_train"] > 0
    logged = [json.loads(line) for line in open(metrics) if '"eval"' in line]
    assert {"val_loss_again", "val_loss_train"} <= set(logged[-1])


@pytest.mark.parametrize("spec, message", [
    ("noequals", "wants NAME=PREFIX"),
    ("bad-name=x", "wants NAME=PREFIX"),
    ("a=CORPUS_valid a=CORPUS_valid", "names 'a' twice"),
    ("a=/nonexistent/prefix", "no indexed dataset for a: /nonexistent/prefix"),
])
def test_refuses_bad_extra_validation_sets(corpus, spec, message):
    specs = spec.replace("CORPUS", corpus).split()
    msg = _refusal(["--data-path", corpus, *STUDENT, "--train-iters", "2", "--extra-valid-data-path", *specs])
    assert message in msg


def test_refuses_extra_validation_set_of_another_tokenizer(corpus, tmp_path):
    from salt_megatron.data.prepare import prepare

    text = tmp_path / "t.jsonl"
    with open(text, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"another corpus line {i} with its own words {i * 3}"}) + "\n")
    prepare([str(text)], str(tmp_path / "other"), vocab_size=320, workers=1, progress=False)
    msg = _refusal(["--data-path", corpus, *STUDENT, "--train-iters", "2", "--extra-valid-data-path",
                    f"other={tmp_path / 'other'}_train"])
    assert "tokenized with another tokenizer" in msg


def _unchanged_flags_worker(rank, world_size, argv):
    import copy

    from salt_megatron.training.arguments import build_pretrain_parser, parse_with_config, validate_pretrain_args
    from salt_megatron.training.loop import pretrain as run_pretrain

    args = validate_pretrain_args(parse_with_config(build_pretrain_parser(), argv), world_size=world_size)
    before = copy.deepcopy(vars(args))
    history = run_pretrain(args)
    return before == vars(args), len(history["train"])


def test_flags_are_not_changed_after_validation(corpus, teacher_dir):
    """The run reads the typed config built from the validated flags; nothing writes back into the namespace."""
    unchanged, steps = run_workers(_unchanged_flags_worker, 1, [
        "--data-path", corpus, *STUDENT, "--train-iters", "2", "--eval-iters", "1", "--teacher-load", teacher_dir,
        "--kd-steps", "1"])[0]
    assert unchanged and steps == 2
