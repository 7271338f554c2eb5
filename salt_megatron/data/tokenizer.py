"""SentencePiece tokenizers: train one from text, load it as a megatron-core tokenizer, fingerprint it (Hugging Face
tokenizers: ``salt_megatron/hf/tokenizer.py``; :func:`load_tokenizer` and :func:`tokenizer_hash` take either).

Training settings are chosen so that a trained model round-trips any text exactly (identity normalisation, extra
whitespace kept, byte fallback for characters it never saw) and so that the same corpus always gives the same
``.model`` bytes (one trainer thread: SentencePiece records ``num_threads`` in the model file, so the thread count
would otherwise change the file hash even when the vocabulary is identical).

Reserved ids: ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` = 2 is the end-of-document token (EOD), ``<pad>`` = 3.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import OrderedDict

from megatron.core.tokenizers.text.models import GPTTokenizer

from salt_megatron.errors import DataError, MissingFile
from salt_megatron.files import write_bytes_atomically

UNK_ID, BOS_ID, EOD_ID, PAD_ID = 0, 1, 2, 3
JSON_EXTENSIONS = (".jsonl", ".json")


def is_jsonl(path: str) -> bool:
    """JSONL files (one JSON object per line) are recognised by their extension."""
    return path.lower().endswith(JSON_EXTENSIONS)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
SKIPPED_EMPTY = "empty documents"
SKIPPED_NOT_UTF8 = "lines that are not valid UTF-8"


def iter_documents(path: str, json_key: str = "text", split_lines: bool = False, skipped=None):
    """Yield the documents of one input file, skipping whitespace-only ones.

    JSONL: one document per line (text under ``json_key``).  Plain text: the whole file is one document, or each
    non-empty line is one with ``split_lines``.  Shared by tokenizer training and ``prepare`` so that both see the
    same documents.  Skipped, and counted in ``skipped`` (a ``collections.Counter``) when given: empty documents,
    and lines (of a JSONL file, or with ``split_lines``) that are not valid UTF-8.  Refused (DataError, naming the
    file and line): a JSONL line that is not JSON or lacks a string ``json_key``, and a whole-file document that is
    not valid UTF-8.
    """
    def skip(reason):
        if skipped is not None:
            skipped[reason] += 1

    # surrogateescape: bytes that are not UTF-8 become lone surrogates, found below, instead of an exception that
    # would end the whole file (text mode keeps the universal newlines that documents were always split by)
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        if is_jsonl(path) or split_lines:
            for lineno, line in enumerate(f, 1):
                if _NOT_UTF8.search(line):
                    skip(SKIPPED_NOT_UTF8)
                    continue
                if not line.strip():
                    continue  # a blank line separates nothing: not a document
                if not is_jsonl(path):
                    yield line.rstrip("\n")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                    raise DataError(f"{path}:{lineno}: expected a JSON object with a string {json_key!r} field "
                                    "(--json-keys names the field)")
                if obj[json_key].strip():
                    yield obj[json_key]
                else:
                    skip(SKIPPED_EMPTY)
        else:
            text = f.read()
            bad = _NOT_UTF8.search(text)
            if bad:
                raise DataError(f"{path} is not valid UTF-8 (character {bad.start()}): convert it (iconv -t utf-8), "
                                "or give one document per line with --split-lines to skip the bad lines")
            if text.strip():
                yield text
            else:
                skip(SKIPPED_EMPTY)


_MAX_SENTENCE_BYTES = 1 << 16
_MAX_TRAINING_CHARS = _MAX_SENTENCE_BYTES // 4  # at most 4 UTF-8 bytes a character


def _pieces_sentencepiece_keeps(line: str):
    """SentencePiece drops a sentence over max_sentence_length bytes: such a line is cut into pieces it keeps."""
    if len(line.encode("utf-8", "surrogatepass")) <= _MAX_SENTENCE_BYTES:
        return [line]
    return [line[i:i + _MAX_TRAINING_CHARS] for i in range(0, len(line), _MAX_TRAINING_CHARS)]


def _training_sentences(input_files, json_key, max_sentences):
    """The non-empty lines of all documents; evenly thinned to ``max_sentences`` so the sample spans the corpus.

    SentencePiece's own sampling (``input_sentence_size``) is random; thinning here keeps training deterministic.
    """
    lines = [
        piece
        for path in input_files
        for doc in iter_documents(path, json_key)
        for line in doc.split("\n")
        if line.strip()
        for piece in _pieces_sentencepiece_keeps(line)
    ]
    if max_sentences and len(lines) > max_sentences:
        step = len(lines) / max_sentences
        lines = [lines[int(i * step)] for i in range(max_sentences)]
    return lines


def train_sentencepiece(
    input_files: list[str],
    model_prefix: str,
    vocab_size: int,
    *,
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    model_type: str = "bpe",
) -> str:
    """Train a SentencePiece model on ``input_files`` and save it as ``model_prefix + ".model"``; return that path.

    Raises DataError (a ValueError; before writing anything) for missing/empty inputs or a vocabulary size the corpus cannot
    support.
    """
    path = model_prefix + ".model"
    write_bytes_atomically(path, sentencepiece_model_bytes(input_files, vocab_size, json_key=json_key,
                                                           max_sentences=max_sentences, model_type=model_type))
    return path


def sentencepiece_model_bytes(
    input_files: list[str],
    vocab_size: int,
    *,
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    model_type: str = "bpe",
) -> bytes:
    """The ``.model`` file's bytes of a SentencePiece model trained on ``input_files`` (see :func:`train_sentencepiece`)."""
    import sentencepiece as spm

    for path in input_files:
        if not os.path.isfile(path):
            raise DataError(f"tokenizer input file not found: {path}")
    lines = _training_sentences(input_files, json_key, max_sentences)
    if not lines:
        raise DataError(f"no text to train a tokenizer on in {input_files}")

    model = io.BytesIO()
    spm.set_random_generator_seed(1234)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOD_ID, pad_id=PAD_ID,
            num_threads=1,
            input_sentence_size=0,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} vocabulary on {len(lines)} lines "
            f"({err}); choose a vocab size that fits the corpus (at least 256 byte pieces + 4 specials + its "
            f"distinct characters)"
        ) from None
    return model.getvalue()


