"""The offline teacher: the SLM's top-K distribution at every token of the windows a KD phase reads, keyed by window.

``salt-megatron cache-teacher`` (``salt_megatron.cache_teacher``) writes it; ``pretrain --teacher-cache`` reads it
instead of running the teacher.  Rows are keyed by *window*: the unshuffled sample index of the one-epoch
GPTDataset of the dataset, sequence length and seed (``salt_megatron.data.windows``, the score sidecar's key), so a
cache does not depend on the batch size, the micro-batch size or the data-parallel layout of the run that reads it.

Files, beside the dataset by default (``PATH`` = ``PREFIX.salt_teacher_cache``)::

    PATH.json           header (written last: a cache without one is incomplete): magic, version, the dataset's .idx
                        sha256, seq length, seed, K, τ, the teacher's checkpoint, step and logits fingerprint, the
                        tokenizer hash, the vocabulary size, the window count, the arrays' sha256
    PATH.windows.npy    int64 [n]          the cached windows, ascending
    PATH.ids.npy        int32 [n, L, K]    the teacher's top-K token ids at each position (any vocabulary size)
    PATH.logprobs.npy   float16 [n, L, K]  their log-probabilities at τ: log softmax(t/τ), best first
    PATH.rest.npy       float32 [n, L]     log of the teacher's mass outside the top K at τ (-inf: none, K = V)

Bytes per token: 6·K + 4 (K = 64: 388 B; dense fp16 logits of a 32k vocabulary: 65,536 B).  Position j of a row is
the teacher's prediction of the window's token j + 1, i.e. of the run's ``labels[j]``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from salt_megatron.data.scores import file_sha256, read_header
from salt_megatron.errors import DataError
from salt_megatron.files import atomic_files

MAGIC = "SALT_MEGATRON_TEACHER_CACHE"
VERSION = 1
ARRAYS = {"windows": np.int64, "ids": np.int32, "logprobs": np.float16, "rest": np.float32}


class CacheMismatch(DataError):
    """A teacher cache that does not belong to this run (dataset, teacher, tokenizer, length, temperature)."""


def default_cache_path(prefix: str) -> str:
    return prefix + ".salt_teacher_cache"


def cache_paths(path: str) -> dict:
    return {"header": path + ".json", "partial": path + ".partial",
            **{name: f"{path}.{name}.npy" for name in ARRAYS}}


def array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def bytes_per_token(k: int) -> int:
    return k * (np.dtype(ARRAYS["ids"]).itemsize + np.dtype(ARRAYS["logprobs"]).itemsize) + \
        np.dtype(ARRAYS["rest"]).itemsize


def write_cache(path: str, arrays: dict, header: dict) -> dict:
    """Write the four arrays, then the header, as one (the header is renamed into place last).  ``arrays`` maps each
    of :data:`ARRAYS` to an array, or to a callable that fills a writable ``[n, ...]`` memory map (so a cache larger
    than memory is streamed).  Returns the header."""
    paths = cache_paths(path)
    names = list(ARRAYS)
    n = int(np.asarray(arrays["windows"]).shape[0])
    with atomic_files(*(paths[name] for name in names), paths["header"]) as tmps:
        shas = {}
        for name, tmp in zip(names, tmps):
            value = arrays[name]
            if callable(value):
                shape = (n, int(header["seq_length"]), *((int(header["topk"]),) if name in ("ids", "logprobs")
                                                         else ()))
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=ARRAYS[name], shape=shape)
                value(out)
                out.flush()
                del out
            else:
                np.save(tmp, np.ascontiguousarray(value, dtype=ARRAYS[name]))
            shas[f"{name}_sha256"] = file_sha256(tmp)
        header = dict(header, magic=MAGIC, version=VERSION, num_windows=n, bytes_per_token=bytes_per_token(
            int(header["topk"])), **shas)
        with open(tmps[-1], "w") as f:
            json.dump(header, f, indent=1, sort_keys=True)
    return header


class TeacherCache:
    """A written cache, memory-mapped: :meth:`rows` gives the cached top-K of given windows."""

    def __init__(self, path: str):
        paths = cache_paths(path)
        header = read_header(paths, what="teacher cache",
                             absent="write it with `salt-megatron cache-teacher`",
                             interrupted="writing it was interrupted: rerun `salt-megatron cache-teacher` to finish it",
                             damaged="rewrite the cache", magic=MAGIC, version=VERSION, mismatch=CacheMismatch)
        self.path, self.header = path, header
        try:
            self.arrays = {name: np.load(paths[name], mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as e:  # missing, truncated or not .npy
            raise CacheMismatch(f"the arrays beside {paths['header']} cannot be read ({e}): rewrite the cache") \
                from None
        n, length, k = header["num_windows"], header["seq_length"], header["topk"]
        want = {"windows": (n,), "ids": (n, length, k), "logprobs": (n, length, k), "rest": (n, length)}
        for name, shape in want.items():
            if self.arrays[name].shape != shape:
                raise CacheMismatch(f"{paths[name]} has shape {self.arrays[name].shape}, the header says {shape}: "
                                    "rewrite the cache")
        self.windows = np.asarray(self.arrays["windows"])

    def check_run(self, *, prefix: str, seq_length: int, temperature: float, tokenizer_hash: str,
                  vocab_size: int) -> None:
        """One line, before anything is built, where this cache does not fit the run."""
        h, where = self.header, self.path + ".json"
        if file_sha256(prefix + ".idx") != h["idx_sha256"]:
            raise CacheMismatch(f"the teacher cache {where} was written for another dataset (its .idx hash "
                                f"{h['idx_sha256'][:12]}… differs from {prefix}.idx's): rewrite it for this dataset")
        if h["tokenizer_hash"] != tokenizer_hash:
            raise CacheMismatch(f"the teacher cache {where} was written with another tokenizer")
        for flag, mine, theirs in (("--seq-length", seq_length, h["seq_length"]),
                                   ("--kd-temperature", float(temperature), float(h["temperature"]))):
            if mine != theirs:
                raise CacheMismatch(f"the teacher cache {where} holds windows of {flag} {theirs}, this run uses "
                                    f"{mine}: rewrite it with `salt-megatron cache-teacher {flag} {mine}`")
        if h["topk"] > vocab_size or h["vocab_size"] != vocab_size:
            raise CacheMismatch(f"the teacher cache {where} is for a vocabulary of {h['vocab_size']} tokens, this "
                                f"run's has {vocab_size}")

    def check_windows(self, window_seed: int, windows, *, first_sample: int, global_batch_size: int) -> None:
        """Refuse (one line) unless the cache holds ``windows`` (KD-phase samples ``first_sample``, ... in order) of
        the one-epoch GPTDataset shuffled with ``window_seed``; name the first step that would miss one."""
        where = self.path + ".json"
        if int(self.header["seed"]) != int(window_seed):
            raise CacheMismatch(f"the teacher cache {where} holds windows of the dataset shuffled with seed "
                                f"{self.header['seed']}, this run's KD phase reads those of seed {window_seed}: "
                                f"rewrite it with `salt-megatron cache-teacher --seed {window_seed}`")
        missing = self.first_missing(windows)
        if missing is not None:
            step = (first_sample + missing) // global_batch_size
            raise CacheMismatch(f"the teacher cache {where} lacks window {int(windows[missing])}, which step {step} "
                                "would read first: rewrite it with the run's --kd-steps, --global-batch-size, --seed "
                                "and SALT_DS flags (or --windows all)")

    def first_missing(self, windows) -> int | None:
        """Position in ``windows`` of the first one the cache lacks (None: it holds them all)."""
        windows = np.asarray(windows, dtype=np.int64)
        if self.windows.size == 0:
            return 0 if windows.size else None
        at = np.searchsorted(self.windows, windows).clip(max=self.windows.size - 1)
        missing = np.flatnonzero(self.windows[at] != windows)
        return int(missing[0]) if missing.size else None

    def rows(self, windows) -> dict:
        """``ids`` int64 [b, L, K], ``logprobs`` float32 [b, L, K], ``rest`` float32 [b, L] of ``windows``."""
        if self.first_missing(windows) is not None:
            raise CacheMismatch(f"the teacher cache {self.path} lacks window {windows[self.first_missing(windows)]}")
        at = np.searchsorted(self.windows, np.asarray(windows, dtype=np.int64))
        return {"ids": np.asarray(self.arrays["ids"][at], dtype=np.int64),
                "logprobs": np.asarray(self.arrays["logprobs"][at], dtype=np.float32),
                "rest": np.asarray(self.arrays["rest"][at], dtype=np.float32)}


class CachedTeacherSamples:
    """The KD phase's samples with the teacher's cached top-K attached: ``teacher_ids`` int64 [L, K],
    ``teacher_logprobs`` float32 [L, K], ``teacher_rest`` float32 [L] beside the usual tokens, labels, masks.
    ``window_of(i)``: the window KD-phase sample ``i`` is (the key of its cached row)."""

    def __init__(self, source, window_of, cache: TeacherCache):
        self.source, self.window_of, self.cache = source, window_of, cache

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        rows = self.cache.rows([self.window_of(i)])
        return {**self.source[i], **{"teacher_" + name: torch.from_numpy(value[0]) for name, value in rows.items()}}
