"""Run records: seed, library versions, input hashes and settings, written next to every result."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from cxr_transfer.core.io import atomic_path

_PACKAGES = ("numpy", "scikit-learn", "onnxruntime", "tf2onnx", "tensorflow-cpu", "tensorflow", "keras",
             "h5py", "opencv-python-headless", "pillow", "joblib")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a result (missing ones are left out)."""
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class Stopwatch:
    """Seconds spent per stage of a run, for its record's ``timings``: ``lap(name)`` stores the time since the
    previous lap (or the start), ``total(name)`` the time since the start; both rounded to 0.01 s."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 2)
        self._last = now
        return self.timings[name]

    def total(self, name: str) -> float:
        self.timings[name] = self.elapsed()
        return self.timings[name]

    def elapsed(self) -> float:
        """Seconds since the start, rounded to 0.01 s (not stored)."""
        return round(time.perf_counter() - self.started, 2)


def now_iso() -> str:
    """Current UTC time, ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def run_record(command: str, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A JSON-serialisable record of one run: what was asked, on what, with which software."""
    return {
        "command": command,
        "created": now_iso(),
        "settings": settings,
        "versions": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0]},
        **extra,
    }


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically (``core.io.atomic_path``) so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str, sort_keys=False) + "\n", encoding="utf-8")
    return path
