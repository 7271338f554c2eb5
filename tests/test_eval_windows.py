"""One set of evaluation windows per held-out set, chosen by --eval-seed: the same for every run seed (so seeds
and the teacher are compared on the same text), recorded as a hash in every evaluation, and checked by the
report."""

from __future__ import annotations

import pytest

from salt_megatron.errors import SaltError
from salt_megatron.experiment.analysis import evaluation_windows
from tests.conftest import STUDENT, pretrain


def test_the_windows_do_not_depend_on_the_run_seed(corpus):
    common = ["--data-path", corpus, *STUDENT, "--train-iters", "1", "--eval-iters", "3", "--eval-interval", "1",
              "--extra-valid-data-path", f"again={corpus}_valid"]
    one, two, other = pretrain(1, [*common, "--seed", "1"], [*common, "--seed", "2"],
                               [*common, "--seed", "1", "--eval-seed", "7"])
    rows = [h["eval"][-1] for h in (one, two, other)]
    assert rows[0]["val_windows"] == rows[1]["val_windows"] != rows[2]["val_windows"]
    assert rows[0]["val_windows_again"] == rows[1]["val_windows_again"]
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # other initialisations, the same text


def _run(variant, seed, windows):
    return {"variant": variant, "seed": seed, "eval": [{"step": 10, "val_loss": 3.0, **windows}]}


def test_the_report_refuses_runs_evaluated_on_different_windows():
    same = [_run("baseline", 1, {"val_windows": "aa"}), _run("salt", 1, {"val_windows": "aa"})]
    assert evaluation_windows(same) == {"val_windows": "aa"}
    with pytest.raises(SaltError, match="evaluated on different windows"):
        evaluation_windows([*same, _run("salt", 2, {"val_windows": "bb"})])
    with pytest.raises(SaltError, match="recorded no evaluation windows"):
        evaluation_windows([*same, _run("salt", 2, {})])
    assert evaluation_windows([_run("baseline", 1, {})]) == {}
