"""One writer per cache file: an advisory ``fcntl.flock`` on ``<file>.lock``, holding the writer's pid.

HDF5 allows one writer only, and two extractions of the same cache would delete each other's part files.
``file_lock(target)`` takes the lock without blocking, retries until ``timeout`` seconds have passed (saying
once who holds it), then raises ``CxrError`` naming the holder's pid. The lock file is removed on release;
a waiter that got the lock of a removed file retries on the new one, so the lock is never held twice.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cxr_transfer.core.errors import CxrError

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT = 600.0
_POLL_SECONDS = 0.2


def lock_path(target: str | Path) -> Path:
    """The lock file that guards ``target``."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def file_lock(target: str | Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` for the ``with`` block; yields the lock file's path.

    Raises CxrError when another process holds it for more than ``timeout`` seconds, and lets OSError
    (e.g. a read-only folder where no lock file can be made) through to the caller.
    """
    path = lock_path(target)
    deadline = time.monotonic() + max(0.0, timeout)
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise CxrError(f"{target} is being written by {holder} (lock {path.name}); wait for it to finish "
                               f"or stop it, then run again") from None
            if not said:
                log.warning("%s is being written by %s; waiting up to %.0f s", target, holder, timeout)
                said = True
            time.sleep(_POLL_SECONDS)
            continue
        # The holder we waited on may have removed the file: then our lock is on a dead inode.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
