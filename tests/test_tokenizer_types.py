"""Megatron-LM's --tokenizer-type choices: prepare keeps the one it used, pretrain/evaluate agree with it, the hash
covers each type, and a wrong or malformed tokenizer is one line."""

from __future__ import annotations

import json

import pytest

from tests.cli_run import refused_in_process, run_cli
from tests.conftest import STUDENT
from tests.hf_models import text

pytest.importorskip("tokenizers")
TINY = [*STUDENT, "--train-iters", "2", "--eval-iters", "1", "--make-vocab-size-divisible-by", "16"]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """GPT-2-style vocab.json + merges.txt (a byte-level BPE with <|endoftext|>), as Megatron-LM users have them."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([text(3000, seed) for seed in range(3)], vocab_size=400,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(out))
    return out / "vocab.json", out / "merges.txt"


def _docs(path, rows):
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return path


def test_gpt2_bpe_prepare_pretrain_evaluate(gpt2_files, tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    from salt_megatron.data.tokenizer import tokenizer_hash
    from salt_megatron.hf.tokenizer import spec_from_gpt2_files, spec_hash

    vocab, merges = gpt2_files
    rows = [text(150, seed) for seed in range(30)]
    docs = _docs(tmp_path / "docs.jsonl", rows)
    flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]
    proc = run_cli("prepare", "--input", docs, "--output-prefix", tmp_path / "d", *flags, "--valid-fraction", "0.1",
                   "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "d.json").read_text())
    assert summary["tokenizer_model"].endswith("d.tokenizer.json")
    assert summary["tokenizer_hash"] == tokenizer_hash(str(tmp_path / "d.tokenizer.json")) == spec_hash(
        spec_from_gpt2_files(str(vocab), str(merges)))
    reference = ByteLevelBPETokenizer(str(vocab), str(merges))
    eod = reference.token_to_id("<|endoftext|>")
    tokens = summary["train"]["tokens"] + summary["valid"]["tokens"]
    assert tokens == sum(len(reference.encode(row).ids) + 1 for row in rows) and summary["eod"] == eod
    # pretrain with the flags (recorded as a spec: no file of its own) and evaluate with what it recorded
    proc = run_cli("pretrain", "--data-path", tmp_path / "d", *TINY, *flags, "--save", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ckpt" / "iter_0000002" / "salt_meta.json").read_text())
    assert meta["tokenizer_model"]["type"] == "GPT2BPETokenizer" and meta["tokenizer_hash"] == summary[
        "tokenizer_hash"]
    proc = run_cli("evaluate", "--load", tmp_path / "ckpt", "--data-path", tmp_path / "d", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_null_tokenizer_ids_as_text(tmp_path):
    rows = [" ".join(str((7 * i + seed) % 50) for i in range(120)) for seed in range(20)]
    docs = _docs(tmp_path / "ids.jsonl", rows)
    proc = run_cli("prepare", "--input", docs, "--output-prefix", tmp_path / "n", "--tokenizer-type", "NullTokenizer",
                   "--vocab-size", "50", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "n.json").read_text())
    assert summary["eod"] == 50 and summary["vocab_size"] == 51 and summary["train"]["tokens"] == 20 * 121
    proc = run_cli("pretrain", "--data-path", tmp_path / "n", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = _docs(tmp_path / "bad.jsonl", ["1 2 77"])
    # found while tokenising (after the progress bar started): the last line, exit 2, no traceback, nothing written
    proc = run_cli("prepare", "--input", bad, "--output-prefix", tmp_path / "b", "--tokenizer-type", "NullTokenizer",
                   "--vocab-size", "50", "--workers", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("NullTokenizer: id 77 is outside [0, 50) (--vocab-size 50)")
    assert not list(tmp_path.glob("b.*")) and not list(tmp_path.glob("b_*"))


@pytest.mark.parametrize("argv, pattern", [
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "nope.json", "--merge-file", "nope.txt"],
     r"GPT2BPETokenizer needs --vocab-file .*nope.json not found"),
    (["--tokenizer-type", "NullTokenizer"], r"NullTokenizer needs --vocab-size N"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--vocab-size", "50"], r"HuggingFaceTokenizer needs --tokenizer-model"),
    (["--vocab-file", "v.json", "--vocab-size", "50"], r"--vocab-file / --merge-file are for --tokenizer-type "
                                                       r"GPT2BPETokenizer"),
])
def test_malformed_tokenizer_flags_are_one_line(tmp_path, capfd, argv, pattern):
    docs = _docs(tmp_path / "docs.jsonl", ["a b c"])
    refused_in_process(capfd, ["prepare", "--input", docs, "--output-prefix", tmp_path / "x", *argv], pattern)
    assert not list(tmp_path.glob("x*"))


def test_a_tokenizer_of_another_type_is_refused(corpus, tmp_path, capfd):
    refused_in_process(capfd, ["pretrain", "--data-path", corpus, *TINY, "--tokenizer-type", "HuggingFaceTokenizer"],
                       r"--tokenizer-type HuggingFaceTokenizer, but .*sotu.model is a SentencePieceTokenizer")


def test_prepare_refuses_a_tokenizer_of_another_type(corpus, tmp_path, capfd):
    docs = _docs(tmp_path / "docs.jsonl", ["a b c"])
    refused_in_process(capfd, ["prepare", "--input", docs, "--output-prefix", tmp_path / "x", "--tokenizer-type",
                               "HuggingFaceTokenizer", "--tokenizer-model", corpus + ".model"],
                       r"--tokenizer-type HuggingFaceTokenizer, but .*sotu.model is a SentencePieceTokenizer")
    assert not list(tmp_path.glob("x*"))
