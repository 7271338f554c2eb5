"""Running ``salt-megatron`` as a user does (a subprocess), and what a refusal must look like."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env_extra=None, timeout=600, shell_prefix=None) -> subprocess.CompletedProcess:
    """``python -m salt_megatron.cli ARGS`` from the repository root; ``shell_prefix`` (e.g. ``ulimit -f 64``) runs
    it under bash after that command."""
    cmd = [sys.executable, "-m", "salt_megatron.cli", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if shell_prefix:
        cmd = ["bash", "-c", shell_prefix + ' && exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit code 2, no traceback, and exactly one line on stderr, matching ``pattern``; returns that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def refused_in_process(capfd, argv, pattern: str) -> str:
    """``salt_megatron.cli.main(argv)`` in this process (for refusals that come before any process group): exit code
    2 and one line on stderr matching ``pattern``; an exception escaping the handler fails the test as it is."""
    import pytest

    from salt_megatron import cli

    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith(f"salt-megatron {argv[0]}: error: ") and re.search(pattern, lines[0]), lines[0]
    return lines[0]


def train_losses(metrics_file) -> list[float]:
    """The training losses a ``--metrics-file`` recorded, in the order they were written (a resumed run appends)."""
    with open(metrics_file) as f:
        return [row["loss"] for row in map(json.loads, f) if row["kind"] == "train"]
