"""SALT_DS: the KD phase draws its samples from the windows the SLM scored highest.

``SelectedWindows`` wraps the windows of the one-epoch GPTDataset that was scored (``UnshuffledWindows``: same
prefix, seq length and seed as the sidecar says) and serves only the selected windows:

* ``top``  – the highest-scoring fraction F of the windows;
* ``band`` – skip the very top fraction (``skip_fraction``, likely noise: garbled text the SLM finds "hard") and
  keep the next F.

Sample i of the KD phase is window ``selected[perm_e(i mod m)]`` with e = i // m and ``perm_e`` a permutation
seeded by (seed, e, sidecar hash): a pure function of (seed, consumed samples, sidecar hash), so resume is exact.
The selected index array is cached under a key made of the sidecar hash and every selection setting.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from salt_megatron.data import scores as S
from salt_megatron.files import atomic_files

MODES = ("none", "top", "band")  # "none": the KD phase reads the ordinary data


def select_windows(window_scores: np.ndarray, *, mode: str, fraction: float, skip_fraction: float = 0.0) -> np.ndarray:
    """Indices of the selected windows (sorted by score, best first; ties by index)."""
    if mode not in MODES[1:]:
        raise ValueError(f"selection mode must be one of {MODES[1:]}, got {mode!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--kd-select-fraction must be in (0, 1], got {fraction}")
    if not 0.0 <= skip_fraction < 1.0 or (mode == "band" and skip_fraction + fraction > 1.0):
        raise ValueError(f"--kd-select-skip-fraction ({skip_fraction}) + fraction ({fraction}) must be <= 1")
    n = window_scores.shape[0]
    order = np.lexsort((np.arange(n), -np.asarray(window_scores, dtype=np.float64)))  # score desc, index asc
    skip = int(round(skip_fraction * n)) if mode == "band" else 0
    keep = max(1, int(round(fraction * n)))
    return order[skip:skip + keep].astype(np.int64)


class SelectedWindows:
    """A dataset over the selected windows, cycling through them in seeded per-epoch permutations."""

    def __init__(self, windows, header: dict, window_scores: np.ndarray, *, score: str, mode: str, fraction: float,
                 skip_fraction: float, seed: int, cache_dir: str | None = None):
        if score not in S.SCORE_NAMES:
            raise ValueError(f"--kd-select-by must be one of {S.SCORE_NAMES}, got {score!r}")
        self.windows = windows  # salt_megatron.data.windows.UnshuffledWindows
        self.seed = seed
        self.sidecar_hash = S.sidecar_hash(header)
        settings = f"{self.sidecar_hash}|{score}|{mode}|{fraction!r}|{skip_fraction!r}"
        self.cache_key = hashlib.sha256(settings.encode()).hexdigest()[:16]
        column = window_scores[:, S.SCORE_NAMES.index(score)]
        cache = os.path.join(cache_dir, f"salt_selection_{self.cache_key}.npy") if cache_dir else None
        if cache and os.path.isfile(cache):
            self.selected = np.load(cache)
        else:
            self.selected = select_windows(column, mode=mode, fraction=fraction, skip_fraction=skip_fraction)
            if cache:
                with atomic_files(cache) as (tmp,):
                    np.save(tmp, self.selected)
        self._perm_epoch, self._perm = None, None

    def __len__(self) -> int:
        return 1 << 62  # endless: the KD phase may take more samples than were selected (new order each pass)

    @property
    def num_selected(self) -> int:
        return int(self.selected.size)

    def window_of(self, i: int) -> int:
        """The window (unshuffled sample index of the scored GPTDataset) served as KD-phase sample ``i``."""
        epoch, pos = divmod(int(i), self.num_selected)
        if epoch != self._perm_epoch:
            digest = hashlib.sha256(f"{self.seed}|{epoch}|{self.sidecar_hash}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            self._perm, self._perm_epoch = rng.permutation(self.num_selected), epoch
        return int(self.selected[self._perm[pos]])

    def __getitem__(self, i: int) -> dict:
        return self.windows.item(self.window_of(i))


class BlendedSelection:
    """SALT_DS over a blend: each prefix keeps its own best-scored windows (:class:`SelectedWindows`, ranked
    within the prefix: scores of different sources are not on one scale), and KD-phase sample ``i`` comes from
    the prefix megatron-core's blending rule picks for it (``helpers.build_blending_indices``, the greedy rule of
    its ``BlendedDataset``), so the KD phase keeps the blend's weights.  A pure function of ``i``: resume is exact."""

    def __init__(self, parts: list, weights, sidecar_hash: str):
        weights = np.asarray(weights, dtype=np.float64)
        if len(parts) != weights.size or weights.sum() <= 0:
            raise ValueError("one positive weight per selected part")
        self.parts, self.weights = parts, weights / weights.sum()
        self.sidecar_hash = sidecar_hash  # the scored blend's (scores.blend_sidecar_hash, as the run records it)
        self._dataset_index = self._sample_index = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return 1 << 62

    @property
    def num_selected(self) -> int:
        return sum(p.num_selected for p in self.parts)

    def source_of(self, i: int) -> tuple[int, int]:
        """(part, sample of that part) of KD-phase sample ``i``.  The blending rule is greedy, so the first n
        entries do not depend on how many are built: the index grows by doubling as the phase goes on."""
        if i >= self._dataset_index.size:
            from megatron.core.datasets import helpers

            size = max(1024, 2 * self._dataset_index.size, i + 1)
            dataset_index, sample_index = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
            helpers.build_blending_indices(dataset_index, sample_index, self.weights, len(self.parts), size, False)
            self._dataset_index, self._sample_index = dataset_index, sample_index
        return int(self._dataset_index[i]), int(self._sample_index[i])

    def __getitem__(self, i: int) -> dict:
        part, j = self.source_of(i)
        return self.parts[part][j]
