"""Hugging Face tokenizers (a directory with ``tokenizer.json``, e.g. a model ``import-hf`` read) and the tokenizer
*spec* files ``prepare`` writes for them (and for GPT-2 BPE and NullTokenizer, see ``data/tokenizer_types.py``).

A tokenizer is described by a *spec*: the ``tokenizer.json`` text (whose post-processor adds BOS where the model
wants it, as ``transformers`` does), the BOS/EOS ids (as the model's ``config.json`` / ``tokenizer_config.json``
say; EOS ends each document), and the model's vocabulary size (``config.json``'s
``vocab_size`` may exceed the tokenizer's: Qwen2 pads its embedding).  ``prepare`` stores the spec as one file,
``PREFIX.tokenizer.json``; its hash is the sha256 of the spec, so the directory and the prepared copy hash alike, and
a teacher, its student's data and the score sidecars all agree on it.  Reading needs ``tokenizers`` (the ``hf``
extra), not ``transformers``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

from salt_megatron.errors import DataError, MissingFile, require_modules

SPEC_MARKER = "salt_megatron_hf_tokenizer"
SPEC_SUFFIX = ".tokenizer.json"  # what prepare writes beside the datasets


def is_hf_tokenizer(path: str) -> bool:
    """A Hugging Face tokenizer directory, or a spec file ``prepare`` wrote."""
    if os.path.isdir(path):
        return True
    if not (path.endswith(".json") and os.path.isfile(path)):
        return False
    with open(path, "rb") as f:  # keys are sorted: the marker precedes the long tokenizer_json
        return SPEC_MARKER.encode() in f.read(512)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _token_id(vocab: dict, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        token = token.get("content")
    return vocab.get(token) if isinstance(token, str) else None


def spec_from_directory(directory: str) -> dict:
    """The spec of an HF tokenizer directory (``tokenizer.json`` required; ``tokenizer_config.json`` and
    ``config.json`` say BOS/EOS and the model's vocabulary size)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise MissingFile(f"{directory} has no tokenizer.json: a Hugging Face tokenizer directory needs one "
                          "(SentencePiece-only directories: pass the .model file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:  # parsed once here (Llama-3's is 9 MB), and kept whole as text in the spec
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    model_vocab = (parsed.get("model") or {}).get("vocab") or {}
    if isinstance(model_vocab, list):  # unigram models: [[piece, score], ...] in id order
        model_vocab = {entry[0]: i for i, entry in enumerate(model_vocab)}
    vocab = {**model_vocab, **{entry["content"]: entry["id"] for entry in parsed.get("added_tokens", [])}}
    tok_config = os.path.join(directory, "tokenizer_config.json")
    tok_config = _read_json(tok_config) if os.path.isfile(tok_config) else {}
    model_config = os.path.join(directory, "config.json")
    model_config = _read_json(model_config) if os.path.isfile(model_config) else {}
    bos = model_config.get("bos_token_id", _token_id(vocab, tok_config.get("bos_token")))
    eos = model_config.get("eos_token_id", _token_id(vocab, tok_config.get("eos_token")))
    if isinstance(eos, list):  # Llama-3.x instruct models list several; the first ends a document
        eos = eos[0]
    if isinstance(bos, list):
        bos = bos[0]
    if eos is None:
        raise DataError(f"{directory}: no end-of-sequence token (eos_token_id in config.json or eos_token in "
                        "tokenizer_config.json): documents could not be separated")
    return {
        SPEC_MARKER: 1,
        "tokenizer_json": text,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "model_vocab_size": model_config.get("vocab_size"),
    }


def spec_from_gpt2_files(vocab_file: str, merge_file: str) -> dict:
    """Megatron-LM's GPT2BPETokenizer (GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``, EOD
    ``<|endoftext|>``, no BOS) as a spec."""
    require_modules("hf", "tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    for path, flag in ((vocab_file, "--vocab-file"), (merge_file, "--merge-file")):
        if not path or not os.path.isfile(path):
            raise MissingFile(f"GPT2BPETokenizer needs {flag} (GPT-2's vocab.json / merges.txt): {path} not found")
    try:
        bpe = models.BPE.from_file(vocab_file, merge_file)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type for a bad file
        raise DataError(f"{vocab_file} / {merge_file}: not a GPT-2 BPE vocabulary and merges ({e})") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    eod = tokenizer.token_to_id("<|endoftext|>")
    if eod is None:
        raise DataError(f"{vocab_file} has no <|endoftext|> token (GPT2BPETokenizer's end of document)")
    return {SPEC_MARKER: 1, "type": "GPT2BPETokenizer", "tokenizer_json": tokenizer.to_str(), "bos_token_id": None,
            "eos_token_id": eod, "model_vocab_size": None}


def read_spec(path: str) -> dict:
    if os.path.isdir(path):
        return spec_from_directory(path)
    spec = _read_json(path)
    if not isinstance(spec, dict) or spec.get(SPEC_MARKER) != 1:
        raise DataError(f"{path} is not a tokenizer spec written by `salt-megatron prepare`")
    return spec


def spec_bytes(spec: dict) -> bytes:
    """A spec as ``prepare`` writes it: sorted keys, so equal specs are equal bytes."""
    return json.dumps(spec, sort_keys=True).encode()


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(spec_bytes(spec)).hexdigest()


class HFGPTTokenizer:
    """An HF ``tokenizers`` tokenizer with what megatron-core's GPTDataset and ``prepare`` use (``eod``,
    ``vocab_size``, ``tokenize``, ``unique_identifiers``)."""

    def __init__(self, path: str, spec: dict | None = None):
        """From a directory or a spec file (``path``), or from a ``spec`` made in memory (``path`` names it)."""
        require_modules("hf", "tokenizers")
        from tokenizers import Tokenizer

        if spec is None and not os.path.exists(path):
            raise MissingFile(f"tokenizer model not found: {path}")
        self.model_path = os.path.abspath(path) if spec is None else path
        self.spec = read_spec(path) if spec is None else spec
        self.hash = spec_hash(self.spec)
        try:
            self._tokenizer = Tokenizer.from_str(self.spec["tokenizer_json"])
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type for a bad file
            raise DataError(f"{path}: tokenizer.json does not load ({e})") from None
        self.bos = self.spec["bos_token_id"]
        self.eod = self.spec["eos_token_id"]
        # the model's vocabulary when it is larger (its embedding rows beyond the tokenizer are never produced)
        self.vocab_size = max(self._tokenizer.get_vocab_size(with_added_tokens=True),
                              self.spec.get("model_vocab_size") or 0)

    def tokenize(self, text: str) -> list[int]:
        # special tokens as the tokenizer's own post-processor adds them (BOS for Llama; nothing for SmolLM2, Qwen2)
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("sha256", self.hash)])

    def __reduce__(self):
        return (HFGPTTokenizer, (self.model_path, self.spec))
