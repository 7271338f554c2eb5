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
