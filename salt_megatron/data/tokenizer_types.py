"""Megatron-LM's ``--tokenizer-type`` choices, and how ``prepare`` keeps the one it used for the later commands.

==========================  ===================================================  ================================
``--tokenizer-type``        given by                                             ``prepare`` keeps it as
==========================  ===================================================  ================================
``SentencePieceTokenizer``  ``--tokenizer-model M.model`` (or ``--vocab-size``    ``PREFIX.model`` (the file)
                            alone: one is trained)
``HuggingFaceTokenizer``    ``--tokenizer-model DIR`` (with ``tokenizer.json``)   ``PREFIX.tokenizer.json`` (spec)
``GPT2BPETokenizer``        ``--vocab-file vocab.json --merge-file merges.txt``   ``PREFIX.tokenizer.json`` (spec)
``NullTokenizer``           ``--vocab-size N`` (text is space-separated ids;     ``PREFIX.tokenizer.json`` (spec)
                            EOD = N, as megatron-core's NullTokenizer)
==========================  ===================================================  ================================

``pretrain``, ``score`` and ``evaluate`` use what ``prepare`` kept beside the data unless given a tokenizer
themselves, so all agree; the tokenizer hash (of the ``.model`` file, or of the spec) covers every type and is checked
between data, teacher, student and sidecars.
"""

from __future__ import annotations

import os

from salt_megatron.data.null_tokenizer import null_spec
from salt_megatron.errors import UsageError
from salt_megatron.hf.tokenizer import spec_from_gpt2_files

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")


def spec_from_flags(tokenizer_type: str | None, *, vocab_file: str | None, merge_file: str | None,
                    vocab_size: int | None) -> dict | None:
    """The spec of a tokenizer given by flags rather than by one file (GPT2BPE, Null); None for the others."""
    if tokenizer_type not in (None, *TOKENIZER_TYPES):
        raise UsageError(f"--tokenizer-type {tokenizer_type!r}: choose one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "GPT2BPETokenizer":
        return spec_from_gpt2_files(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        if not vocab_size or vocab_size < 1:
            raise UsageError("--tokenizer-type NullTokenizer needs --vocab-size N (ids 0..N-1; N is the EOD)")
        return null_spec(vocab_size)
    if vocab_file or merge_file:
        raise UsageError("--vocab-file / --merge-file are for --tokenizer-type GPT2BPETokenizer")
    return None


def check_type(tokenizer, tokenizer_type: str | None, source: str) -> None:
    """Refuse a tokenizer whose kind is not the ``--tokenizer-type`` asked for."""
    if tokenizer_type is None:
        return
    spec = getattr(tokenizer, "spec", None)
    kind = "SentencePieceTokenizer" if spec is None else spec.get("type", "HuggingFaceTokenizer")
    if kind != tokenizer_type:
        raise UsageError(f"--tokenizer-type {tokenizer_type}, but {source} is a {kind}")


def tokenizer_from_flags(args, default_path):
    """The tokenizer ``--tokenizer-type``/``--tokenizer-model``/``--vocab-file``/``--merge-file``/``--vocab-size``
    name, else the one at ``default_path()`` (what ``prepare`` kept, or what a checkpoint recorded: a path, or the
    spec of a tokenizer that has no file)."""
    from salt_megatron.data.tokenizer import load_tokenizer, tokenizer_from_spec

    kind = getattr(args, "tokenizer_type", None)
    spec = spec_from_flags(kind, vocab_file=getattr(args, "vocab_file", None),
                           merge_file=getattr(args, "merge_file", None), vocab_size=getattr(args, "vocab_size", None))
    if spec is not None:
        return tokenizer_from_spec(spec, kind)
    path = args.tokenizer_model or default_path()
    if isinstance(path, dict):  # a checkpoint's record of a tokenizer given by flags (no file of its own)
        return tokenizer_from_spec(path, path.get("type", "HuggingFaceTokenizer"))
    tokenizer = load_tokenizer(path)
    check_type(tokenizer, kind, path)
    return tokenizer


def checkpoint_record(tokenizer) -> str | dict:
    """What a checkpoint records to find its tokenizer again: its file, or its spec when it has none."""
    if os.path.exists(tokenizer.model_path):
        return os.path.abspath(tokenizer.model_path)
    return tokenizer.spec
