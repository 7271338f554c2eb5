"""``salt-megatron prepare``: text → SentencePiece tokenizer + Megatron indexed datasets (``.bin``/``.idx``).

Outputs, all next to ``output_prefix``:
  ``PREFIX.model``                       the tokenizer (trained here, or a copy of the given one)
  ``PREFIX_train.bin/.idx``              one document per ``add_document``, EOD appended to each
  ``PREFIX_valid.bin/.idx``              only when a validation split was asked for
  ``PREFIX.json``                        counts, tokenizer hash, inputs

Documents: each line of a ``.jsonl``/``.json`` file (text under ``json_key``); each whole ``.txt`` (any other
extension) file, or each non-empty line of it with ``split_lines``.  The validation split is by document, never
inside one.  Everything is written under temporary names and renamed at the end, so an interrupted run never leaves
half-written files under the final names.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from salt_megatron.data.tokenizer_types import TOKENIZER_TYPES, check_type, spec_from_flags
from salt_megatron.hf.tokenizer import SPEC_SUFFIX, is_hf_tokenizer, read_spec, spec_bytes
from salt_megatron.data.tokenizer import iter_documents, load_tokenizer, sentencepiece_model_bytes, tokenizer_hash
from salt_megatron.files import atomic_files
from salt_megatron.errors import ArgumentParser, DataError, UsageError

_CHUNK_DOCS = 32  # documents per pool task: big enough to amortise IPC, small enough for a smooth progress bar


def _validate(inputs, output_prefix, vocab_size, tokenizer_model, valid_inputs, valid_fraction, tokenizer_spec,
              tokenizer_type):
    if tokenizer_spec is not None:
        if vocab_size is not None or tokenizer_model is not None:
            raise DataError("a tokenizer given by --tokenizer-type takes no vocab_size/tokenizer_model besides")
    elif (vocab_size is None) == (tokenizer_model is None):
        raise DataError("give exactly one of vocab_size (train a tokenizer) or tokenizer_model (use one)")
    if vocab_size is not None and vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if tokenizer_model is not None:
        if not os.path.exists(tokenizer_model):
            raise DataError(f"tokenizer model not found: {tokenizer_model}")
        # refuses a file that is no tokenizer, or not of the --tokenizer-type asked for, by name
        check_type(load_tokenizer(tokenizer_model), tokenizer_type, tokenizer_model)
    if not inputs:
        raise DataError("no input files given")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_inputs and valid_fraction > 0:
        raise DataError("give either valid_inputs or valid_fraction, not both")
    for path in list(inputs) + list(valid_inputs or []):
        if not os.path.isfile(path):
            raise DataError(f"input file not found: {path}")
        if os.path.getsize(path) == 0:
            raise DataError(f"input file is empty: {path}")
    if not output_prefix:
        raise DataError("output_prefix is empty")


def _count_documents(paths, json_key, split_lines, skipped):
    """First pass: parse everything (so malformed input fails before any work) and count documents per file;
    what is skipped (empty documents, lines that are not UTF-8) is counted in ``skipped``."""
    counts = []
    for path in paths:
        n = sum(1 for _ in iter_documents(path, json_key, split_lines, skipped))
        if n == 0:
            raise DataError(f"input file has no documents: {path}" + (
                f" (skipped: {_skipped_text(skipped)})" if skipped else ""))
        counts.append(n)
    return counts


def _skipped_text(skipped) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))


# --- tokenisation workers: the tokenizer is loaded once per process ---------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(model_path):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(model_path)


def _encode(tokenizer, texts, append_eod):
    eod = [tokenizer.eod] if append_eod else []
    return [tokenizer.tokenize(text) + eod for text in texts]


def _encode_in_worker(args):
    return _encode(_WORKER_TOKENIZER, *args)


def _chunks(paths, json_key, split_lines, append_eod):
    chunk = []
    for path in paths:
        for doc in iter_documents(path, json_key, split_lines):
            chunk.append(doc)
            if len(chunk) == _CHUNK_DOCS:
                yield chunk, append_eod
                chunk = []
    if chunk:
        yield chunk, append_eod


def _encoded_documents(model_path, paths, json_key, split_lines, append_eod, workers):
    """Token ids of every document, in input order whatever the number of workers (``imap`` keeps order)."""
    chunks = _chunks(paths, json_key, split_lines, append_eod)
    if workers <= 1:
        tokenizer = load_tokenizer(model_path)
        for texts, eod in chunks:
            yield from _encode(tokenizer, texts, eod)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        for chunk in pool.imap(_encode_in_worker, chunks):
            yield from chunk


def _split_names(valid_requested):
    return ("train", "valid") if valid_requested else ("train",)


def prepare(
    inputs,
    output_prefix,
    *,
    vocab_size=None,
    tokenizer_model=None,
    tokenizer_spec=None,
    tokenizer_type=None,
    valid_inputs=None,
    valid_fraction=0.0,
    seed=1234,
    workers=None,
    json_key="text",
    append_eod=True,
    split_lines=False,
    progress=True,
) -> dict:
    """Tokenise ``inputs`` into ``output_prefix``'s indexed datasets; return paths and counts per split.

    The validation split is the documents of ``valid_inputs`` (e.g. held-out years) if given, else a random
    ``valid_fraction`` of the input documents drawn with ``seed``; with neither, only a train split is written.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    inputs, valid_inputs = list(inputs), list(valid_inputs or [])
    _validate(inputs, output_prefix, vocab_size, tokenizer_model, valid_inputs, valid_fraction, tokenizer_spec,
              tokenizer_type)
    skipped = collections.Counter()
    train_counts = _count_documents(inputs, json_key, split_lines, skipped)
    valid_counts = _count_documents(valid_inputs, json_key, split_lines, skipped)
    n_inputs = sum(train_counts)

    # Which input documents go to validation (by running document number over all inputs).
    valid_docs = set()
    if valid_fraction > 0:
        n_valid = max(1, round(n_inputs * valid_fraction))
        if n_valid >= n_inputs:
            raise DataError(f"valid_fraction={valid_fraction} leaves no training documents out of {n_inputs}")
        valid_docs = set(np.random.default_rng(seed).choice(n_inputs, n_valid, replace=False).tolist())
    valid_requested = bool(valid_inputs) or bool(valid_docs)

    workers = workers or min(4, os.cpu_count() or 1)
    splits = _split_names(valid_requested)
    hf = tokenizer_spec is not None or (tokenizer_model is not None and is_hf_tokenizer(tokenizer_model))
    model_path = output_prefix + (SPEC_SUFFIX if hf else ".model")
    summary_path = output_prefix + ".json"
    # every output under a temporary name until all are written; then renamed in this order (each split's .idx
    # after its .bin: its presence marks a dataset as there; the summary last)
    outputs = [model_path, *(f"{output_prefix}_{split}{ext}" for split in splits for ext in (".bin", ".idx")),
               summary_path]
    with atomic_files(*outputs) as tmp_paths:
        tmp = dict(zip(outputs, tmp_paths))
        if tokenizer_spec is not None:  # GPT2BPE or Null: the spec the flags describe
            model_bytes = spec_bytes(tokenizer_spec)
        elif tokenizer_model is None:
            model_bytes = sentencepiece_model_bytes(inputs, vocab_size, json_key=json_key)
        elif hf:  # the HF tokenizer as one spec file (tokenizer.json, BOS/EOS, the model's vocabulary size)
            model_bytes = spec_bytes(read_spec(tokenizer_model))
        else:
            with open(tokenizer_model, "rb") as f:
                model_bytes = f.read()
        with open(tmp[model_path], "wb") as f:
            f.write(model_bytes)
        tokenizer = load_tokenizer(tmp[model_path])
        dtype = DType.optimal_dtype(tokenizer.vocab_size)

        builders, stats = {}, {}
        for split in splits:
            builders[split] = IndexedDatasetBuilder(tmp[f"{output_prefix}_{split}.bin"], dtype=dtype)
            stats[split] = {"documents": 0, "tokens": 0}

        total_docs = n_inputs + sum(valid_counts)
        start, n_tokens = time.time(), 0
        encoded = _encoded_documents(tmp[model_path], inputs + valid_inputs, json_key, split_lines, append_eod,
                                     workers)
        # a context: a failure closes the bar first, so the error is a line of its own
        with tqdm(total=total_docs, unit="doc", file=sys.stderr, disable=not progress, desc="tokenising") as bar:
            for i, ids in enumerate(encoded):
                split = "valid" if i >= n_inputs or i in valid_docs else "train"
                builders[split].add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                stats[split]["documents"] += 1
                stats[split]["tokens"] += len(ids)
                n_tokens += len(ids)
                bar.update(1)
                bar.set_postfix(tokens=n_tokens, tok_per_s=f"{n_tokens / max(time.time() - start, 1e-9):.0f}",
                                refresh=False)
        for split, builder in builders.items():
            builder.finalize(tmp[f"{output_prefix}_{split}.idx"])

        result = {
            "tokenizer_model": model_path,
            "tokenizer_hash": tokenizer_hash(tmp[model_path]),
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "dtype": np.dtype(dtype).name,
            "train": None,
            "valid": None,
            "skipped": dict(skipped),
        }
        for split in builders:
            prefix = f"{output_prefix}_{split}"
            result[split] = {"prefix": prefix, "bin": prefix + ".bin", "idx": prefix + ".idx", **stats[split]}
        summary = {
            **result,
            "inputs": [os.path.abspath(p) for p in inputs],
            "valid_inputs": [os.path.abspath(p) for p in valid_inputs],
            "valid_fraction": valid_fraction,
            "seed": seed,
            "json_key": json_key,
            "append_eod": append_eod,
            "split_lines": split_lines,
        }
        with open(tmp[summary_path], "w") as f:
            json.dump(summary, f, indent=2)
    result["summary"] = summary_path
    return result


