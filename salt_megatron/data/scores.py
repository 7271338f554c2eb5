"""SALT_DS scores: how they are computed from per-token numbers, and the sidecar that keeps them beside a dataset.

Scores of a unit (a training sample window, or a document), from the SLM's per-token loss ℓ and whether the true
next token is in the SLM's top-k:

* ``salt``          median of ℓ over the tokens whose target is in the top-k ("hard but learnable"; the paper's
                    score).  Lower median of an even count (torch.median's convention).  A unit with no such token
                    scores ``NO_LEARNABLE_TOKEN`` (-1): never selected before a unit that has one.
* ``mean_loss``     mean ℓ over all scored tokens.
* ``topk_fraction`` share of scored tokens whose target is in the top-k.

Sidecar of ``PREFIX`` (the indexed dataset that was scored)::

    PREFIX.salt_scores.json          header: magic, version, the .idx file's sha256, seq length, seed, top-k,
                                     the SLM's checkpoint and logits fingerprint, counts, the arrays' sha256
    PREFIX.salt_scores.samples.npy   float32 [num_windows, 3]  (salt, mean_loss, topk_fraction), by window
                                     (GPTDataset's unshuffled sample order for that seq length and seed)
    PREFIX.salt_scores.documents.npy float32 [num_documents, 3], by document id

The arrays are plain ``.npy`` (``numpy.load(mmap_mode="r")``).  The header is written last, so a sidecar without
one is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from salt_megatron.errors import DataError, MissingFile
from salt_megatron.files import atomic_files

MAGIC = "SALT_MEGATRON_SCORES"
VERSION = 1
SCORE_NAMES = ("salt", "mean_loss", "topk_fraction")
NO_LEARNABLE_TOKEN = -1.0


class SidecarMismatch(DataError):
    """A sidecar that does not belong to this dataset / sequence length."""


def score_unit(losses: np.ndarray, in_topk: np.ndarray) -> tuple[float, float, float]:
    """(salt, mean_loss, topk_fraction) of one unit from its per-token loss and top-k membership."""
    if losses.size == 0:
        return NO_LEARNABLE_TOKEN, 0.0, 0.0
    learnable = np.sort(losses[in_topk])
    salt = float(learnable[(learnable.size - 1) // 2]) if learnable.size else NO_LEARNABLE_TOKEN
    return salt, float(losses.mean()), float(in_topk.mean())


def score_rows(losses: np.ndarray, in_topk: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """:func:`score_unit` for every row of ``[rows, tokens]`` arrays at once (``keep``: the tokens that count)."""
    learnable = in_topk & keep
    count = learnable.sum(axis=1)
    ordered = np.sort(np.where(learnable, losses, np.inf), axis=1)
    median = np.take_along_axis(ordered, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    kept = keep.sum(axis=1)
    out = np.empty((losses.shape[0], 3), dtype=np.float32)
    out[:, 0] = np.where(count > 0, median, NO_LEARNABLE_TOKEN)
    out[:, 1] = np.where(kept > 0, np.where(keep, losses, 0.0).sum(axis=1) / np.maximum(kept, 1), 0.0)
    out[:, 2] = np.where(kept > 0, learnable.sum(axis=1) / np.maximum(kept, 1), 0.0)
    return out


def sidecar_paths(prefix: str) -> dict:
    base = prefix + ".salt_scores"
    return {"header": base + ".json", "samples": base + ".samples.npy", "documents": base + ".documents.npy",
            "partial": base + ".partial"}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sidecar(prefix: str, samples: np.ndarray, documents: np.ndarray, header: dict) -> dict:
    """Write both arrays, then the header (the three as one: the header is renamed into place last).  Returns the
    header."""
    paths = sidecar_paths(prefix)
    with atomic_files(paths["samples"], paths["documents"], paths["header"]) as (samples_tmp, documents_tmp, head_tmp):
        np.save(samples_tmp, np.ascontiguousarray(samples, dtype=np.float32))
        np.save(documents_tmp, np.ascontiguousarray(documents, dtype=np.float32))
        header = dict(header, magic=MAGIC, version=VERSION, scores=list(SCORE_NAMES),
                      num_windows=int(samples.shape[0]), num_documents=int(documents.shape[0]),
                      samples_sha256=file_sha256(samples_tmp), documents_sha256=file_sha256(documents_tmp))
        with open(head_tmp, "w") as f:
            json.dump(header, f, indent=1, sort_keys=True)
    return header


def sidecar_hash(header: dict) -> str:
    """Identity of a sidecar's content (enters the selection's cache key and the sample order)."""
    return hashlib.sha256((header["samples_sha256"] + header["idx_sha256"]).encode()).hexdigest()[:16]


def blend_sidecar_hash(headers: list, weights) -> str:
    """Identity of the sidecars of a scored blend: one sidecar's own hash, else all of them with the weights."""
    if len(headers) == 1:
        return sidecar_hash(headers[0])
    text = "|".join(f"{w!r}:{sidecar_hash(h)}" for w, h in zip(weights or [None] * len(headers), headers))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_header(paths: dict, *, what: str, interrupted: str, absent: str, damaged: str, magic: str, version: int,
                mismatch: type) -> dict:
    """The JSON header of a file set whose header is written last (``paths``: ``header`` and ``partial``).  Absent:
    :class:`MissingFile` with the ``interrupted`` hint when a partial write exists, else the ``absent`` one;
    unreadable (``damaged`` says what to do) or another format: ``mismatch``."""
    if not os.path.isfile(paths["header"]):
        hint = interrupted if os.path.isdir(paths["partial"]) else absent
        raise MissingFile(f"no {what} {paths['header']} ({hint})")
    try:
        with open(paths["header"]) as f:
            header = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise mismatch(f"{paths['header']} is not valid JSON ({e}): {damaged}") from None
    if not isinstance(header, dict) or header.get("magic") != magic or header.get("version") != version:
        raise mismatch(f"{paths['header']} is not a salt_megatron {what.removeprefix('SALT ')} of version {version}")
    return header


