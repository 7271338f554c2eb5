"""megatron-core's ``NullTokenizer`` (the text is space-separated ids; EOD = N) as ``prepare`` and the datasets use
it, described by a spec (``{"type": "NullTokenizer", "vocab_size": N}``) whose hash identifies it."""

from __future__ import annotations

from collections import OrderedDict

from salt_megatron.errors import DataError
from salt_megatron.hf.tokenizer import SPEC_MARKER, spec_hash


class NullGPTTokenizer:
    """megatron-core's ``NullTokenizer`` (ids written as text) with the hash and identity the datasets use."""

    def __init__(self, spec: dict, model_path: str = "NullTokenizer"):
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        self.spec, self.model_path = spec, model_path
        self._null = NullTokenizer(int(spec["vocab_size"]))
        self.hash = spec_hash(spec)
        self.eod = self._null.eod
        self.vocab_size = self._null.vocab_size  # N ids and the EOD
        self.bos = None

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]  # what megatron-core's text_to_ids does, for any whitespace
        except ValueError:
            raise DataError(f"NullTokenizer: the text must be space-separated ids, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.eod]
        if bad:
            raise DataError(f"NullTokenizer: id {bad[0]} is outside [0, {self.eod}) (--vocab-size {self.eod})")
        return ids

    def detokenize(self, ids) -> str:
        return self._null.ids_to_text(list(ids))

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("sha256", self.hash)])

    def __reduce__(self):
        return (NullGPTTokenizer, (self.spec, self.model_path))


def null_spec(vocab_size: int) -> dict:
    return {SPEC_MARKER: 1, "type": "NullTokenizer", "vocab_size": int(vocab_size)}
