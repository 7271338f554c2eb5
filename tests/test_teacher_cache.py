"""cache-teacher: the vocab-parallel top-K against the dense softmax (TP = 1 and 2, padding, K = V); the written
cache against a direct teacher forward; the KD phase's windows; a crash mid-way resumes to a byte-identical cache;
one-line refusals with nothing written."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from salt_megatron.kd.teacher_topk import teacher_topk, teacher_topk_from_hidden
from salt_megatron.data.teacher_cache import TeacherCache, bytes_per_token, cache_paths
from tests.conftest import STUDENT, pretrain
from tests.dist_utils import run_workers
from tests.kd_cases import make_logits

SHAPE, VOCAB = (3, 4, 24), 21  # the last 3 columns are padding


def _dense(logits, k, tau):
    logp = torch.log_softmax(logits[..., :VOCAB].double() / tau, -1)
    values, ids = torch.topk(logp, k, -1)
    rest = torch.log1p(-values.exp().sum(-1).clamp(max=1.0)) if k < VOCAB else torch.full(logp.shape[:-1], -np.inf)
    return ids, values, rest


def _tp_worker(rank, world_size, logits, cases):
    torch.distributed.init_process_group("gloo")
    w = logits.shape[-1] // world_size
    return [teacher_topk(logits[..., rank * w:(rank + 1) * w], k=k, temperature=tau, vocab_size=VOCAB,
                         tp_group=torch.distributed.group.WORLD) for k, tau in cases]


def test_the_top_k_matches_the_dense_softmax_at_tp_1_and_2():
    logits = make_logits(SHAPE, 1)
    logits[..., VOCAB:] = 100.0  # padding that would be everyone's top-1 if it counted
    cases = [(1, 1.0), (5, 1.0), (5, 2.0), (VOCAB, 1.0)]
    tp2 = run_workers(_tp_worker, 2, logits, cases)
    for i, (k, tau) in enumerate(cases):
        ids, values, rest = _dense(logits, k, tau)
        for got in (teacher_topk(logits, k=k, temperature=tau, vocab_size=VOCAB), tp2[0][i], tp2[1][i]):
            assert torch.equal(got[0], ids)
            torch.testing.assert_close(got[1].double(), values, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[2].double(), rest.double(), rtol=1e-4, atol=1e-5)
            total = got[1].double().exp().sum(-1) + got[2].double().exp()
            torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)  # a distribution


def _from_hidden_worker(rank, world_size, hidden, weight, cases):
    torch.distributed.init_process_group("gloo")
    w = weight.shape[0] // world_size
    group = torch.distributed.group.WORLD
    out = []
    for k, tau, rows in cases:
        logits = torch.empty(*hidden.shape[:2], w)
        got = teacher_topk_from_hidden(hidden, weight[rank * w:(rank + 1) * w], k=k, temperature=tau,
                                       vocab_size=VOCAB, tp_group=group, logits_out=logits, rows=rows)
        plain = teacher_topk_from_hidden(hidden, weight[rank * w:(rank + 1) * w], k=k, temperature=tau,
                                         vocab_size=VOCAB, tp_group=group, rows=rows)
        whole = teacher_topk(hidden @ weight[rank * w:(rank + 1) * w].T, k=k, temperature=tau, vocab_size=VOCAB,
                             tp_group=group)
        out.append((got, plain, whole, logits))
    return out


def test_the_top_k_from_hidden_states_is_the_top_k_of_their_logits_at_tp_1_and_2():
    """Blocks of 1, 3 and all 4 tokens of a window (one reused buffer, or the logits kept), shards narrower than k."""
    hidden, weight = make_logits((3, 4, 8), 2, 0.6).float(), make_logits((SHAPE[-1], 8), 3, 0.6).float()
    cases = [(5, 1.0, 1), (5, 2.0, 3), (VOCAB, 1.0, None), (16, 2.0, 3)]
    for world in (1, 2):
        for rank, results in enumerate(run_workers(_from_hidden_worker, world, hidden, weight, cases)):
            w = weight.shape[0] // world
            for (k, _, _), (got, plain, whole, logits) in zip(cases, results):
                torch.testing.assert_close(logits, hidden @ weight[rank * w:(rank + 1) * w].T, rtol=1e-5, atol=1e-5)
                for a, b in zip(got, plain):
                    assert torch.equal(a, b)  # keeping the logits changes nothing
                assert torch.equal(got[0], whole[0]) and got[0].shape == (3, 4, k)
                torch.testing.assert_close(got[1], whole[1], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got[2], whole[2], rtol=1e-4, atol=1e-5)


def _cache(argv):
    from salt_megatron.cache_teacher import build_parser, cache_teacher
    from salt_megatron.training.arguments import parse_with_config

    return cache_teacher(parse_with_config(build_parser(), argv))


def _cache_worker(rank, world_size, argv, fail_after=None):
    if fail_after is not None:  # a crash after `fail_after` chunks: the finished ones stay in PATH.partial/
        import salt_megatron.cache_teacher as module

        real, calls = module._cache_chunk, []

        def failing(*a, **kw):
            calls.append(1)
            if len(calls) > fail_after:
                raise KeyboardInterrupt("simulated crash")
            return real(*a, **kw)

        module._cache_chunk = failing
        try:
            _cache(argv)
        except KeyboardInterrupt:
            return None
    return _cache(argv)


def _direct_worker(rank, world_size, corpus, teacher_dir, windows, k):
    """The teacher's top-k of some windows, from its full softmax (float64), without the cache's code."""
    from salt_megatron.checkpointing import read_meta
    from salt_megatron.data.gpt_data import build_gpt_datasets, collate
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.data.windows import UnshuffledWindows
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.teacher import Teacher

    from megatron.core import tensor_parallel

    initialize_distributed(1, 1, backend="gloo")
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    meta = read_meta(teacher_dir)
    teacher = Teacher(meta, params_dtype=torch.float32, is_last_stage=True, tp_group=None)
    dataset, _ = build_gpt_datasets(corpus + "_train", None, load_tokenizer(corpus + ".model"), seq_length=32,
                                    seed=1234, train_samples=None, valid_samples=None)
    batch = collate([UnshuffledWindows(dataset).item(w) for w in windows])
    logits = teacher.logits(batch["tokens"], batch["position_ids"])
    logp = torch.log_softmax(logits[..., :meta["arch"]["vocab_size"]].double(), -1)
    values, ids = torch.topk(logp, k, -1)
    return ids.numpy(), values.numpy(), torch.log1p(-values.exp().sum(-1)).numpy()


def _argv(corpus, teacher_dir, path, *extra):
    return ["--load", teacher_dir, "--data-path", corpus, "--seq-length", "32", "--topk", "8", "--cache-path", path,
            "--micro-batch-size", "4", "--cache-chunk-windows", "8", "--no-progress", *extra]


def test_the_cache_holds_the_teachers_top_k_and_resumes_byte_identical(corpus, teacher_dir, tmp_path):
    path = str(tmp_path / "cache")
    header, = run_workers(_cache_worker, 1, _argv(corpus, teacher_dir, path, "--windows", "all"))
    cache = TeacherCache(path)
    assert header["bytes_per_token"] == bytes_per_token(8) == 8 * 6 + 4
    assert cache.windows.tolist() == list(range(header["num_windows"])) and header["num_windows"] > 16
    files = {name: open(p, "rb").read() for name, p in cache_paths(path).items() if os.path.isfile(p)}
    for p in cache_paths(path).values():
        if os.path.isfile(p):
            os.remove(p)
    assert run_workers(_cache_worker, 1, _argv(corpus, teacher_dir, path, "--windows", "all"), 2) == [None]
    assert not os.path.exists(cache_paths(path)["header"])  # nothing half-written where the cache goes
    assert len(os.listdir(cache_paths(path)["partial"])) == 1 + 2  # config + the two finished chunks
    run_workers(_cache_worker, 1, _argv(corpus, teacher_dir, path, "--windows", "all"))
    assert {name: open(p, "rb").read() for name, p in cache_paths(path).items() if os.path.isfile(p)} == files
    assert not os.path.exists(cache_paths(path)["partial"])
    # keyed by window: another micro-batch size (the teacher sees other batches) writes the same bytes
    other = str(tmp_path / "mbs3")
    run_workers(_cache_worker, 1, [*_argv(corpus, teacher_dir, other, "--windows", "all"), "--micro-batch-size", "3"])
    assert {name: open(p, "rb").read() for name, p in cache_paths(other).items() if os.path.isfile(p)} == files
    # `score --cache-topk` writes the same cache from its own teacher pass
    from tests.test_scoring import _copy_dataset, _score_worker

    copy = _copy_dataset(corpus + "_train", tmp_path / "scored")
    run_workers(_score_worker, 1, ["--load", teacher_dir, "--data-path", copy, "--no-progress", "--seq-length", "32",
                                   "--micro-batch-size", "4", "--score-chunk-windows", "8", "--cache-topk", "8",
                                   "--cache-path", str(tmp_path / "from_score")])
    assert {name: open(p, "rb").read() for name, p in cache_paths(str(tmp_path / "from_score")).items()
            if os.path.isfile(p)} == files

    # the rows are the teacher's own top-K of those windows
    windows = [0, 5, header["num_windows"] - 1]
    (ids, logprobs, rest), = run_workers(_direct_worker, 1, corpus, teacher_dir, windows, 8)
    rows = cache.rows(windows)
    assert np.array_equal(rows["ids"], ids)
    np.testing.assert_allclose(rows["logprobs"], logprobs, rtol=2e-3, atol=2e-3)  # stored as fp16
    np.testing.assert_allclose(rows["rest"], rest, rtol=1e-5, atol=1e-5)


def test_kd_windows_are_the_kd_phases_and_refusals_write_nothing(corpus, teacher_dir, tmp_path):
    from salt_megatron.data.gpt_data import build_gpt_datasets
    from salt_megatron.data.tokenizer import load_tokenizer
    from salt_megatron.data.windows import UnshuffledWindows

    path = str(tmp_path / "kd")
    header, = run_workers(_cache_worker, 1, _argv(corpus, teacher_dir, path, "--kd-steps", "3",
                                                  "--global-batch-size", "4", "--seed", "7"))
    dataset, _ = build_gpt_datasets(corpus + "_train", None, load_tokenizer(corpus + ".model"), seq_length=32, seed=7,
                                    train_samples=12, valid_samples=None)
    want = sorted({int(dataset.shuffle_index[i]) for i in range(12)})
    assert TeacherCache(path).windows.tolist() == want == sorted(UnshuffledWindows(dataset).shuffle_to_window[:12])
    assert header["seed"] == 7 and header["num_windows"] == 12

    from salt_megatron.errors import SaltError

    for extra, message in ((["--windows", "all", "--topk", "100000"], "larger than the vocabulary"),
                           (["--kd-steps", "3"], "--global-batch-size"),
                           (["--windows", "all", "--topk", "0"], "--topk must be >= 1")):
        with pytest.raises(SaltError, match=message):
            _cache(_argv(corpus, teacher_dir, str(tmp_path / "refused"), *extra))
    assert not any(name.startswith("refused") for name in os.listdir(tmp_path))


def _kd_run(corpus, *extra, iters="3", gbs="4"):
    return ["--data-path", corpus, *STUDENT, "--train-iters", iters, "--eval-iters", "1", "--kd-steps", "2",
            "--global-batch-size", gbs, "--seed", "5", *extra]


def test_pretrain_with_the_cache_runs_no_teacher_and_matches_online_kd_at_k_equal_v(corpus, teacher_dir, tmp_path):
    """K = V: the cached KD is the online KD up to the fp16 storage of the log-probabilities; the cache is keyed by
    window, so a run with another batch layout (GBS 2 x 4 steps, PP 2) reads it too, and DeepSpeed (DP 2)."""
    path = str(tmp_path / "full")
    run_workers(_cache_worker, 1, _argv(corpus, teacher_dir, path, "--topk", "512", "--kd-steps", "2",
                                        "--global-batch-size", "4", "--seed", "5"))
    online, = pretrain(1, _kd_run(corpus, "--teacher-load", teacher_dir))
    cached, = pretrain(1, _kd_run(corpus, "--teacher-cache", path))
    for a, b in zip(online["train"], cached["train"]):
        assert a["kd_weight"] == b["kd_weight"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["kd"] == pytest.approx(a["kd"], abs=1e-4)
    assert [r["teacher_ran"] for r in online["train"]] == [True, True, False]
    assert not any(r["teacher_ran"] for r in cached["train"])
    # the same 8 KD-phase samples as 4 steps of 2, over 2 pipeline stages (the cached rows travel with the batch to
    # the last stage): every window is in the cache
    other, = pretrain(2, ["--data-path", corpus, *STUDENT, "--train-iters", "4", "--eval-iters", "1", "--seed", "5",
                          "--teacher-cache", path, "--kd-steps", "4", "--global-batch-size", "2",
                          "--micro-batch-size", "1", "--pipeline-model-parallel-size", "2"])
    assert [r["kd_weight"] for r in other["train"]] == [0.5] * 4 and not any(r["teacher_ran"] for r in other["train"])
    assert all(r["kd"] == r["kd"] for r in other["train"])  # finite
    # 2 data-parallel ranks under DeepSpeed ZeRO-1: the same first step as the single process
    config = tmp_path / "zero1.json"
    config.write_text('{"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto", '
                      '"gradient_accumulation_steps": "auto"}')
    ds, = pretrain(2, _kd_run(corpus, "--teacher-cache", path, "--deepspeed", "--deepspeed-config", str(config)))
    assert ds["train"][0]["loss"] == pytest.approx(cached["train"][0]["loss"], rel=1e-5)
    assert not any(r["teacher_ran"] for r in ds["train"]) and all(r["loss"] == r["loss"] for r in ds["train"])


def test_a_cache_that_does_not_fit_the_run_is_refused_in_one_line(corpus, teacher_dir, tmp_path):
    from salt_megatron.errors import SaltError
    from salt_megatron.training.loop import main_returning

    path = str(tmp_path / "c")
    run_workers(_cache_worker, 1, _argv(corpus, teacher_dir, path, "--kd-steps", "2", "--global-batch-size", "4",
                                        "--seed", "5"))
    save = str(tmp_path / "save")
    # refused by the flag checks and check_inputs, before any process group: in this process
    for extra, message in ((["--kd-temperature", "2"], "--kd-temperature 1.0, this run uses 2.0"),
                           (["--teacher-load", teacher_dir], "give one"),
                           (["--kd-transition", "auto"], "top-K cache does not hold"),
                           (["--kd-token-weighting", "teacher_top1"], "full logits")):
        with pytest.raises(SaltError, match=message):
            main_returning([*_kd_run(corpus, "--save", save), "--teacher-cache", path, *extra])
    with pytest.raises(SaltError, match="no teacher cache"):
        main_returning([*_kd_run(corpus, "--save", save), "--teacher-cache", str(tmp_path / "nothing")])
    # refused once the KD phase's windows are known (after the datasets are built), before the first step
    for extra, message in ((["--kd-steps", "3"], "lacks window .* which step 2 would read first"),
                           (["--seed", "6"], "seed 5, this run's KD phase reads those of seed 6")):
        error, = run_workers(_refused_worker, 1, [*_kd_run(corpus, "--save", save, "--teacher-cache", path), *extra])
        assert error is not None and re.search(message, error) and "\n" not in error, (extra, error)
    assert not os.path.exists(save)


def _refused_worker(rank, world_size, argv):
    from salt_megatron.errors import SaltError
    from salt_megatron.training.loop import main_returning

    try:
        main_returning(argv)
    except SaltError as e:
        return str(e)
    return None
