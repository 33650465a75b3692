"""Writing files safely: one atomic write for the whole library, and the words for a failed write.

``atomic_write(path)`` (a file handle) and ``atomic_path(path)`` (a name, for writers that open the file
themselves: joblib, onnx, tf2onnx, onnxruntime's quantizer, pyarrow) write beside ``path`` under a fresh
hidden name ``.<stem>.<8 hex><suffix>.tmp``, fsync it, rename it onto ``path`` (``os.replace``: readers see
the old file or the new one, never half of one) and fsync the folder. On any failure, Ctrl-C included, the
temporary file is removed and ``path`` is untouched. A writer that adds its own suffix to a name (``np.savez``
adds ``.npz``) is given the handle instead. A process killed mid-write (SIGKILL) leaves its temporary file;
``remove_leftovers(path)``, called by the next writer that holds ``path``'s lock, removes it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cxr_transfer.core.errors import CxrError

log = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` for the block to write (a file, or a folder it creates); when the
    block ends normally, sync it and rename it onto ``path``. On any exception the temporary is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}.tmp")
    try:
        yield tmp
        _fsync_tree(tmp)
        tmp.replace(path)
    except BaseException:    # a full disk, a refused check, Ctrl-C: no half-written file stays
        _remove(tmp)
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``mode`` "wb" or "w"; text as UTF-8 unless
    ``encoding``), and rename it onto ``path`` once the block ends normally (``atomic_path``)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes whole files, mode 'wb' or 'w'; got {mode!r} instead")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding or "utf-8") as handle:
        yield handle


def leftovers(path: str | Path) -> list[Path]:
    """The temporary files (or folders) that interrupted writes of ``path`` left: this module's names, the
    names older versions used (``<name>.tmp``), and anything named after either (a writer's work folder)."""
    path = Path(path)
    pattern = re.compile(rf"(\.{re.escape(path.stem)}\.[0-9a-f]{{8}}{re.escape(path.suffix)}|"
                         rf"{re.escape(path.name)})\.tmp(\..*)?", re.DOTALL)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / name for name in sorted(names) if pattern.fullmatch(name)]


def remove_leftovers(path: str | Path) -> None:
    """Remove ``leftovers(path)``. Call it only while holding ``path``'s lock: a live writer's temporary file
    matches too. A file that cannot be removed (a read-only folder) is left, and logged."""
    for leftover in leftovers(path):
        try:
            _remove(leftover, strict=True)
            log.info("removed %s left by an interrupted run", leftover.name)
        except OSError as exc:
            log.debug("could not remove %s (%s)", leftover, exc)


def _remove(path: Path, strict: bool = False) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=not strict)
    elif strict:
        path.unlink(missing_ok=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a folder and the folder."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        _fsync(file)
    if path.is_dir():
        _fsync_folder(path)


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut; not every system can (Windows): then skipped."""
    try:
        _fsync(folder)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the words for I/O problems
def utf8_problem(text: str) -> str | None:
    """None when ``text`` is valid Unicode that UTF-8 can store; else a printable form of it.

    File names that are not UTF-8 reach Python as surrogate escapes (``bad\\udcff.jpg``); they cannot be
    stored as UTF-8 text, so extraction skips such files before any work, naming them with ``\\xff`` escapes.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return printable(text)
    return None


def printable(text: str) -> str:
    """``text`` as valid UTF-8 text: undecodable bytes of a file name shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_no_space(exc: BaseException) -> bool:
    """True for 'no space left on device' / 'quota exceeded', however the library reported it."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    return "No space left" in text or "errno = 28" in text or "Disk quota exceeded" in text


def no_space_error(folder: Path, needed: int, writing: str = "the cache", kept: str = "cached rows are kept",
                   flag: str = "`cache_dir`") -> CxrError:
    """The one message for a full disk: the folder, the space needed and what is free; ``writing`` (what was
    written), ``kept`` (what stays) and ``flag`` (the option naming the folder) default to the feature cache."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    free_text = f", {_mb(free)} free" if free >= 0 else ""
    return CxrError(f"no space left in {folder}: writing {writing} needs about {_mb(needed)}{free_text}; "
                    f"{kept}: free some space (or use another {flag}) and run again")


def cannot_write_error(folder: Path, exc: OSError, what: str = "cache folder", needed: int = 1 << 20,
                       flag: str = "`cache_dir`", kept: str | None = None) -> CxrError:
    """The one message for a failed write under --cache-dir (or the folder option ``flag``): a full disk (with
    the space needed and, in ``kept``, what stays), or why the folder refused it."""
    if is_no_space(exc):
        if flag == "`cache_dir`" and kept is None:
            return no_space_error(folder, needed)
        return no_space_error(folder, needed, f"the {what}", kept or "nothing was written", flag)
    return CxrError(f"{flag}: cannot write to the {what} {folder} ({exc.strerror or exc}); "
                    f"give a writable folder with {flag}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
