"""The console lines: compact by default; with --log-format megatron, Megatron-LM's own iteration and validation
lines, field for field (log parsers written for Megatron-LM read them), with numbers true to their names."""

from __future__ import annotations

import io
import json
import re

from salt_megatron.training.metrics import MetricsWriter
from tests.cli_run import run_cli
from tests.conftest import STUDENT

STEP = {"loss": 3.25, "ce": 4.5, "kd": 2.0, "kd_weight": 0.5, "lr": 1.5e-4, "step_time_s": 1.2345,
        "tokens_per_s": 1000.0, "grad_norm": 1.25, "grad_norm_measured": True, "skipped": False,
        "consumed_samples": 5120, "global_batch_size": 512}
# Megatron-LM's training_log: " [date] iteration N/ M | consumed samples: ... | elapsed time per iteration (ms): ..."
MEGATRON_ITERATION = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| "
    r"elapsed time per iteration \(ms\): ([\d.]+) \| learning rate: ([\d.E+-]+) \| global batch size: +(\d+) \| "
    r"lm loss: ([\d.E+-]+) \|(.*) loss scale: 1\.0 \| grad norm: ([\d.]+) \| number of skipped iterations: +(\d+) \| "
    r"number of nan iterations: +(\d+) \|$")


def test_megatron_iteration_line_is_megatron_lms():
    out = io.StringIO()
    writer = MetricsWriter(enabled=True, stream=out, log_format="megatron")
    writer.train(10, 100, STEP)
    writer.train(11, 100, {**STEP, "kd": None, "kd_weight": 0.0, "loss": 4.5, "skipped": True})
    first, second = out.getvalue().splitlines()
    m = MEGATRON_ITERATION.match(first)
    assert m, first
    assert m.groups()[:7] == ("10", "100", "5120", "1234.5", "1.500000E-04", "512", "4.500000E+00")  # lm loss = CE
    assert m.group(8) == " kd loss: 2.000000E+00 | salt loss: 3.250000E+00 | kd weight: 0.500 |"
    m2 = MEGATRON_ITERATION.match(second)
    assert m2 and m2.group(8) == "" and m2.group(10) == "1" and m2.group(11) == "0", second
    # a log interval of two steps: the mean step time and the skipped count over both, as Megatron-LM prints them
    writer.train(12, 100, {**STEP, "step_time_s": 1.0, "skipped": True}, echo=False)
    writer.train(13, 100, {**STEP, "step_time_s": 3.0})
    m3 = MEGATRON_ITERATION.match(out.getvalue().splitlines()[2])
    assert m3.group(4) == "2000.0" and m3.group(10) == "1", out.getvalue()
    writer.eval(11, {"val_loss": 4.0, "val_ppl": 54.598})
    lines = out.getvalue().splitlines()[3:]
    assert lines[1] == " validation loss at iteration 11 | lm loss value: 4.000000E+00 | lm loss PPL: 5.459800E+01 | "
    assert set(lines[0]) == set(lines[2]) == {"-"}


def test_pretrain_prints_megatron_lines_true_to_the_metrics(corpus, tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = run_cli("pretrain", "--data-path", corpus, *STUDENT, "--train-iters", "2", "--eval-iters", "1",
                   "--log-format", "megatron", "--metrics-file", metrics, "--global-batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if json.loads(line)["kind"] == "train"]
    lines = [MEGATRON_ITERATION.match(line) for line in proc.stdout.splitlines() if "] iteration " in line]
    assert len(lines) == 2 and all(lines), proc.stdout
    for m, row in zip(lines, rows):
        assert int(m.group(3)) == row["consumed_samples"] == 4 * row["step"] and int(m.group(6)) == 4
        assert float(m.group(7)) == float(f"{row['ce']:.6E}") and abs(float(m.group(9)) - row["grad_norm"]) < 1e-3
    assert "validation loss at iteration 2 | lm loss value:" in proc.stdout
