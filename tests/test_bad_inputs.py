"""A battery of bad inputs across prepare, pretrain, score, evaluate and the launchers: each ends with exit code 2
and one line on stderr naming the problem, no traceback, and nothing written (no dataset, checkpoint, sidecar,
metrics file).

Most cases run through ``salt_megatron.cli.main`` in this process (the same handler a user's command goes through;
a refusal that escaped it as an exception would fail the test); a few run as real subprocesses, launchers included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from salt_megatron import cli
from tests.cli_run import ROOT, assert_refused, run_cli
from tests.conftest import STUDENT, pretrain

TINY = [*STUDENT, "--eval-iters", "1"]


@pytest.fixture(scope="module")
def world(corpus, teacher_dir, tmp_path_factory):
    """Files for the cases: bad inputs made from the good corpus, a student checkpoint, an output folder."""
    d = tmp_path_factory.mktemp("bad_inputs")
    files = {"corpus": corpus, "teacher": teacher_dir, "out": d / "out"}
    (d / "data").mkdir()
    for suffix in ("_train.bin", "_train.idx", ".model"):
        shutil.copy(corpus + suffix, d / "data" / f"truncated{suffix}")
        shutil.copy(corpus + suffix, d / "data" / f"corrupt{suffix}")
    with open(d / "data" / "truncated_train.bin", "r+b") as f:
        f.truncate(os.path.getsize(corpus + "_train.bin") // 2)
    (d / "data" / "corrupt_train.idx").write_bytes(b"MMIDIDX\x00\x00" + os.urandom(40))
    texts = {"bad_json.jsonl": '{"text": "ok"}\n{"text": \n', "no_key.jsonl": '{"body": "x"}\n',
             "blank.jsonl": '{"text": "  "}\n', "empty.txt": "", "good.jsonl": '{"text": "hello there"}\n'}
    for name, text in texts.items():
        (d / name).write_text(text)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "junk.model").write_bytes(os.urandom(300))
    (d / "bad.yaml").write_text("lr: [1, 2\n")
    (d / "list.yaml").write_text("- lr\n")
    (d / "ds_bad.json").write_text("{not json")
    (d / "ds_sched.json").write_text(json.dumps({"zero_optimization": {"stage": 1},
                                                 "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}))
    (d / "ds_stage.json").write_text(json.dumps({"zero_optimization": {"stage": "auto"}}))
    foreign = d / "foreign"
    (foreign / "iter_0000100").mkdir(parents=True)
    (foreign / "latest_checkpointed_iteration.txt").write_text("100")
    garbled = d / "garbled"
    (garbled).mkdir()
    (garbled / "latest_checkpointed_iteration.txt").write_text("latest\n")
    broken_meta = d / "broken_meta"
    shutil.copytree(teacher_dir, broken_meta)
    for meta in broken_meta.glob("iter_*/salt_meta.json"):
        meta.write_text("{")
    student = d / "student"
    pretrain(1, ["--data-path", corpus, *TINY, "--train-iters", "2", "--save", str(student)])
    files.update(dir=d, foreign=foreign, garbled=garbled, broken_meta=broken_meta, student=student)
    return files


def _p(world, name):
    return str(world["dir"] / name)


def _prepare(world, *args):
    return ["prepare", *args, "--output-prefix", str(world["out"] / "p"), "--workers", "1"]


def _pretrain(world, *args, data=None):
    return ["pretrain", "--data-path", data or world["corpus"], *TINY, "--train-iters", "4",
            "--save", str(world["out"] / "ckpt"), "--metrics-file", str(world["out"] / "m.jsonl"), *args]


# (name, argv from the world, pattern the one line must match)
CASES = [
    # prepare
    ("prepare: missing input", lambda w: _prepare(w, "--input", _p(w, "nope.jsonl"), "--vocab-size", "300"),
     r"input file not found: .*nope.jsonl"),
    ("prepare: empty input", lambda w: _prepare(w, "--input", _p(w, "empty.txt"), "--vocab-size", "300"),
     r"input file is empty"),
    ("prepare: a line that is not JSON", lambda w: _prepare(w, "--input", _p(w, "bad_json.jsonl"),
                                                          "--vocab-size", "300"), r"bad_json.jsonl:2: not valid JSON"),
    ("prepare: JSONL without the key", lambda w: _prepare(w, "--input", _p(w, "no_key.jsonl"), "--vocab-size", "300"),
     r"no_key.jsonl:1: expected a JSON object with a string 'text' field"),
    ("prepare: only empty documents", lambda w: _prepare(w, "--input", _p(w, "blank.jsonl"), "--vocab-size", "300"),
     r"no documents: .*blank.jsonl \(skipped: 1 empty documents\)"),
    ("prepare: a text file not in UTF-8", lambda w: _prepare(w, "--input", _p(w, "latin1.txt"), "--vocab-size", "300"),
     r"latin1.txt is not valid UTF-8"),
    ("prepare: both tokenizer flags", lambda w: _prepare(w, "--input", _p(w, "good.jsonl"), "--vocab-size", "300",
                                                        "--tokenizer-model", w["corpus"] + ".model"),
     r"not allowed with argument .*see salt-megatron prepare --help"),
    ("prepare: no tokenizer flag", lambda w: _prepare(w, "--input", _p(w, "good.jsonl")),
     r"give --vocab-size N \(train a SentencePiece tokenizer\), --tokenizer-model M, or --tokenizer-type "),
    ("prepare: missing tokenizer", lambda w: _prepare(w, "--input", _p(w, "good.jsonl"), "--tokenizer-model",
                                                     _p(w, "nope.model")), r"tokenizer model not found"),
    ("prepare: not a tokenizer", lambda w: _prepare(w, "--input", _p(w, "good.jsonl"), "--tokenizer-model",
                                                   _p(w, "junk.model")), r"junk.model is not a SentencePiece model"),
    ("prepare: valid fraction 1", lambda w: _prepare(w, "--input", _p(w, "good.jsonl"), "--vocab-size", "300",
                                                    "--valid-fraction", "1.0"), r"valid_fraction must be in \[0, 1\)"),
    ("prepare: unknown flag", lambda w: _prepare(w, "--input", _p(w, "good.jsonl"), "--vocab-size", "300",
                                               "--tokens", "300"),
     r"unrecognized arguments: --tokens"),
    # pretrain
    ("pretrain: no dataset", lambda w: _pretrain(w, data=_p(w, "nothere")),
     r"--data-path: no indexed dataset at .*nothere"),
    ("pretrain: corrupt .idx", lambda w: _pretrain(w, data=_p(w, "data/corrupt")),
     r"corrupt_train.idx is not a Megatron indexed-dataset index"),
    ("pretrain: truncated .bin", lambda w: _pretrain(w, data=_p(w, "data/truncated")),
     r"truncated_train.bin is shorter than .*truncated_train.idx says"),
    ("pretrain: missing tokenizer", lambda w: _pretrain(w, "--tokenizer-model", _p(w, "nope.model")),
     r"tokenizer model not found"),
    ("pretrain: not a tokenizer", lambda w: _pretrain(w, "--tokenizer-model", _p(w, "junk.model")),
     r"is not a SentencePiece model"),
    ("pretrain: --kd-steps past the run", lambda w: _pretrain(w, "--teacher-load", w["teacher"], "--kd-steps", "9"),
     r"--kd-steps \(9\) exceeds --train-iters \(4\)"),
    ("pretrain: missing teacher", lambda w: _pretrain(w, "--teacher-load", _p(w, "noteacher"), "--kd-steps", "2"),
     r"noteacher does not exist"),
    ("pretrain: teacher metadata not JSON", lambda w: _pretrain(w, "--teacher-load", str(w["broken_meta"]),
                                                               "--kd-steps", "2"), r"salt_meta.json is not valid JSON"),
    ("pretrain: --load of another tool's checkpoint", lambda w: _pretrain(w, "--load", str(w["foreign"])),
     r"says step 100 but .*iter_0000100 is not a complete salt_megatron checkpoint"),
    ("pretrain: --load of a tracker that is no step", lambda w: _pretrain(w, "--load", str(w["garbled"])),
     r"holds 'latest', not a step number"),
    ("pretrain: --save into checkpoints it does not resume", lambda w: _pretrain(w)[:-4] + [
        "--save", str(w["student"])], r"already holds checkpoints .*iter_0000002"),
    ("pretrain: resume a baseline as a SALT run", lambda w: _pretrain(w, "--load", str(w["student"]), "--teacher-load",
                                                          w["teacher"], "--kd-steps", "2"),
     r"SALT schedule: --teacher-load / --teacher-cache \(the teacher's weights\) a model "
     r"\(checkpoint: none \(no teacher\)\)"),
    ("pretrain: resume with another seed and batch", lambda w: _pretrain(w, "--load", str(w["student"]), "--seed", "7",
                                                                       "--global-batch-size", "4"),
     r"data: --seed 7 \(checkpoint: 1234\); --global-batch-size 4 \(checkpoint: 2\).*--override-data"),
    ("pretrain: resume with another LR", lambda w: _pretrain(w, "--load", str(w["student"]), "--lr", "1e-2"),
     r"LR schedule: --lr 0.01 \(checkpoint: 0.003\).*--override-opt_param-scheduler"),
    ("pretrain: resume with another width", lambda w: _pretrain(w, "--load", str(w["student"]), "--hidden-size",
                                                              "32"), r"the model differs \(hidden_size 32 \(checkpoint: 64\)"),
    ("pretrain: YAML that does not parse", lambda w: _pretrain(w, "--config", _p(w, "bad.yaml")),
     r"bad.yaml: not valid YAML"),
    ("pretrain: YAML that is a list", lambda w: _pretrain(w, "--config", _p(w, "list.yaml")),
     r"list.yaml: expected a mapping"),
    ("pretrain: DeepSpeed JSON that does not parse", lambda w: _pretrain(w, "--deepspeed", "--deepspeed-config",
                                                                        _p(w, "ds_bad.json")), r"not valid JSON"),
    ("pretrain: DeepSpeed scheduler", lambda w: _pretrain(w, "--deepspeed", "--deepspeed-config",
                                                         _p(w, "ds_sched.json")), r"defines a scheduler"),
    ("pretrain: DeepSpeed ZeRO stage auto", lambda w: _pretrain(w, "--deepspeed", "--deepspeed-config",
                                                               _p(w, "ds_stage.json")), r"ZeRO stage 'auto'"),
    ("pretrain: renamed flag", lambda w: _pretrain(w, "--kd-score", "salt"), r"--kd-score was renamed --kd-select-by"),
    ("pretrain: selection without a sidecar", lambda w: _pretrain(w, "--teacher-load", w["teacher"], "--kd-steps",
                                                                 "2", "--kd-data-selection", "top"),
     r"no SALT score sidecar .*run `salt-megatron score` first"),
    ("pretrain: bf16 on a CPU", lambda w: _pretrain(w, "--bf16"), r"--bf16/--fp16 need a GPU"),
    ("pretrain: malformed extra validation set", lambda w: _pretrain(w, "--extra-valid-data-path", "x"),
     r"NAME=PREFIX"),
    # score
    ("score: missing SLM", lambda w: ["score", "--load", _p(w, "nope"), "--data-path", w["corpus"]],
     r"nope does not exist"),
    ("score: pipeline parallel", lambda w: ["score", "--load", w["teacher"], "--data-path", w["corpus"],
                                           "--pipeline-model-parallel-size", "2"], r"without pipeline parallelism"),
    ("score: top-0", lambda w: ["score", "--load", w["teacher"], "--data-path", w["corpus"], "--score-topk", "0"],
     r"--score-topk must be >= 1"),
    ("score: no such split", lambda w: ["score", "--load", w["teacher"], "--data-path", w["corpus"] + "_train",
                                       "--subset", "valid"], r"has no valid split"),
    # evaluate
    ("evaluate: missing checkpoint", lambda w: ["evaluate", "--load", _p(w, "nope"), "--data-path", w["corpus"]],
     r"checkpoint directory .*nope does not exist"),
    ("evaluate: no dataset", lambda w: ["evaluate", "--load", str(w["student"]), "--data-path", _p(w, "nothere")],
     r"--data-path: no indexed dataset at .*nothere"),
    ("evaluate: a checkpoint that is not one", lambda w: ["evaluate", "--load", str(w["foreign"]), "--data-path",
                                                         w["corpus"]], r"no complete checkpoint in"),
]


def _written(world) -> list[str]:
    out = world["out"]
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    found += [s for s in ("salt_scores",) for p in os.listdir(os.path.dirname(world["corpus"])) if s in p]
    return found


@pytest.mark.parametrize("name, make_argv, pattern", CASES, ids=[c[0] for c in CASES])
def test_one_line_no_traceback_nothing_written(world, capfd, name, make_argv, pattern):
    before = sorted(os.listdir(world["student"]))
    with pytest.raises(SystemExit) as exit_:
        cli.main(make_argv(world))
    assert exit_.value.code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    command = make_argv(world)[0]
    assert err[0].startswith(f"salt-megatron {command}: error: ")
    import re

    assert re.search(pattern, err[0]), err[0]
    assert _written(world) == [], _written(world)
    assert sorted(os.listdir(world["student"])) == before


def test_the_battery_is_large_enough():
    assert len(CASES) >= 30 and {c[0].split(":")[0] for c in CASES} >= {"prepare", "pretrain", "score", "evaluate"}


def test_a_refusal_is_one_line_from_a_real_process_too(world):
    proc = run_cli(*_pretrain(world, "--load", str(world["foreign"])))
    assert_refused(proc, r"^salt-megatron pretrain: error: no complete checkpoint")
    assert _written(world) == []
    # --debug: the exception itself, with its traceback
    from salt_megatron.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        cli.main([*_pretrain(world, "--load", str(world["foreign"])), "--debug"])


@pytest.mark.parametrize("script, env, pattern", [
    ("score_corpus.sh", {"TEACHER": "nope"}, r"score: error: checkpoint directory nope does not exist"),
    ("pretrain_salt_gpt.sh", {"TEACHER": "TEACHER_DIR", "KD_STEPS": "99", "TRAIN_ITERS": "4"},
     r"pretrain: error: .*--kd-steps \(99\) exceeds --train-iters \(4\)"),
])
def test_launchers_pass_refusals_through_as_one_line(world, tmp_path, script, env, pattern):
    """The launchers (one torchrun process here, SALT_SMOKE=0) end with the command's one line and its exit code."""
    import re

    env = {k: (world["teacher"] if v == "TEACHER_DIR" else v) for k, v in env.items()}
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(PYTHON=sys.executable, SALT_SMOKE="0", DATA_PATH=world["corpus"], GPUS_PER_NODE="1",
                SAVE=str(tmp_path / "save"), SALT_WORKDIR=str(tmp_path), **env)
    proc = subprocess.run(["bash", str(ROOT / "examples" / script)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any(re.search(pattern, line) for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert not (tmp_path / "save").exists()