def load_sidecar(prefix: str, *, seq_length: int | None = None, check_dataset: bool = True):
    """Header and memory-mapped arrays; refuses a sidecar of another dataset or another sequence length."""
    paths = sidecar_paths(prefix)
    header = read_header(paths, what="SALT score sidecar", absent="run `salt-megatron score` first",
                         interrupted="scoring was interrupted: rerun `salt-megatron score` to finish it",
                         damaged="rerun `salt-megatron score`", magic=MAGIC, version=VERSION, mismatch=SidecarMismatch)
    if check_dataset:
        idx_hash = file_sha256(prefix + ".idx")
        if idx_hash != header["idx_sha256"]:
            raise SidecarMismatch(
                f"the score sidecar {paths['header']} was computed for another dataset (its .idx hash "
                f"{header['idx_sha256'][:12]}… differs from {prefix}.idx's {idx_hash[:12]}…): rescore this dataset"
            )
    if seq_length is not None and int(header["seq_length"]) != int(seq_length):
        raise SidecarMismatch(
            f"the score sidecar {paths['header']} scored windows of --seq-length {header['seq_length']}, this run "
            f"uses {seq_length}: rescore with `salt-megatron score --seq-length {seq_length}`"
        )
    try:
        samples = np.load(paths["samples"], mmap_mode="r")
        documents = np.load(paths["documents"], mmap_mode="r")
    except (OSError, ValueError) as e:  # missing, truncated or not .npy
        raise SidecarMismatch(f"the score arrays beside {paths['header']} cannot be read ({e}): rerun "
                              "`salt-megatron score`") from None
    if samples.shape != (header["num_windows"], len(SCORE_NAMES)):
        raise SidecarMismatch(f"{paths['samples']} has shape {samples.shape}, the header says "
                              f"({header['num_windows']}, {len(SCORE_NAMES)})")
    return header, samples, documents
