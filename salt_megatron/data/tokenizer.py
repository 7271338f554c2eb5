"""SentencePiece tokenizers: train one from text, load it as a megatron-core tokenizer, fingerprint it.

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
from collections import OrderedDict

from megatron.core.tokenizers.text.models import GPTTokenizer

from salt_megatron.files import write_bytes_atomically

UNK_ID, BOS_ID, EOD_ID, PAD_ID = 0, 1, 2, 3
JSON_EXTENSIONS = (".jsonl", ".json")


def is_jsonl(path: str) -> bool:
    """JSONL files (one JSON object per line) are recognised by their extension."""
    return path.lower().endswith(JSON_EXTENSIONS)


def iter_documents(path: str, json_key: str = "text", split_lines: bool = False):
    """Yield the documents of one input file, skipping whitespace-only ones.

    JSONL: one document per line (text under ``json_key``).  Plain text: the whole file is one document, or each
    non-empty line is one with ``split_lines``.  Shared by tokenizer training and ``prepare`` so that both see the
    same documents.
    """
    with open(path, encoding="utf-8") as f:
        if is_jsonl(path):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a string {json_key!r} field")
                if obj[json_key].strip():
                    yield obj[json_key]
        elif split_lines:
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
        else:
            text = f.read()
            if text.strip():
                yield text


def _training_sentences(input_files, json_key, max_sentences):
    """The non-empty lines of all documents; evenly thinned to ``max_sentences`` so the sample spans the corpus.

    SentencePiece's own sampling (``input_sentence_size``) is random; thinning here keeps training deterministic.
    """
    lines = [
        line
        for path in input_files
        for doc in iter_documents(path, json_key)
        for line in doc.split("\n")
        if line.strip()
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

    Raises ValueError (before writing anything) for missing/empty inputs or a vocabulary size the corpus cannot
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
            raise ValueError(f"tokenizer input file not found: {path}")
    lines = _training_sentences(input_files, json_key, max_sentences)
    if not lines:
        raise ValueError(f"no text to train a tokenizer on in {input_files}")

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
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} vocabulary on {len(lines)} lines "
            f"({err}); choose a vocab size that fits the corpus (at least 256 byte pieces + 4 specials + its "
            f"distinct characters)"
        ) from None
    return model.getvalue()


def tokenizer_hash(model_path: str) -> str:
    """sha256 hex digest of the ``.model`` file: checkpoints store it to refuse a teacher/student mismatch."""
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


def load_tokenizer(model_path: str) -> SentencePieceGPTTokenizer:
    """Load a ``.model`` as a tokenizer GPTDataset accepts (``.eod``, ``.vocab_size``, ``.tokenize``, ...)."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    return SentencePieceGPTTokenizer(model_path)
