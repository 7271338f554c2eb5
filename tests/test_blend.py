"""Data blends as Megatron-LM takes them: the flag forms, one-line refusals, per-prefix sample counts that follow the
weights (megatron-core's BlendedDataset), --split by document, and SALT_DS across a blend with exact resume."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from salt_megatron.data.blend import Blend, data_sources, parse_blend
from salt_megatron.errors import SaltError
from tests.cli_run import refused_in_process
from tests.conftest import STUDENT, pretrain
from tests.dist_utils import run_workers

WEIGHTS = (0.2, 0.3, 0.5)


@pytest.fixture(scope="module")
def three(corpus, tmp_path_factory):
    """Three prepared datasets of different speeches (A, B, C), each with a valid split, one tokenizer."""
    from salt_megatron.data.corpora import sotu_speeches
    from salt_megatron.data.prepare import prepare

    d = tmp_path_factory.mktemp("blend")
    speeches = sotu_speeches()
    prefixes = []
    for name, lo in (("a", 60), ("b", 70), ("c", 80)):
        for part, rows in (("train", speeches[lo:lo + 6]), ("valid", speeches[lo + 6:lo + 7])):
            with open(d / f"{name}_{part}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps({"text": r["text"][:12000]}) + "\n")
        prepare([str(d / f"{name}_train.jsonl")], str(d / name), tokenizer_model=corpus + ".model",
                valid_inputs=[str(d / f"{name}_valid.jsonl")], workers=1, progress=False)
        prefixes.append(str(d / name))
    return prefixes


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group in this process: megatron-core's BlendedDataset asks torch.distributed its rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ns(**kw):
    base = dict(data_path=None, train_data_path=None, valid_data_path=None, split=None, data_args_path=None,
                per_split_data_args_path=None)
    return argparse.Namespace(**{**base, **kw})


def test_the_forms_megatron_lm_accepts(three, tmp_path):
    a, b, c = three
    one = data_sources(_ns(data_path=[a]))
    assert one.train == Blend((a + "_train",)) and one.valid == Blend((a + "_valid",)) and one.split is None
    by_size = data_sources(_ns(data_path=[a, b, c]))
    assert by_size.train == Blend(tuple(p + "_train" for p in three)) and by_size.train.weights is None
    weighted = data_sources(_ns(data_path=["2", a, "3", b, "5", c]))  # normalised
    assert weighted.train.weights == pytest.approx(WEIGHTS) and weighted.valid.prefixes[2] == c + "_valid"
    cut = data_sources(_ns(data_path=["0.5", a + "_train", "0.5", b + "_train.bin"], split="969,30,1"))
    assert cut.split == "969,30,1" and cut.train is cut.valid and cut.train.prefixes[1] == b + "_train"
    per_split = data_sources(_ns(train_data_path=[a + "_train", b + "_train"], valid_data_path=[c + "_valid"]))
    assert per_split.train.prefixes == (a + "_train", b + "_train") and per_split.valid == Blend((c + "_valid",))
    args_file = tmp_path / "blend.txt"
    args_file.write_text(f"0.2 {a}\n0.3 {b}\n0.5 {c}\n")
    assert data_sources(_ns(data_args_path=str(args_file))) == weighted
    spec = tmp_path / "per_split.json"
    spec.write_text(json.dumps({"train": [a + "_train"], "valid": ["1", b + "_valid"]}))
    got = data_sources(_ns(per_split_data_args_path=str(spec)))
    assert got.train == Blend((a + "_train",)) and got.valid == Blend((b + "_valid",), (1.0,))
    assert weighted.train.record() == [[pytest.approx(w), os.path.abspath(p + "_train")]
                                       for w, p in zip(WEIGHTS, three)]
    assert one.train.record() == os.path.abspath(a + "_train")  # as checkpoints recorded one dataset before blends


@pytest.mark.parametrize("words, message", [
    (["0.3", "A", "B"], "WEIGHT PREFIX pairs"),
    (["A", "0.3", "B", "0.7"], "WEIGHT PREFIX pairs"),
    (["0.3", "A", "0.7"], "WEIGHT PREFIX pairs"),
    (["0.3", "A", "-1", "B"], "weights must be finite, >= 0"),
    (["0", "A", "0", "B"], "not all 0"),
    (["A", "A"], "names a prefix twice"),
    ([], "is empty"),
])
def test_malformed_blends(words, message):
    with pytest.raises(SaltError, match=message):
        parse_blend(words, "--data-path")


def test_bad_data_flags_are_one_line_before_anything_is_written(three, capfd, tmp_path):
    a, b, _ = three
    save = tmp_path / "run"
    common = [*STUDENT, "--train-iters", "2", "--save", save]
    cases = [
        (["--data-path", "0.5", a, "0.5", str(tmp_path / "nothere")], r"--data-path: no indexed dataset at .*nothere"),
        (["--data-path", "0.5", a, b], r"WEIGHT PREFIX pairs"),
        (["--data-path", a, "--split", "90,x"], r"--split wants up to three"),
        (["--data-path", a, "--split", "90,10"], r"--data-path: no indexed dataset .*drop --split"),
        (["--data-path", a + "_train", "--split", "90,10", "--valid-data-path", b + "_valid"], r"cannot go with"),
        (["--data-path", a, "--data-args-path", str(tmp_path / "none.txt")], r"not both"),
        (["--data-args-path", str(tmp_path / "none.txt")], r"--data-args-path: no such file"),
        (["--data-path", a, b + "_valid"], r"some prefixes of the blend have a validation split"),
    ]
    for flags, pattern in cases:
        refused_in_process(capfd, ["pretrain", *flags, *common], pattern)
    assert not save.exists()


def test_blend_sample_counts_follow_the_weights(three, corpus, one_rank):
    """megatron-core's BlendedDataset over the three: the first N samples hold each prefix in its weight's share
    (its greedy rule: within one sample), and each sample is the named dataset's own."""
    from salt_megatron.data.gpt_data import build_gpt_datasets
    from salt_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus + ".model")
    blend = data_sources(_ns(data_path=[str(w) if i % 2 == 0 else p for w, p in zip(WEIGHTS, three)
                                        for i in (0, 1)]))
    n = 400
    train, valid = build_gpt_datasets(blend.train, blend.valid, tok, seq_length=32, seed=5, train_samples=n,
                                      valid_samples=40, cache_dir=None)
    ids = np.array([train[i]["dataset_id"] for i in range(n)])
    for d, w in enumerate(WEIGHTS):
        assert abs(int((ids == d).sum()) - w * n) <= 1
    parts = [build_gpt_datasets(p + "_train", None, tok, seq_length=32, seed=5, train_samples=None,
                                valid_samples=None)[0] for p in three]
    tokens = {d: {tuple(parts[d][j]["tokens"].tolist()) for j in range(len(parts[d]))} for d in range(3)}
    for i in range(0, n, 37):
        assert tuple(train[i]["tokens"].tolist()) in tokens[int(ids[i])]
    assert len(valid) >= 40 and {int(valid[i]["dataset_id"]) for i in range(40)} == {0, 1, 2}


