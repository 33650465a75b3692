"""Where results are written: folders checked writable before any work, and run folders that never collide.

Every command that writes (compare, finetune, audit, predict, report) checks its output place first, so a
mistyped or read-only ``--out`` fails at once with one message instead of after all the computing. Run
folders are created with an exclusive ``mkdir``: a default name is a timestamp plus a random suffix, so two
runs started in the same second get two folders, and a name given by the user is refused when that folder
already holds files (a finished run is never overwritten or mixed with a new one).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.locking import file_lock, lock_path
from cxr_transfer.core.record import now_iso, write_json

log = logging.getLogger(__name__)

FINISHED_MARKERS = ("results.json", "record.json", "run.json")
"""Files whose presence means a run folder holds (or held) a run."""
IN_PROGRESS_MARKER = "run-in-progress.json"
"""Written (atomically) when a run starts writing its folder, removed once everything is written: a folder that
still holds it is an incomplete run (killed or interrupted, or still running). While the run writes, it holds
the ``core.locking`` lock of the marker: the kernel drops that lock when the process ends, however it ends, so a
marker whose lock can be taken is the marker of an interrupted run."""


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def writable_folder(folder: str | Path, what: str = "output") -> Path:
    """Create ``folder`` when missing and prove a file can be written in it; CxrError naming it otherwise."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"{folder}: the {what} folder is an existing file, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CxrError(f"{folder}: cannot create the {what} folder ({_reason(exc)})") from None
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".cxr-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise CxrError(f"{folder}: the {what} folder is not writable ({_reason(exc)})") from None
    return folder


def writable_file(path: str | Path, what: str = "output") -> Path:
    """Check a file can be written at ``path`` (its folder is created when missing); CxrError otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CxrError(f"{path}: the {what} file is an existing folder; give a file name")
    writable_folder(path.parent, what)
    return path


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise CxrError(f"run name {name!r} must be one folder name (no '/', not '.' or '..')")
    if len(name.encode("utf-8", "surrogateescape")) > 200:
        raise CxrError(f"run name of {len(name)} characters is too long (at most 200 bytes)")


def check_run_name(out_dir: str | Path, name: str) -> Path:
    """The folder ``out_dir/name`` after checking it is free (missing or empty); CxrError when it holds a run.

    A folder left by an interrupted run (its in-progress marker is there and no process holds the marker's lock)
    is emptied so that the name is used again, saying so in one warning; a run still writing it is refused.
    """
    _check_name(name)
    path = Path(out_dir).expanduser() / name
    if path.exists() and not path.is_dir():
        raise CxrError(f"{path}: exists and is a file; give another `run_name`")
    if path.is_dir() and (path / IN_PROGRESS_MARKER).is_file():
        _empty_interrupted_run(path)
    if path.is_dir() and any(path.iterdir()):
        finished = [m for m in FINISHED_MARKERS if (path / m).is_file()]
        held = f"a finished run ({finished[0]})" if finished else "files of another run"
        raise CxrError(f"{path} already holds {held}; give another `run_name` or remove the folder")
    return path


def _empty_interrupted_run(path: Path) -> None:
    """Remove the files of the interrupted run in ``path``; CxrError when a process still writes it."""
    marker = path / IN_PROGRESS_MARKER
    try:
        with file_lock(marker, timeout=0) as held:
            for child in path.iterdir():
                if child == held:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    except CxrError:
        try:
            pid = lock_path(marker).read_text().strip()
        except OSError:
            pid = ""
        holder = f"pid {pid}" if pid.isdigit() else "another process"
        raise CxrError(f"{path}: a run is still writing this folder ({holder}); wait for it to finish or give "
                       f"another `run_name`") from None
    except OSError as exc:
        raise CxrError(f"{path}: cannot remove the files of the interrupted run there ({_reason(exc)}); "
                       f"remove the folder or give another `run_name`") from None
    log.warning("%s: removed the files of an interrupted run (its %s was still there); the name is used again",
                path, IN_PROGRESS_MARKER)


def new_run_dir(out_dir: str | Path, prefix: str, name: str | None = None) -> Path:
    """Create and return a fresh run folder under ``out_dir``.

    name: the user's exact folder name (refused when it holds a run, see ``check_run_name``); otherwise
    ``<prefix>-<YYYYmmdd-HHMMSS>-<6 hex>``, created exclusively so concurrent runs never share one.
    """
    out_dir = writable_folder(out_dir, "run")
    if name:
        path = check_run_name(out_dir, name)
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CxrError(f"{path}: cannot create the run folder ({_reason(exc)})") from None
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = out_dir / f"{prefix}-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise CxrError(f"{path}: cannot create the run folder ({_reason(exc)})") from None
        return path
    raise CxrError(f"{out_dir}: could not find a free run folder name for {prefix}-{stamp}")


def mark_in_progress(run_dir: str | Path, command: str) -> Path:
    """Write ``run_dir/run-in-progress.json`` (atomic), before a run writes anything else into its folder."""
    return write_json(Path(run_dir) / IN_PROGRESS_MARKER, {"command": command, "pid": os.getpid(),
                                                           "started": now_iso()})


def mark_finished(run_dir: str | Path) -> None:
    """Remove the in-progress marker: the last step of a run, after every file of its folder is written."""
    (Path(run_dir) / IN_PROGRESS_MARKER).unlink(missing_ok=True)


@contextlib.contextmanager
def run_in_progress(run_dir: str | Path, command: str) -> Iterator[Path]:
    """Write the run folder ``run_dir`` inside the ``with`` block: holds the marker's lock (so another process
    sees the run is alive), writes the marker first and removes it once the block ends normally.

    A failed write (OSError: a full disk, a folder turned read-only) removes the run folder, so no partial run,
    ``.tmp`` file or marker is left and its name is free again; the OSError passes on to the caller. An
    interrupt leaves the marker: the folder reads as an incomplete run, and its name may be used again.
    """
    run_dir = Path(run_dir)
    try:
        with file_lock(run_dir / IN_PROGRESS_MARKER, timeout=0):
            mark_in_progress(run_dir, command)
            yield run_dir
            mark_finished(run_dir)
    except OSError:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def incomplete_run(run_dir: str | Path) -> str | None:
    """Why ``run_dir`` is an incomplete run (its in-progress marker is still there), or None when it is not."""
    marker = Path(run_dir) / IN_PROGRESS_MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    what = f"a {info['command']} run" if isinstance(info.get("command"), str) else "a run"
    when = f" started {info['started']}" if isinstance(info.get("started"), str) else ""
    return (f"{run_dir}: incomplete run (interrupted): {what}{when} stopped before writing all its files "
            f"({IN_PROGRESS_MARKER} is still there; or it is still running, pid {info.get('pid', '?')}); "
            f"run it again")
