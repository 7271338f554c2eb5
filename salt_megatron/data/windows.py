"""The windows of a dataset: a one-epoch GPTDataset's samples in their unshuffled order.

GPTDataset cuts the token stream into windows of ``seq_length + 1`` tokens across document boundaries and shuffles
them with its seed.  A window's *unshuffled* index is a stable name for it: the score sidecar is keyed by it, and
the KD-phase selection picks windows by it.
"""

from __future__ import annotations

import numpy as np


class UnshuffledWindows:
    """The windows of a one-epoch GPTDataset in unshuffled order, with the document of every target token."""

    def __init__(self, dataset):
        self.dataset = dataset
        dataset._query_document_sample_shuffle_indices(0)  # loads its index arrays (lazily memory-mapped)
        self.sample_index = np.asarray(dataset.sample_index)
        self.document_index = np.asarray(dataset.document_index)
        self.shuffle_to_window = np.asarray(dataset.shuffle_index)
        self.window_to_item = np.empty_like(self.shuffle_to_window)
        self.window_to_item[self.shuffle_to_window] = np.arange(len(self.shuffle_to_window))
        self.doc_lengths = np.asarray(dataset.dataset.sequence_lengths)

    def __len__(self) -> int:
        return len(self.shuffle_to_window)

    def item(self, window: int) -> dict:
        return self.dataset[int(self.window_to_item[window])]

    def target_documents(self, window: int, seq_length: int) -> np.ndarray:
        """Document id of each target token (positions 1..seq_length of the window's seq_length+1 tokens)."""
        (beg, off_beg), (end, off_end) = self.sample_index[window], self.sample_index[window + 1]
        ids = []
        for i in range(beg, end + 1):
            doc = int(self.document_index[i])
            first = int(off_beg) if i == beg else 0
            last = int(off_end) + 1 if i == end else int(self.doc_lengths[doc])
            ids.append(np.full(max(last - first, 0), doc, dtype=np.int64))
        ids = np.concatenate(ids)[: seq_length + 1]
        if ids.size < seq_length + 1:  # padded tail (loss-masked)
            ids = np.concatenate([ids, np.full(seq_length + 1 - ids.size, -1, dtype=np.int64)])
        return ids[1:]
