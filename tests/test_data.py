"""Data pipeline on a slice of the real corpus: tokenizer, prepare (.bin/.idx), GPTDatasets, Megatron batch order."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import salt_megatron  # noqa: F401  (CPU patches before megatron.core)
from megatron.core.datasets.indexed_dataset import IndexedDataset
from salt_megatron.data import (
    build_gpt_datasets,
    export_sotu,
    global_batch_indices,
    load_tokenizer,
    micro_batches,
    prepare,
    tokenizer_hash,
    train_sentencepiece,
)
from salt_megatron.data.corpora import sotu_speeches
from salt_megatron.data.prepare import main as prepare_main
from salt_megatron.errors import UsageError

VOCAB = 512


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 training and 4 held-out speeches (later years), as JSONL."""
    d = tmp_path_factory.mktemp("corpus")
    speeches = sotu_speeches()[:20]
    return {
        "train": _write_jsonl(d / "train.jsonl", speeches[:16]),
        "valid": _write_jsonl(d / "valid.jsonl", speeches[16:]),
        "train_texts": [s["text"] for s in speeches[:16]],
        "valid_texts": [s["text"] for s in speeches[16:]],
    }


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("prepared") / "sotu")
    result = prepare([corpus["train"]], prefix, vocab_size=VOCAB, valid_inputs=[corpus["valid"]], workers=1,
                     progress=False)
    return prefix, result


