"""megatron-core's speed and memory switches (``training/performance_arguments.py``) on CPU processes over gloo:
each must train the same numbers as the run without it (they change where and when things are computed, not what),
with the teacher, and resume exactly.  (Sequence parallelism needs TE's or apex's LayerNorm: a GPU-only path.)"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.conftest import STUDENT, pretrain


def _train(history):
    return [(h["loss"], h["ce"]) for h in history["train"]]


def _same(a, b, rel):
    assert len(a["train"]) == len(b["train"])
    for (loss_a, ce_a), (loss_b, ce_b) in zip(_train(a), _train(b)):
        assert loss_a == pytest.approx(loss_b, rel=rel) and ce_a == pytest.approx(ce_b, rel=rel)


def _common(corpus, teacher_dir, *extra):
    return ["--data-path", corpus, *STUDENT, "--global-batch-size", "4", "--train-iters", "4", "--eval-iters", "1",
            "--teacher-load", teacher_dir, "--kd-steps", "2", "--kd-weight", "0.5", "--kd-temperature", "2.0", *extra]


def test_distributed_optimizer_with_overlaps_trains_and_resumes_like_plain_adam(corpus, teacher_dir, tmp_path):
    """DP = 2: megatron-core's distributed optimizer (reduce-scatter of gradients, all-gather of parameters), with
    the gradient reduction and the parameter gather overlapped, against the plain optimizer; then 2 steps + resume."""
    save = str(tmp_path / "run")
    flags = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    plain, sharded = pretrain(2, _common(corpus, teacher_dir), _common(corpus, teacher_dir, *flags, "--save", save,
                                                                       "--save-interval", "2"))
    _same(plain, sharded, rel=1e-5)
    resumed, = pretrain(2, _common(corpus, teacher_dir, *flags, "--load", os.path.join(save, "iter_0000002")))
    assert _train(resumed) == _train(sharded)[2:]


def test_recomputation_trains_the_same_numbers(corpus, teacher_dir):
    """Selective (attention's core) and full recomputation (uniform groups, or the first layers of the stage) at
    TP = 2: the same losses as storing the activations."""
    tp = ["--tensor-model-parallel-size", "2"]
    full = ["--recompute-granularity", "full", "--recompute-num-layers", "1", "--recompute-method"]
    plain, *recomputed = pretrain(2, _common(corpus, teacher_dir, *tp),
                                  _common(corpus, teacher_dir, *tp, "--recompute-activations"),
                                  _common(corpus, teacher_dir, *tp, *full, "uniform"),
                                  _common(corpus, teacher_dir, *tp, *full, "block"))
    for run in recomputed:
        _same(plain, run, rel=1e-6)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["DP2", "TP2", "PP2"])
def test_kd_fused_linear_trains_like_the_materialised_logits(corpus, teacher_dir, tp, pp):
    """--kd-fused-linear (the KD phase's loss from the output layers' inputs; tied embeddings here): the same losses
    as the materialised logits, in the KD phase and after, over two processes as DP, TP or PP."""
    common = _common(corpus, teacher_dir, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size",
                     str(pp))
    plain, fused = pretrain(2, common, [*common, "--kd-fused-linear"])
    assert [h["teacher_ran"] for h in fused["train"]] == [True, True, False, False]
    _same(plain, fused, rel=1e-5)
    for a, b in zip(plain["train"][:2], fused["train"][:2]):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                    reason="needs Transformer Engine and a GPU")
def test_a_teacher_of_either_layer_spec_teaches_under_the_other(corpus, tmp_path):
    """A teacher saved under TE's layer spec teaches a student run under the local one, and the other way round:
    the same KD numbers at step 1 (megatron-core stores the local spec's norms under TE's names)."""
    from tests.conftest import TEACHER

    kd = {}
    for impl in ("transformer_engine", "local"):
        teacher = str(tmp_path / impl)
        pretrain(1, ["--data-path", corpus, *TEACHER, "--train-iters", "2", "--save", teacher, "--eval-iters", "1",
                     "--transformer-impl", impl])
        other = "local" if impl == "transformer_engine" else "transformer_engine"
        for student_impl in (impl, other):
            run, = pretrain(1, _common(corpus, teacher, "--transformer-impl", student_impl, "--train-iters", "1"))
            kd[(impl, student_impl)] = run["train"][0]["kd"]
    for impl in ("transformer_engine", "local"):
        same = kd[(impl, impl)]
        crossed = kd[(impl, "local" if impl == "transformer_engine" else "transformer_engine")]
        assert crossed == pytest.approx(same, rel=1e-2)  # fp32 runs; TE's kernels round differently
