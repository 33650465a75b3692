"""Where the missing embeddings of an extraction are computed: in this process, or on a Ray cluster.

Both engines get the same work from ``extract/pipeline.py`` (the images whose sha256 the cache lacks, the ONNX
model on disk, the open ``FeatureCache``) and leave the same thing behind: one part file per finished block in
the cache's ``.parts`` folder, which the pipeline then merges into the one HDF5 file. Only this step differs,
so both engines write the same rows and embeddings (docs/distributed.md).

- ``local`` (default): decode in threads and run onnxruntime in this process (``pipeline._embed_local``).
- ``ray``: shards of images by sha256 run by Ray Data actors, each with its own onnxruntime session
  (``extract/engine_ray.py``); Ray is an optional extra, imported only when this engine runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cxr_transfer.core.params import COUNT, Interval, Options, check_params, param
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.runtime import default_threads

if TYPE_CHECKING:
    from cxr_transfer.extract.dataset import Sample

ENGINES = ("local", "ray")
RAY_INSTALL = 'pip install "cxr-transfer[distributed]"'
RETRIES = Interval(0)


@dataclass(frozen=True)
class EngineSettings:
    """Which engine computes the missing embeddings, and (Ray) on which cluster with how many workers."""

    name: str = param("local", Options(ENGINES), "local: this process; ray: a Ray cluster, or a local Ray "
                                                 "instance (docs/distributed.md)", flag="--engine")
    address: str | None = param(None, help="ray: cluster address host:port, auto or ray://host:port (default: "
                                           "$RAY_ADDRESS, else a new local instance)")
    workers: int | None = param(None, COUNT, "ray: actors, each with its own onnxruntime session (default: the "
                                             "cluster's CPUs / threads_per_worker)",
                                none_means="the cluster's CPUs / threads_per_worker")
    threads_per_worker: int = param(1, COUNT, "ray: onnxruntime threads (and CPUs reserved) per worker")
    shard_size: int = param(256, COUNT, "ray: images per shard, the unit of work, retry and resume")
    max_retries: int = param(3, RETRIES, "ray: times a shard is run again after its worker process died", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.name, str) and self.name not in ENGINES:   # the field is the `engine` parameter's value
            raise CxrError(f"engine {Options(ENGINES).problem(self.name)}", param="engine")
        check_params(self)
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise CxrError(f"address must be host:port, auto or ray://host:port, got {self.address!r} instead")

    @property
    def is_ray(self) -> bool:
        return self.name == "ray"

    @property
    def ray_address(self) -> str:
        """address, else $RAY_ADDRESS, else "local": a new instance (never a cluster found by chance)."""
        return self.address or os.environ.get("RAY_ADDRESS") or "local"

    def record(self) -> dict[str, object]:
        """JSON-ready form for run records and cache attributes."""
        if not self.is_ray:
            return {"engine": "local"}
        return {"engine": "ray", "address": self.address or "", "workers": self.workers,
                "threads_per_worker": self.threads_per_worker, "shard_size": self.shard_size,
                "max_retries": self.max_retries}


@dataclass
class Computed:
    """What an engine did with the images it was given: how many embeddings it added to the cache's parts,
    the images it skipped (with the reason), the seconds spent in onnxruntime (summed over workers) and a
    short note for the summary line."""

    n_embedded: int = 0
    failures: list[tuple[Sample, str]] = field(default_factory=list)
    inference_seconds: float = 0.0
    note: str = ""


def check_engine(settings: EngineSettings) -> None:
    """Fail at once, before any export or computing, when the engine cannot run here (Ray not installed, more
    workers than a local instance has cores)."""
    if settings.is_ray:
        require_ray()
        check_local_fit(settings)


def require_ray() -> None:
    """Raise the one-line CxrError that says how to install Ray when it is missing."""
    try:
        import ray   # deferred: Ray is an optional extra, imported only for the Ray engine
        import ray.data  # noqa: F401
    except ImportError:
        raise CxrError(f"`engine` ray needs Ray, which is not installed: {RAY_INSTALL}") from None


def check_local_fit(settings: EngineSettings) -> None:
    """A local instance (no address) gets this machine's cores: more workers x threads than that is refused
    in one line, before Ray starts (a cluster's CPUs are checked once connected, ``engine_ray._pool_size``)."""
    import ray   # deferred: Ray is an optional extra, imported only for the Ray engine

    if settings.ray_address != "local" or ray.is_initialized():   # connected already: _pool_size checks
        return
    cores, threads = default_threads(), settings.threads_per_worker
    need = (settings.workers or 1) * threads
    if need > cores:
        asked = f"`workers` {settings.workers} x " if settings.workers else ""
        raise CxrError(f"{asked}`threads_per_worker` {threads} needs {need} CPUs, but this machine has {cores} "
                       f"for a local Ray instance; give fewer workers or threads, or `address` a Ray cluster "
                       f"(docs/distributed.md)")