def test_split_cuts_each_dataset_by_document(three, corpus):
    from salt_megatron.data.gpt_data import build_gpt_datasets
    from salt_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus + ".model")
    prefix = three[0] + "_train"
    train, valid = build_gpt_datasets(prefix, prefix, tok, seq_length=32, seed=5, train_samples=None,
                                      valid_samples=None, split="70,30")
    in_train, in_valid = set(np.asarray(train.document_index)), set(np.asarray(valid.document_index))
    assert in_train and in_valid and not in_train & in_valid
    assert sorted(in_train | in_valid) == list(range(len(train.dataset.sequence_lengths)))


def _score_worker(rank, world_size, argv):
    from salt_megatron.scoring import build_parser, score

    return score(build_parser().parse_args(argv))


def test_salt_ds_across_a_blend_keeps_the_weights_and_resumes_exactly(three, corpus, teacher_dir, tmp_path,
                                                                      one_rank):
    """One `score` call scores the three datasets (a sidecar each); the KD phase draws each prefix in its weight's
    share, only from that prefix's best-scored half; 6 straight steps equal 3 + resume."""
    blend = [w for pair in zip(map(str, WEIGHTS), three) for w in pair]
    headers = run_workers(_score_worker, 1, ["--load", teacher_dir, "--data-path", *blend, "--no-progress"])[0]
    assert len(headers) == 3 and all(os.path.isfile(p + "_train.salt_scores.json") for p in three)
    save = str(tmp_path / "run")
    common = ["--data-path", *blend, *STUDENT, "--global-batch-size", "4", "--train-iters", "6", "--eval-iters", "1",
              "--teacher-load", teacher_dir, "--kd-steps", "4", "--kd-data-selection", "top",
              "--kd-select-fraction", "0.5", "--metrics-file", str(tmp_path / "m.jsonl")]
    straight, first, resumed = pretrain(1, [*common, "--save", save, "--save-interval", "3"],
                                        [*common, "--save", str(tmp_path / "half"), "--exit-interval", "3"],
                                        [*common, "--load", str(tmp_path / "half"), "--save", str(tmp_path / "half")])
    full = [h["loss"] for h in straight["train"]]
    assert len(full) == 6
    assert [h["loss"] for h in first["train"] + resumed["train"]] == pytest.approx(full, rel=1e-6)

    from salt_megatron.config import SaltConfig
    from salt_megatron.training.arguments import build_pretrain_parser, validate_pretrain_args
    from salt_megatron.training.metrics import MetricsWriter
    from salt_megatron.training.setup import build_data, check_inputs

    args = validate_pretrain_args(build_pretrain_parser().parse_args(common), world_size=1)
    salt = SaltConfig.from_args(args)
    inputs = check_inputs(args, salt)
    kd = build_data(args, inputs, salt, MetricsWriter(enabled=False)).kd
    n = 200
    drawn = [kd.source_of(i) for i in range(n)]
    for d, w in enumerate(WEIGHTS):
        assert abs(sum(part == d for part, _ in drawn) - w * n) <= 1
    for d, (header, window_scores, _) in enumerate(inputs.sidecars.values()):
        salt_scores = np.asarray(window_scores[:, 0])
        cut = np.sort(salt_scores)[::-1][kd.parts[d].num_selected - 1]
        assert kd.parts[d].num_selected == round(0.5 * header["num_windows"])
        for part, j in drawn:
            if part == d:
                assert salt_scores[kd.parts[d].window_of(j)] >= cut


