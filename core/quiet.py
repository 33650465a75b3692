"""Start the heavy frameworks (TensorFlow, Ray) without their start-up lines on stderr, unless asked (-v).

TensorFlow's C++ libraries print oneDNN and absl notices when they load, whatever ``TF_CPP_MIN_LOG_LEVEL``
says; Ray's core worker prints its own log lines. They say nothing a user of this tool can act on. So where a
framework is started (not on ``import cxr_transfer``), what its native code writes on file descriptor 2 goes to
a temporary file and then to this module's debug log. "Verbose" is the root logger at INFO or below (the
command line's ``-v``, or a library caller's own ``logging`` set-up): then nothing is hidden.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


def verbose() -> bool:
    """True when the caller asked for details (root logger at INFO or below)."""
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    """Inside the block, what anything (native code included) writes on file descriptor 2 is kept and then
    logged at debug level under ``what``; when verbose, nothing changes. Child processes started inside the
    block inherit the redirection."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            kept.seek(0)
            text = kept.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("%s wrote on stderr:\n%s", what, text)


def start_tensorflow() -> Any:
    """Import TensorFlow and Keras (once per process) without their start-up notices; returns ``tensorflow``."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # later C++ notices; child processes inherit it
    with native_stderr_to_log("starting TensorFlow"):
        import keras  # noqa: F401 - Keras 3 on TensorFlow: the same libraries load here
        import tensorflow as tf
    if not verbose():
        with contextlib.suppress(ImportError):
            import absl.logging

            absl.logging.set_verbosity(absl.logging.ERROR)
    return tf
