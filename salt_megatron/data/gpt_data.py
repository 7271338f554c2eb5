"""Training data: megatron-core GPTDatasets over ``prepare``'s indexed datasets, and Megatron's batch order.

The sample order is a pure function of (dataset, consumed_samples), like Megatron-LM's pretraining sampler, so a
resumed run sees exactly the samples it would have seen, and a teacher-score sidecar can be keyed by sample index.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import torch

from salt_megatron.errors import DataError, MissingFile


def _dataset_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def _require_dataset(prefix: str, what: str) -> str:
    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise MissingFile(f"{what} indexed dataset {prefix!r} is incomplete: missing {path}")
    return prefix


_INDEX_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count (34 bytes)


def check_indexed_dataset(prefix: str) -> None:
    """Refuse, before anything reads it, an indexed dataset whose ``.idx`` is not one or whose ``.bin`` is shorter
    than the ``.idx`` says (a copy cut short, a disk that filled up): a truncated ``.bin`` would otherwise be read
    past its end, or as garbage, in the middle of training."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx, binary = _require_dataset(prefix, "the") + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_INDEX_HEAD.size)
    if len(head) < _INDEX_HEAD.size or head[:9] != _INDEX_HEADER:
        raise DataError(f"{idx} is not a Megatron indexed-dataset index (bad header): re-run `salt-megatron "
                        "prepare` for it")
    _, version, code, sequences, documents = _INDEX_HEAD.unpack(head)
    try:
        itemsize = DType.size(DType.dtype_from_code(code))
    except (KeyError, ValueError, TypeError):
        itemsize = None
    if version != 1 or itemsize is None:
        raise DataError(f"{idx} is not a Megatron indexed-dataset index (version {version}, token dtype code {code}): "
                        "re-run prepare for it")
    needed = _INDEX_HEAD.size + sequences * (4 + 8) + documents * 8
    if size < needed:
        raise DataError(f"{idx} is truncated ({size} bytes; its header needs {needed}): re-run prepare")
    if sequences:
        lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_INDEX_HEAD.size, shape=(sequences,))
        pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=_INDEX_HEAD.size + 4 * sequences,
                             shape=(sequences,))
        end = int(pointers[-1]) + int(lengths[-1]) * itemsize
        if int(pointers[0]) != 0 or int(lengths[-1]) < 0 or end < 0:
            raise DataError(f"{idx} is damaged (its document pointers make no sense): re-run prepare")
        if end > os.path.getsize(binary):
            raise DataError(f"{binary} is shorter than {idx} says ({os.path.getsize(binary)} bytes; its last "
                            f"document ends at byte {end}): the dataset is truncated; re-run prepare")


