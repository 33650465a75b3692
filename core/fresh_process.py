"""Run one function in a fresh Python process and measure that process's peak memory.

Why: an ONNX export loads TensorFlow, builds the Keras model and converts it with tf2onnx, which takes GBs
that a long-lived process (compare over nine backbones, the tests, a notebook) would otherwise keep (TF and
glibc hold on to freed memory). In a child process all of it goes back to the OS at exit, the parent never
imports TensorFlow for it, and the child's own peak resident memory can be recorded.

How: ``python -m cxr_transfer.core.fresh_process`` with the parent's ``sys.path`` reads a pickled
``(function, args)`` from stdin, calls it, and writes back a pickled ``(outcome, peak_rss_mb)`` on its original
stdout (everything the libraries print goes to stderr instead). ``function`` must be importable by name (a
module-level function); no ``__main__`` is re-imported, unlike multiprocessing's spawn. The peak is the
child's ``VmHWM`` (``/proc/self/status``): the high-water mark of its own address space, which ``getrusage``
cannot give (``RUSAGE_CHILDREN`` is the maximum over all children, and a child's ``ru_maxrss`` counts the
parent's memory it was started from).

Errors: an exception raised by ``function`` is raised again in the parent when it is a ``CxrError`` or an
``OSError`` (so callers handle a full disk or a refused export exactly as in-process); any other exception
becomes a one-line ``CxrError`` naming it. A child killed by a signal (the kernel's out-of-memory killer
sends SIGKILL) becomes a ``CxrError`` with the memory it had reached, polled by the parent.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from cxr_transfer.core.errors import CxrError

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.2


def peak_rss_mb(pid: int | str = "self") -> int | None:
    """The peak resident memory (VmHWM) of a process in MB; None when it cannot be read (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _outcome_of(exc: BaseException) -> tuple[str, Any]:
    """("error", exc) when the parent should raise ``exc`` itself and it survives pickling; else ("failed", its
    one-line text)."""
    if isinstance(exc, (CxrError, OSError)):
        try:
            again = pickle.loads(pickle.dumps(exc))
            if type(again) is type(exc) and str(again) == str(exc):
                return "error", exc
        except Exception:  # noqa: BLE001, S110 - an exception type that does not pickle: send its text
            pass
    return "failed", _one_line(exc)


def call_in_fresh_process(function: Callable[..., Any], *args: Any, what: str) -> tuple[Any, int | None]:
    """``function(*args)`` run in a new Python process: (its result, that process's peak RSS in MB).

    ``what`` names the job in error messages ("exporting vgg16 to ONNX"). See the module docstring for errors.
    """
    request = pickle.dumps((function, args, logging.getLogger().getEffectiveLevel()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, "-m", "cxr_transfer.core.fresh_process"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    polled = None
    try:
        pending: bytes | None = request
        while True:
            try:
                answer, err = child.communicate(pending, timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pending = None
                polled = peak_rss_mb(child.pid) or polled
    except BaseException:  # interrupted (Ctrl-C) or failed here: the child must not outlive the call
        child.kill()
        child.wait()
        raise
    tail = err.decode("utf-8", "replace").strip().splitlines()[-20:]
    if tail:
        log.debug("%s: the last lines its process wrote:\n%s", what, "\n".join(tail))
    if child.returncode < 0:
        number = -child.returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        reached = f" after reaching {polled} MB of memory" if polled else ""
        cause = ("most likely the system ran out of memory (the kernel's OOM killer): close other jobs or free "
                 "memory and run again" if number == signal.SIGKILL else "run it again")
        raise CxrError(f"{what}: its process was killed by {name}{reached}; {cause}")
    try:
        (kind, value), peak = pickle.loads(answer)
    except Exception:  # noqa: BLE001 - the child died before it could answer (crash at import, exit())
        raise CxrError(f"{what}: its process exited with status {child.returncode} without an answer "
                       f"({tail[-1] if tail else 'no output'})") from None
    if kind == "error":
        raise value
    if kind == "failed":
        raise CxrError(f"{what} failed: {value}")
    return value, peak


def _child() -> None:
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())     # whatever the libraries print goes to stderr
    function, args, level = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcome: tuple[str, Any] = ("ok", function(*args))
    except BaseException as exc:  # everything goes back to the parent
        log.debug("fresh process: %s failed", getattr(function, "__qualname__", function), exc_info=True)
        outcome = _outcome_of(exc)
    pickle.dump((outcome, peak_rss_mb()), answer)
    answer.flush()


if __name__ == "__main__":
    _child()
