"""Every file salt_megatron writes goes through here: readers see it whole or not at all.

A file is written under a temporary name beside its target (same folder, same extension, so ``np.save``,
matplotlib and Megatron's dataset builder keep the name they are given), flushed to disk, then renamed over the
target.  A crash mid-write leaves at most a stray ``NAME.tmp-PID.EXT`` file, never a truncated target.  Several
files that belong together (a dataset's ``.bin`` and ``.idx``, a sidecar's arrays and header) are renamed in the
order they are named, so the last one (the header, the ``.idx``) marks the set as complete.

(Checkpoints are directories: ``salt_megatron.checkpointing`` writes one under a temporary name on every rank and
renames the whole directory; the files inside it need no renames of their own.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil

from salt_megatron.errors import SaltError

# errors that say the disk, quota or file size limit is exhausted (or the file system is read-only)
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


class WriteFailed(SaltError):
    """A file could not be written for lack of room (disk, quota, file size limit); what was there stays."""


def write_limits_hint(directory: str) -> str:
    """What commonly makes a write fail, when it applies here: a file size limit (``ulimit -f``), a nearly full disk."""
    import resource

    hints = []
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        hints.append(f"files are limited to {limit} bytes here (ulimit -f)")
    try:
        free = shutil.disk_usage(directory).free
        if free < 1 << 30:
            hints.append(f"{free >> 20} MiB free on its disk")
    except OSError:
        pass
    return "; " + ", ".join(hints) if hints else ""


def temporary_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place: same folder and extension, a per-process tag."""
    root, ext = os.path.splitext(path)
    return f"{root}.tmp-{os.getpid()}{ext}"


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(path: str) -> None:
    """Make a rename durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _no_room_is_one_line(what: str, folder: str, outcome: str):
    """A write that fails for lack of room (disk full, a file size limit, a read-only disk) becomes
    :class:`WriteFailed`: one line naming ``what`` and the limit; any other error passes as it is."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_ROOM:
            raise
        raise WriteFailed(f"could not write {what} ({e.strerror}{write_limits_hint(folder)}); {outcome}") from e


@contextlib.contextmanager
def atomic_files(*paths: str):
    """Write several files as one: yields their temporary paths (a list, in the order given).

    When the block finishes, every temporary file is flushed to disk and renamed over its target in the given
    order; if the block raises, the temporaries are removed and no target is touched (a write that fails for lack
    of room becomes :class:`WriteFailed`, one line naming the files).
    """
    if not paths:
        raise ValueError("atomic_files needs at least one path")
    tmps = [temporary_path(p) for p in paths]
    for p in paths:
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    try:
        with _no_room_is_one_line(", ".join(paths), os.path.dirname(os.path.abspath(paths[0])), "nothing was replaced"):
            yield tmps
        for tmp in tmps:
            if not os.path.isfile(tmp):
                raise FileNotFoundError(f"{tmp} was not written (the block must write every file it was given)")
            _fsync_file(tmp)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        for folder in {os.path.dirname(os.path.abspath(p)) for p in paths}:
            _fsync_directory(folder)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_bytes_atomically(path: str, data: bytes) -> None:
    with atomic_files(path) as (tmp,):
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str, obj, **dumps_kwargs) -> None:
    write_text_atomically(path, json.dumps(obj, **dumps_kwargs))


@contextlib.contextmanager
def atomic_directory(path: str):
    """Write a whole directory or nothing: yields a temporary directory beside ``path``, renamed to ``path`` when the
    block finishes (every file flushed first); removed if the block raises.  ``path`` must not exist, or be an
    empty directory (it is replaced)."""
    path = os.path.abspath(path.rstrip("/"))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} exists and is not an empty directory")
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with _no_room_is_one_line(path, os.path.dirname(path), "nothing was written"):
            yield tmp
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                _fsync_file(os.path.join(tmp, name))
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