def build_gpt_datasets(train, valid, tokenizer, *, seq_length, seed, train_samples, valid_samples, cache_dir=None,
                       split=None, valid_seed=None):
    """The train and valid datasets (``valid`` None: none), each a prefix or a weighted
    :class:`~salt_megatron.data.blend.Blend`: a GPTDataset for one prefix, megatron-core's ``BlendedDataset`` of
    GPTDatasets for a blend.  ``split`` (Megatron's "969,30,1"): ``train`` is cut by document into the splits and
    ``valid`` is ignored.  ``valid_seed`` (default ``seed``) shuffles the valid dataset's windows.

    Samples are ``seq_length`` tokens (plus one for the shifted labels), drawn across document boundaries and
    shuffled with ``seed``; the train dataset has at least ``train_samples`` samples (epochs repeat as needed;
    None: one epoch).  megatron-core always writes its shuffle/sample/blend indices to disk.  They go to
    ``cache_dir`` (default: ``cache/`` beside the first train dataset), in a subfolder named by the ``.idx``
    contents: megatron keys its cache on path, seed, length and tokenizer but not on the data, so re-running
    ``prepare`` into the same prefix would otherwise reuse stale indices.  When torch.distributed is initialised,
    every rank must call this (rank 0 builds, the others wait and load).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from salt_megatron.data.blend import Blend

    train, valid = (Blend((b,)) if isinstance(b, str) else b for b in (train, valid))
    prefixes = [*train.prefixes, *(valid.prefixes if valid is not None and split is None else ())]
    for prefix in prefixes:
        check_indexed_dataset(prefix)
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(train.prefixes[0])), "cache")
    path_to_cache = os.path.join(cache_dir, _index_fingerprint(*prefixes))

    def build(random_seed, with_train, with_valid, sizes):
        if split is not None:
            blends = {"blend": train.megatron(), "split": split}
        else:
            blends = {"blend_per_split": [train.megatron() if with_train else None,
                                          valid.megatron() if with_valid else None, None]}
        config = GPTDatasetConfig(
            random_seed=random_seed, sequence_length=seq_length, **blends, path_to_cache=path_to_cache,
            mmap_bin_files=True, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False,
        )
        if split is not None and train.weights is not None:
            sizes[2] = sizes[1]  # megatron-core wants a size for every split of a weighted blend (test: unused)
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    valid_n = valid_samples if valid is not None else None
    if valid is None or valid_seed is None or valid_seed == seed:
        train_ds, valid_ds, _ = build(seed, True, valid is not None, [train_samples, valid_n, None])
    else:  # the training windows shuffled by seed, the validation windows by valid_seed
        train_ds = build(seed, True, split is not None, [train_samples, valid_n if split else None, None])[0]
        valid_ds = build(valid_seed, split is not None, True, [valid_n if split else None, valid_n, None])[1]
    return train_ds, valid_ds


def _index_fingerprint(*prefixes) -> str:
    """Short hash of the ``.idx`` files: the cached indices depend only on the document lengths stored there."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        with open(prefix + ".idx", "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def windows_hash(dataset, num_samples: int) -> str:
    """Short hash of the token ids of a dataset's first ``num_samples`` samples: which windows an evaluation read
    (runs whose hashes agree were evaluated on the same text)."""
    digest = hashlib.sha256()
    for i in range(min(num_samples, len(dataset))):
        digest.update(np.asarray(dataset[i]["tokens"], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def collate(samples: list[dict]) -> dict:
    """Stack GPTDataset items into a batch: tokens/labels/position_ids int64 [b, s], loss_mask float32 [b, s] (and
    the attention mask and a cached teacher's ``teacher_*`` arrays where the items have them)."""
    dtypes = {"tokens": torch.int64, "labels": torch.int64, "position_ids": torch.int64, "loss_mask": torch.float32}
    batch = {key: torch.stack([s[key] for s in samples]).to(dtype) for key, dtype in dtypes.items()}
    for key in samples[0]:
        if key == "attention_mask" or key.startswith("teacher_"):  # and a cached teacher's top-K (teacher_cache)
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


def global_batch_indices(*, consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp_size):
    """Dataset indices of each micro-batch this DP rank processes in the global batch starting at ``consumed``.

    Megatron-LM's ``MegatronPretrainingSampler`` order: the global batch is samples
    ``[consumed, consumed + global_batch_size)``; it is walked in steps of ``micro_batch_size * dp_size`` and in
    each step rank r takes the r-th run of ``micro_batch_size`` samples.
    """
    if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")
    step = micro_batch_size * dp_size
    if global_batch_size <= 0 or global_batch_size % step:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of micro_batch_size * dp_size = "
            f"{micro_batch_size} * {dp_size}"
        )
    return [
        list(range(start + dp_rank * micro_batch_size, start + (dp_rank + 1) * micro_batch_size))
        for start in range(consumed_samples, consumed_samples + global_batch_size, step)
    ]


def micro_batches(dataset, *, consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp_size):
    """Yield this rank's collated micro-batches of one global batch (indices wrap around the dataset length)."""
    n = len(dataset)
    for indices in global_batch_indices(consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
                                        global_batch_size=global_batch_size, dp_rank=dp_rank, dp_size=dp_size):
        yield collate([dataset[i % n] for i in indices])