def main(argv=None) -> dict:
    """CLI with Megatron's ``preprocess_data.py`` flag names where they exist."""
    p = ArgumentParser(prog="salt-megatron prepare", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl/.json or text files")
    p.add_argument("--valid-input", nargs="+", default=None, metavar="FILE", help="validation documents")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="random fraction of documents for validation")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int,
                     help="train a SentencePiece tokenizer of this size (NullTokenizer: the number of ids)")
    tok.add_argument("--tokenizer-model", metavar="M",
                     help="use this SentencePiece .model, or a Hugging Face tokenizer directory (tokenizer.json)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="Megatron-LM's tokenizer types (default: from --tokenizer-model, or SentencePiece)")
    p.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    p.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json-keys", default="text", metavar="KEY", help="JSONL field holding the text")
    p.add_argument("--split-lines", action="store_true", help="text files: each non-empty line is a document")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    args = p.parse_args(argv)
    spec = spec_from_flags(args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                           vocab_size=args.vocab_size)
    if spec is None and args.vocab_size is None and args.tokenizer_model is None:
        raise UsageError("give --vocab-size N (train a SentencePiece tokenizer), --tokenizer-model M, or "
                         "--tokenizer-type GPT2BPETokenizer/NullTokenizer with its files or size")
    if spec is not None:
        args.vocab_size = None
    elif args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model is None:
        raise UsageError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR (with tokenizer.json)")
    result = prepare(
        args.input, args.output_prefix, vocab_size=args.vocab_size, tokenizer_model=args.tokenizer_model,
        tokenizer_spec=spec, tokenizer_type=args.tokenizer_type,
        valid_inputs=args.valid_input, valid_fraction=args.valid_fraction, seed=args.seed,
        workers=args.workers, json_key=args.json_keys, append_eod=args.append_eod, split_lines=args.split_lines,
    )
    print(f"tokenizer {result['tokenizer_model']}  vocab {result['vocab_size']}  "
          f"sha256 {result['tokenizer_hash'][:12]}")
    for split in ("train", "valid"):
        if result[split]:
            s = result[split]
            print(f"{split:5s} {s['prefix']}.bin/.idx  {s['documents']} documents  {s['tokens']} tokens")
    if result["skipped"]:
        print(f"skipped {_skipped_text(result['skipped'])}")
    print(f"summary {result['summary']}")
    return result


if __name__ == "__main__":
    main()
