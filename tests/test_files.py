"""salt_megatron.files: every file is written whole under a temporary name and renamed into place, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from salt_megatron.files import atomic_files, temporary_path, write_json_atomically, write_text_atomically


def test_temporary_path_keeps_folder_and_extension(tmp_path):
    tmp = temporary_path(str(tmp_path / "a.samples.npy"))
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".npy") and f".tmp-{os.getpid()}" in tmp


def test_several_files_land_together_in_the_order_named(tmp_path):
    names = [str(tmp_path / n) for n in ("x.npy", "x.bin", "x.json")]
    seen = []
    real_replace = os.replace
    os.replace = lambda a, b: (seen.append(b), real_replace(a, b))[1]
    try:
        with atomic_files(*names) as (npy, binary, head):
            np.save(npy, np.arange(3))  # np.save keeps a name that ends in .npy as it is
            with open(binary, "wb") as f:
                f.write(b"\x01\x02")
            with open(head, "w") as f:
                f.write("{}")
            assert not any(os.path.exists(n) for n in names)  # nothing visible before the block ends
    finally:
        os.replace = real_replace
    assert seen == names
    assert np.load(names[0]).tolist() == [0, 1, 2] and open(names[1], "rb").read() == b"\x01\x02"
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.json", "x.npy"]  # no temporaries left


def test_a_failure_leaves_the_old_files_and_no_temporaries(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_files(str(target), str(tmp_path / "other.idx")) as (tmp, other):
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_a_file_the_block_did_not_write_is_an_error_and_nothing_lands(tmp_path):
    with pytest.raises(FileNotFoundError, match="was not written"):
        with atomic_files(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")) as (a, _):
            open(a, "w").close()
    assert os.listdir(tmp_path) == []


def test_text_and_json_helpers(tmp_path):
    write_text_atomically(str(tmp_path / "sub" / "t.txt"), "héllo")
    assert (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "héllo"
    write_json_atomically(str(tmp_path / "j.json"), {"a": 1}, sort_keys=True)
    assert (tmp_path / "j.json").read_text() == '{"a": 1}'


def test_atomic_directory_is_whole_or_absent(tmp_path):
    from salt_megatron.files import atomic_directory

    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target)) as tmp_dir:
            (Path(tmp_dir) / "a.bin").write_bytes(b"x")
            raise RuntimeError("killed half way")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()  # an empty directory is taken over
    with atomic_directory(str(target)) as tmp_dir:
        (Path(tmp_dir) / "a.bin").write_bytes(b"x")
        assert not (target / "a.bin").exists()
    assert (target / "a.bin").read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(FileExistsError):
        with atomic_directory(str(target)):
            pass


def test_no_room_is_one_line_for_a_directory_too(tmp_path):
    import errno

    from salt_megatron.files import WriteFailed, atomic_directory

    with pytest.raises(WriteFailed, match=r"could not write .*model \(No space left on device.*\); nothing was written"):
        with atomic_directory(str(tmp_path / "model")):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