def _documents(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


# --- tokenizer -------------------------------------------------------------------------------------------------

def test_tokenizer_training_is_deterministic_and_round_trips(corpus, tmp_path):
    a = train_sentencepiece([corpus["train"]], str(tmp_path / "a"), VOCAB)
    b = train_sentencepiece([corpus["train"]], str(tmp_path / "b"), VOCAB)
    assert a.endswith("a.model") and open(a, "rb").read() == open(b, "rb").read()
    assert tokenizer_hash(a) == tokenizer_hash(b) and len(tokenizer_hash(a)) == 64

    tok = load_tokenizer(a)
    assert tok.vocab_size == VOCAB and tok.eod == 2 and tok.pad != tok.eod
    assert tok.hash == tokenizer_hash(a) and tok.model_path == os.path.abspath(a)
    assert tok.unique_identifiers["sha256"] == tok.hash
    # Exact round trip, also for unseen text, odd whitespace and characters outside the training data.
    for text in corpus["valid_texts"][:1] + ["  two  spaces\n\n\ttab, é, 漢字 and 2024 "]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert pickle.loads(pickle.dumps(tok)).tokenize("Fellow citizens") == tok.tokenize("Fellow citizens")

    other = train_sentencepiece([corpus["valid"]], str(tmp_path / "c"), VOCAB)
    assert load_tokenizer(other).unique_identifiers != tok.unique_identifiers


def test_tokenizer_vocab_too_large_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab size"):
        train_sentencepiece([corpus["train"]], str(tmp_path / "big"), 200_000)
    assert not os.listdir(tmp_path)


# --- prepare ---------------------------------------------------------------------------------------------------

def test_prepare_writes_documents_with_eod(corpus, prepared):
    prefix, result = prepared
    for name in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx", ".model", ".json"):
        assert os.path.isfile(prefix + name), name
    tok = load_tokenizer(prefix + ".model")
    for split, texts in (("train", corpus["train_texts"]), ("valid", corpus["valid_texts"])):
        docs = _documents(f"{prefix}_{split}")
        assert len(docs) == len(texts) == result[split]["documents"]
        assert sum(map(len, docs)) == result[split]["tokens"]
        for doc, text in zip(docs, texts):
            assert doc[-1] == tok.eod and tok.eod not in doc[:-1]
            assert tok.detokenize(doc[:-1]) == text
    summary = json.load(open(prefix + ".json"))
    assert summary["tokenizer_hash"] == tokenizer_hash(prefix + ".model") == result["tokenizer_hash"]
    assert summary["train"]["documents"] == 16 and summary["valid"]["documents"] == 4
    assert result["dtype"] == "uint16" and not [f for f in os.listdir(os.path.dirname(prefix)) if ".tmp" in f]


def test_prepare_same_bytes_whatever_the_worker_count(corpus, prepared, tmp_path):
    prefix, _ = prepared
    out = str(tmp_path / "w2")
    result = prepare([corpus["train"]], out, tokenizer_model=prefix + ".model", valid_inputs=[corpus["valid"]],
                     workers=2, progress=False)
    assert result["tokenizer_hash"] == tokenizer_hash(prefix + ".model")
    for name in ("_train.bin", "_train.idx", "_valid.bin", "_valid.idx"):
        assert open(out + name, "rb").read() == open(prefix + name, "rb").read(), name


def test_valid_fraction_splits_by_document(corpus, prepared, tmp_path):
    prefix, _ = prepared
    tok = load_tokenizer(prefix + ".model")
    splits = []
    for run in ("a", "b"):
        out = str(tmp_path / run)
        prepare([corpus["train"], corpus["valid"]], out, tokenizer_model=prefix + ".model", valid_fraction=0.25,
                seed=7, progress=False)
        splits.append({s: [tok.detokenize(d[:-1]) for d in _documents(f"{out}_{s}")] for s in ("train", "valid")})
    assert splits[0] == splits[1]  # same seed, same split
    train, valid = splits[0]["train"], splits[0]["valid"]
    assert len(valid) == 5 and len(train) == 15
    everything = corpus["train_texts"] + corpus["valid_texts"]
    assert sorted(train + valid) == sorted(everything)  # whole documents, none lost or cut
    assert train == [t for t in everything if t in train]  # input order kept


def test_no_valid_split_without_asking(corpus, prepared, tmp_path):
    prefix, _ = prepared
    result = prepare([corpus["valid"]], str(tmp_path / "x"), tokenizer_model=prefix + ".model", progress=False,
                     append_eod=False)
    assert result["valid"] is None and not os.path.exists(str(tmp_path / "x_valid.bin"))
    assert load_tokenizer(prefix + ".model").eod not in sum(_documents(str(tmp_path / "x_train")), [])


def test_plain_text_is_one_document_per_file_or_per_line(prepared, tmp_path):
    prefix, _ = prepared
    tok = load_tokenizer(prefix + ".model")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First line.\n\nSecond paragraph.\n")
    b.write_text("Another file.")
    prepare([str(a), str(b)], str(tmp_path / "files"), tokenizer_model=prefix + ".model", progress=False)
    docs = [tok.detokenize(d[:-1]) for d in _documents(str(tmp_path / "files_train"))]
    assert docs == ["First line.\n\nSecond paragraph.\n", "Another file."]
    prepare([str(a)], str(tmp_path / "lines"), tokenizer_model=prefix + ".model", split_lines=True, progress=False)
    docs = [tok.detokenize(d[:-1]) for d in _documents(str(tmp_path / "lines_train"))]
    assert docs == ["First line.", "Second paragraph."]


def test_bad_inputs_are_refused_before_writing(corpus, prepared, tmp_path):
    prefix, _ = prepared
    out = tmp_path / "out"
    out.mkdir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    wrong_key = _write_jsonl(tmp_path / "key.jsonl", [{"body": "x"}])
    model = prefix + ".model"
    cases = [
        (dict(inputs=[str(tmp_path / "missing.jsonl")], vocab_size=VOCAB), "not found"),
        (dict(inputs=[str(empty)], vocab_size=VOCAB), "empty"),
        (dict(inputs=[blank], tokenizer_model=model), "no documents"),
        (dict(inputs=[str(bad_json)], tokenizer_model=model), "not valid JSON"),
        (dict(inputs=[wrong_key], tokenizer_model=model), "'text'"),
        (dict(inputs=[corpus["train"]]), "exactly one"),
        (dict(inputs=[corpus["train"]], vocab_size=VOCAB, tokenizer_model=model), "exactly one"),
        (dict(inputs=[corpus["train"]], tokenizer_model=str(tmp_path / "nope.model")), "not found"),
        (dict(inputs=[corpus["train"]], tokenizer_model=model, valid_inputs=[corpus["valid"]], valid_fraction=0.1),
         "not both"),
        (dict(inputs=[corpus["train"]], tokenizer_model=model, valid_fraction=1.0), "valid_fraction"),
        (dict(inputs=[corpus["train"]], vocab_size=100_000), "vocab size"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            prepare(output_prefix=str(out / "p"), progress=False, **kwargs)
        assert os.listdir(out) == [], kwargs


def test_cli(corpus, prepared, tmp_path, capsys):
    prefix, _ = prepared
    out = str(tmp_path / "cli")
    result = prepare_main(["--input", corpus["train"], corpus["valid"], "--output-prefix", out,
                           "--tokenizer-model", prefix + ".model", "--valid-fraction", "0.1", "--workers", "1"])
    assert result["train"]["documents"] + result["valid"]["documents"] == 20
    assert "train" in capsys.readouterr().out
    with pytest.raises(UsageError, match="not allowed with argument"):
        prepare_main(["--input", corpus["train"], "--output-prefix", out, "--vocab-size", "512",
                      "--tokenizer-model", prefix + ".model"])


# --- GPT datasets and batches ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datasets(prepared, tmp_path_factory):
    prefix, _ = prepared
    tok = load_tokenizer(prefix + ".model")
    cache = str(tmp_path_factory.mktemp("cache"))
    train, valid = build_gpt_datasets(prefix + "_train", prefix + "_valid", tok, seq_length=32, seed=3,
                                      train_samples=200, valid_samples=20, cache_dir=cache)
    return train, valid, cache


def test_gpt_datasets_give_shifted_labels(datasets):
    train, valid, cache = datasets
    assert len(train) >= 200 and len(valid) >= 20 and os.listdir(cache)
    batches = list(micro_batches(train, consumed_samples=8, micro_batch_size=2, global_batch_size=8, dp_rank=0,
                                 dp_size=2))
    assert len(batches) == 2
    for b in batches:
        assert b["tokens"].shape == b["labels"].shape == b["position_ids"].shape == (2, 32)
        assert b["tokens"].dtype == b["labels"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
        assert torch.equal(b["position_ids"], torch.arange(32).expand(2, 32))
        assert b["loss_mask"].eq(1).all()
    assert torch.equal(batches[0]["tokens"][0], train[8]["tokens"])
    v = next(micro_batches(valid, consumed_samples=0, micro_batch_size=4, global_batch_size=4, dp_rank=0, dp_size=1))
    assert v["tokens"].shape == (4, 32)


def test_dp_ranks_cover_the_global_batch_in_order(datasets):
    train, _, _ = datasets
    consumed, mbs, gbs, dp = 40, 2, 12, 3
    per_rank = [global_batch_indices(consumed_samples=consumed, micro_batch_size=mbs, global_batch_size=gbs,
                                     dp_rank=r, dp_size=dp) for r in range(dp)]
    assert all(len(p) == gbs // (mbs * dp) for p in per_rank)
    # Micro-batch step k, rank r: Megatron's sampler order.
    merged = [i for step in zip(*per_rank) for mb in step for i in mb]
    assert merged == list(range(consumed, consumed + gbs))
    # The collated batches hold exactly those samples.
    for r in range(dp):
        got = torch.cat([b["tokens"] for b in micro_batches(train, consumed_samples=consumed, micro_batch_size=mbs,
                                                                global_batch_size=gbs, dp_rank=r, dp_size=dp)])
        want = torch.stack([train[i]["tokens"] for mb in per_rank[r] for i in mb])
        assert torch.equal(got, want)
    # Indices past the end wrap around.
    last = next(micro_batches(train, consumed_samples=len(train) - 1, micro_batch_size=2, global_batch_size=2,
                              dp_rank=0, dp_size=1))
    assert torch.equal(last["tokens"][1], train[0]["tokens"])
    with pytest.raises(ValueError, match="multiple"):
        global_batch_indices(consumed_samples=0, micro_batch_size=2, global_batch_size=10, dp_rank=0, dp_size=2)


def test_dataset_cache_follows_the_data(corpus, prepared, tmp_path):
    """Re-running prepare into the same prefix must not reuse megatron's cached indices for the old data."""
    prefix, _ = prepared
    tok = load_tokenizer(prefix + ".model")
    out, cache = str(tmp_path / "p"), str(tmp_path / "cache")
    firsts = []
    for source in (corpus["valid"], corpus["train"]):
        prepare([source], out, tokenizer_model=prefix + ".model", progress=False)
        train, _ = build_gpt_datasets(out + "_train", None, tok, seq_length=32, seed=3, train_samples=10,
                                      valid_samples=0, cache_dir=cache)
        indexed = IndexedDataset(out + "_train")  # keep it alive: its arrays are views into its mmap
        n_tokens = int(indexed.sequence_lengths.sum())
        assert len(train) >= n_tokens // 32  # indices of this data, not the previous
        firsts.append(train[0]["tokens"])
    assert len(os.listdir(cache)) == 2 and not torch.equal(*firsts)


# --- the demo corpus -------------------------------------------------------------------------------------------

def test_export_sotu_holds_out_recent_years(tmp_path):
    train, valid = export_sotu(str(tmp_path), valid_from_year=1990)
    rows = {p: [json.loads(line) for line in open(p, encoding="utf-8")] for p in (train, valid)}
    assert max(r["year"] for r in rows[train]) < 1990 <= min(r["year"] for r in rows[valid])
    assert set(rows[train][0]) >= {"text", "year", "president"}
    years = [r["year"] for r in rows[train]]
    assert years == sorted(years)
    chars = {p: sum(len(r["text"]) for r in rows[p]) for p in rows}
    assert 0.05 < chars[valid] / (chars[train] + chars[valid]) < 0.15
    with pytest.raises(ValueError):
        export_sotu(str(tmp_path), valid_from_year=1700)


def test_prepare_skips_what_it_cannot_read_and_says_how_much(corpus, prepared, tmp_path, capsys):
    """Lines that are not UTF-8 and empty documents are skipped and counted; a huge single-line document is
    tokenized whole (and the tokenizer still trains on it); never a crash or a silently empty dataset."""
    huge = "word " * 60_000  # one 300 kB line: over SentencePiece's 64 kB sentence limit
    path = tmp_path / "mixed.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"text": "a fine document"}).encode() + b"\n")
        f.write(b'{"text": "caf\xe9 latin-1"}\n')  # not UTF-8
        f.write(json.dumps({"text": "   "}).encode() + b"\n")  # empty
        f.write(b"\n")  # a blank line: no document at all
        f.write(json.dumps({"text": huge}).encode() + b"\n")
    out = str(tmp_path / "p")
    result = prepare_main(["--input", str(path), "--output-prefix", out, "--vocab-size", "300", "--workers", "1"])
    assert result["skipped"] == {"lines that are not valid UTF-8": 1, "empty documents": 1}
    assert result["train"]["documents"] == 2
    assert "skipped 1 empty documents, 1 lines that are not valid UTF-8" in capsys.readouterr().out
    docs = _documents(out + "_train")
    assert len(docs) == 2 and len(docs[1]) > 60_000  # the huge document, whole (plus its EOD)
    assert json.load(open(out + ".json"))["skipped"] == result["skipped"]
