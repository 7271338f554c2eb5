"""Whole-file writes that readers see complete or not at all (a crash mid-write leaves a stray ``.tmp-PID``
file beside the target, never a truncated target): checkpoint metadata, corpus exports, experiment results."""

from __future__ import annotations

import os


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