def tokenizer_hash(model_path: str) -> str:
    """sha256 hex digest of the ``.model`` file (of the spec, for a Hugging Face tokenizer): checkpoints store it to
    refuse a teacher/student mismatch."""
    from salt_megatron.hf import tokenizer as hf_tokenizer

    if hf_tokenizer.is_hf_tokenizer(model_path):
        return hf_tokenizer.spec_hash(hf_tokenizer.read_spec(model_path))
    with open(model_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class SentencePieceGPTTokenizer(GPTTokenizer):
    """megatron-core's SentencePiece GPT tokenizer, keyed by the model's content rather than its path.

    ``unique_identifiers`` feeds GPTDataset's index-cache key: keying on the sha256 means a retrained tokenizer at
    the same path never reuses stale indices, and a copy of the same model elsewhere does.
    """

    def __init__(self, model_path: str):
        self.model_path = os.path.abspath(model_path)
        self.hash = tokenizer_hash(model_path)
        super().__init__(self.model_path, {"library": "sentencepiece", "model_type": "gpt", "chat_template": None})

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("sha256", self.hash)]
        )

    def __reduce__(self):
        # The SentencePiece processor inside is not picklable everywhere; rebuild from the file instead.
        return (load_tokenizer, (self.model_path,))


def load_tokenizer(model_path: str):
    """Load a SentencePiece ``.model``, or a Hugging Face tokenizer (a directory with ``tokenizer.json``, or the
    ``PREFIX.tokenizer.json`` prepare wrote), as a tokenizer GPTDataset accepts (``.eod``, ``.vocab_size``,
    ``.tokenize``, ...)."""
    from salt_megatron.hf import tokenizer as hf_tokenizer

    if os.path.isdir(model_path):
        return hf_tokenizer.HFGPTTokenizer(model_path)
    if hf_tokenizer.is_hf_tokenizer(model_path):  # a spec prepare wrote: HF, GPT2BPE or Null
        return tokenizer_from_spec(hf_tokenizer.read_spec(model_path), os.path.abspath(model_path))
    if not os.path.isfile(model_path):
        raise MissingFile(f"tokenizer model not found: {model_path}")
    try:
        return SentencePieceGPTTokenizer(model_path)
    except (RuntimeError, OSError) as e:  # sentencepiece's "cannot parse", or an unreadable file
        raise DataError(f"{model_path} is not a SentencePiece model ({e}): pass the .model file that `prepare` "
                        "wrote") from None


def tokenizer_from_spec(spec: dict, name: str):
    """The tokenizer a spec describes (Hugging Face / GPT-2 BPE, or megatron-core's NullTokenizer)."""
    if spec.get("type") == "NullTokenizer":
        from salt_megatron.data.null_tokenizer import NullGPTTokenizer

        return NullGPTTokenizer(spec, name)
    from salt_megatron.hf.tokenizer import HFGPTTokenizer

    return HFGPTTokenizer(name, spec)
