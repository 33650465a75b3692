"""core.io: the one atomic write (target untouched and no temporary left on any failure, fsync, replace) and
the words for I/O problems moved there from extract/cache.py."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.core import io
from cxr_transfer.core.errors import CxrError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "model.json"
    path.write_text("old")
    return path


def test_a_write_replaces_the_target_and_leaves_only_it(target: Path):
    with io.atomic_write(target, "w") as handle:
        handle.write("new ü")
        tmp = Path(handle.name)
        assert tmp.parent == target.parent and tmp.name.startswith(".model.") and tmp.name.endswith(".json.tmp")
        assert target.read_text() == "old"                     # readers see the old file until the end
    assert target.read_text(encoding="utf-8") == "new ü"
    assert _names(target.parent) == ["model.json"]


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("kind", ["write", "path"])
def test_a_failing_writer_leaves_the_target_and_no_temporary(target: Path, error: BaseException, kind: str):
    with pytest.raises(type(error)):
        if kind == "write":
            with io.atomic_write(target) as handle:
                handle.write(b"half")
                raise error
        else:
            with io.atomic_path(target) as tmp:
                tmp.write_bytes(b"half")
                raise error
    assert target.read_text() == "old" and _names(target.parent) == ["model.json"]


def test_a_failing_folder_writer_leaves_no_temporary_folder(tmp_path: Path):
    with pytest.raises(KeyboardInterrupt), io.atomic_path(tmp_path / "export") as tmp:
        tmp.mkdir()
        (tmp / "a.npy").write_bytes(b"half")
        raise KeyboardInterrupt
    assert _names(tmp_path) == []


def test_a_failed_rename_leaves_the_target_and_no_temporary(target: Path, monkeypatch):
    def full(self, other):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(OSError, match="No space left"), io.atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "old" and _names(target.parent) == ["model.json"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsynced descriptor through /proc")
def test_the_file_and_its_folder_are_synced_before_and_after_the_rename(target: Path, monkeypatch):
    synced, real_fsync, real_replace = [], os.fsync, Path.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(self, other):
        synced.append("replace")
        return real_replace(self, other)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    with io.atomic_write(target) as handle:
        handle.write(b"new")
        tmp = handle.name
    assert synced == [tmp, "replace", str(target.parent)] and target.read_bytes() == b"new"


def test_folders_are_written_and_synced_whole(tmp_path: Path, monkeypatch):
    synced = []
    monkeypatch.setattr(io, "_fsync", lambda path: synced.append(path.name))
    with io.atomic_path(tmp_path / "export") as tmp:
        tmp.mkdir()
        (tmp / "a.npy").write_bytes(b"a")
        (tmp / "b.csv").write_bytes(b"b")
    assert _names(tmp_path / "export") == ["a.npy", "b.csv"] and _names(tmp_path) == ["export"]
    assert synced[:3] == ["a.npy", "b.csv", tmp.name] and synced[-1] == tmp_path.name


def test_np_savez_through_the_handle_keeps_the_name(tmp_path: Path):
    path = tmp_path / "hashes.npz"
    with io.atomic_write(path) as handle:
        np.savez(handle, a=np.arange(3))
    assert _names(tmp_path) == ["hashes.npz"]
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["a"], np.arange(3))


def test_only_text_or_binary_whole_writes(tmp_path: Path):
    with pytest.raises(ValueError, match="got 'ab' instead"), io.atomic_write(tmp_path / "x", "ab"):
        pass


def test_leftovers_of_killed_writes_are_found_and_removed(tmp_path: Path):
    path = tmp_path / "m-int8.onnx"
    mine = [".m-int8.0123abcd.onnx.tmp", ".m-int8.89abcdef.onnx.tmp.work1", "m-int8.onnx.tmp",
            "m-int8.onnx.tmp.k1ll3d"]
    others = ["m-int8.onnx", "m-int8.json", ".m-int8.0123abcd.json.tmp", ".m.0123abcd.onnx.tmp",
              ".m-int8-b.0123abcd.onnx.tmp", "m-int8.onnx.tmpx", ".m-int8.0123abcd.onnx.tmpx"]
    for name in mine + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / mine[1]).unlink()
    (tmp_path / mine[1]).mkdir()
    (tmp_path / mine[1] / "prepared.onnx").write_bytes(b"x")
    assert [p.name for p in io.leftovers(path)] == sorted(mine)
    io.remove_leftovers(path)
    assert _names(tmp_path) == sorted(others)
    assert io.leftovers(tmp_path / "missing" / "x.h5") == []


# ------------------------------------------------------------------------------ moved from extract/cache.py
def test_printable_and_utf8_problem_name_undecodable_bytes():
    bad = b"bad\xff.jpg".decode("utf-8", "surrogateescape")
    assert io.printable(bad) == "bad\\xff.jpg" and io.utf8_problem(bad) == "bad\\xff.jpg"
    assert io.printable("röntgen.png") == "röntgen.png" and io.utf8_problem("röntgen.png") is None


def test_is_no_space_knows_errno_and_library_texts():
    assert io.is_no_space(OSError(errno.ENOSPC, "x"))
    assert io.is_no_space(RuntimeError("HDF5 error: errno = 28"))
    assert not io.is_no_space(OSError(errno.EACCES, "Permission denied"))


def test_no_space_error_names_the_folder_the_need_and_what_is_free(tmp_path: Path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 30, 1 << 30, 1 << 20))
    error = io.no_space_error(tmp_path, 3 << 20, "the export", "nothing was written", "--out")
    assert isinstance(error, CxrError)
    assert str(error) == (f"no space left in {tmp_path}: writing the export needs about 3.0 MB, 1.0 MB free; "
                          "nothing was written: free some space (or use another --out) and run again")


def test_cannot_write_error_says_full_disk_or_why_the_folder_refused(tmp_path: Path):
    full = io.cannot_write_error(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert str(full).startswith(f"no space left in {tmp_path}: writing the cache needs about 1.0 MB")
    refused = io.cannot_write_error(tmp_path, PermissionError(errno.EACCES, "Permission denied"), "output folder",
                                    flag="--out")
    assert str(refused) == (f"--out: cannot write to the output folder {tmp_path} (Permission denied); "
                            "give a writable folder with --out")
