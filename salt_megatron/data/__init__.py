"""Data: text → tokenizer + Megatron indexed datasets (``prepare``), GPTDatasets and Megatron's batch order."""

from salt_megatron.data.corpora import export_sotu
from salt_megatron.data.gpt_data import (
    build_gpt_datasets,
    collate,
    global_batch_indices,
    micro_batches,
)
from salt_megatron.data.prepare import prepare
from salt_megatron.data.tokenizer import load_tokenizer, tokenizer_hash, train_sentencepiece

__all__ = [
    "train_sentencepiece",
    "load_tokenizer",
    "tokenizer_hash",
    "prepare",
    "build_gpt_datasets",
    "collate",
    "global_batch_indices",
    "micro_batches",
    "export_sotu",
]