def test_salt_ds_under_split_reads_only_sidecars_of_that_split(three, teacher_dir, tmp_path, capfd):
    """With --split, the KD phase must not select windows of the validation documents: a sidecar that scored the
    whole dataset is refused in one line; `score --split` scores the train part only, and the run trains."""
    import shutil

    for suffix in ("_train.bin", "_train.idx", ".model"):
        shutil.copy(three[1] + suffix, str(tmp_path / "b") + suffix)
    prefix = str(tmp_path / "b_train")
    whole = run_workers(_score_worker, 1, ["--load", teacher_dir, "--data-path", prefix, "--no-progress"])[0][0]
    argv = ["--data-path", prefix, "--split", "80,20", *STUDENT, "--train-iters", "2", "--eval-iters", "1",
            "--teacher-load", teacher_dir, "--kd-steps", "1", "--kd-data-selection", "top"]
    refused_in_process(capfd, ["pretrain", *argv], r"scored all windows, this run cuts it with --split 80,20")
    part = run_workers(_score_worker, 1, ["--load", teacher_dir, "--data-path", prefix, "--split", "80,20",
                                          "--no-progress"])[0][0]
    assert part["split"] == "80,20" and 0 < part["num_windows"] < whole["num_windows"]
    history, = pretrain(1, argv)
    assert len(history["train"]) == 2
