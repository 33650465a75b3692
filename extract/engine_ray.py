"""The Ray engine (``extract --engine ray``): embed the images an extraction misses on a Ray cluster.

The driver (this process) sorts the missing images by sha256 and cuts them into shards of ``shard_size``
images, each named by the hash of its sha256 list. Ray Data maps the shards over a pool of ``workers`` actors
(``EmbedShard``, ``threads_per_worker`` CPUs each). An actor opens the ONNX model the driver exported into the
cache folder once, by path, with ``threads_per_worker`` onnxruntime threads (sessions cannot be pickled); for
each shard it decodes the images (``extract/images.py``, the local engine's rule and batches), embeds them and
writes one part file ``part-shard-<hash>.npz`` atomically into the cache's ``.parts`` folder, returning only a
small summary (counts, skipped images). The driver streams those summaries and never holds the images or the
embeddings; the pipeline then merges the parts into the HDF5 cache exactly as it does for the local engine.
Paths are shared, not shipped: the dataset and the cache folder must be at the same path on every node.

Faults:
- Resume: a finished shard is its part file. A rerun after a kill of the driver (or Ctrl-C) opens the cache
  with its parts and computes only the images still missing.
- A worker process that dies (crash, out of memory, kill) is restarted by Ray and its shard run again, up to
  ``max_retries`` times; a shard that still does not finish has its images named as skipped.
- An unreadable image is skipped and counted as in the local engine; an exception inside a shard names that
  shard's images; what would fail every shard (model file missing on a node, disk full) stops the run with one
  ``CxrError`` line.
- Ctrl-C: the dataset's execution stops, a Ray instance this process started is shut down (a cluster ends the
  actors of a driver that disconnects), finished shards stay.

Ray is imported only here and by ``engine.check_engine``, and only when this engine runs. ``$CXR_RAY_TEST_FAULT`` is a test hook (see
``_test_fault``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file, sha256_strings
from cxr_transfer.core.quiet import native_stderr_to_log, verbose
from cxr_transfer.extract.cache import write_part
from cxr_transfer.extract.dataset import Sample
from cxr_transfer.extract.engine import Computed, EngineSettings, check_engine, check_local_fit, require_ray
from cxr_transfer.extract.runtime import OnnxEmbedder, default_threads, embed_batches

if TYPE_CHECKING:
    from cxr_transfer.extract.cache import FeatureCache
    from cxr_transfer.extract.images import ImageMask
    from cxr_transfer.extract.onnx_export import OnnxBackbone
    from cxr_transfer.extract.pipeline import ExtractSettings

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 << 20
"""Object store of a local instance: only file names and small summaries travel through it."""
FAULT_ENV = "CXR_RAY_TEST_FAULT"
CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for a host:port address to accept a connection before Ray is asked to connect."""
BACKEND_LOG_ENV = "RAY_BACKEND_LOG_LEVEL"


# ---------------------------------------------------------------------------------------------- connection
_depth = 0
_started_here = False


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Keep one connection for the extractions inside this block; shut down what ``_connect`` started in it
    (on Ctrl-C and errors too). A connection made before (``ray.init`` by the caller) is left as it is."""
    global _depth, _started_here
    import ray

    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _started_here:
            _started_here = False
            ray.shutdown()


@contextlib.contextmanager
def engine_session(settings: EngineSettings) -> Iterator[None]:
    """Share one Ray connection (or local instance) between the extractions run inside this block, e.g. the
    backbones of one ``extract`` command; nothing for the local engine. Ray starts only when a shard runs."""
    check_engine(settings)
    if not settings.is_ray:
        yield
        return
    with ray_session():
        yield


def _check_reachable(address: str) -> None:
    """A host:port address where nothing listens fails here within ``CONNECT_TIMEOUT_S`` (Ray itself retries
    for minutes); ``auto``, ``ray://`` and malformed addresses are left to Ray, which fails on them at once."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise CxrError(f"`address` {address}: nothing answers there ({reason}); start a cluster with "
                       f"`ray start --head` or give its address (docs/distributed.md)") from None


@contextlib.contextmanager
def _quiet_ray_start() -> Iterator[None]:
    """Ray's start-up lines (and its core worker's log lines, e.g. on actors with constructor arguments in the
    object store) stay off stderr unless verbose (``core.quiet``): the driver's C++ log level for this
    connection, set where Ray starts and inherited by the processes of a local instance; restored after."""

    if verbose() or BACKEND_LOG_ENV in os.environ:
        yield
        return
    os.environ[BACKEND_LOG_ENV] = "fatal"
    try:
        with native_stderr_to_log("starting Ray"):
            yield
    finally:
        os.environ.pop(BACKEND_LOG_ENV, None)


def _connect(settings: EngineSettings, workers: int | None) -> str:
    """Connect to the cluster (or start a local instance) unless connected; returns where the work runs."""
    global _started_here
    import ray

    if ray.is_initialized():
        return "the connected Ray cluster"
    address = settings.ray_address
    # Ray's notice that its token authentication is on is not news to a command-line user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    options: dict[str, object] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address == "local":
        check_local_fit(settings)
        options.update(num_cpus=default_threads(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                       include_dashboard=False)
    else:
        _check_reachable(address)
    try:
        with _quiet_ray_start():
            ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if _is_auth_error(exc):
            raise CxrError(f"`address` {address}: the Ray cluster wants its authentication token; set "
                           f"RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) "
                           f"(docs/distributed.md)") from None
        if address == "local":
            raise CxrError(f"`engine` ray: cannot start a local Ray instance ({_first_line(exc)}); see Ray's logs "
                           f"in /tmp/ray/session_latest/logs") from None
        raise CxrError(f"`address` {address}: cannot connect to a Ray cluster ({_first_line(exc)}); start one with "
                       f"`ray start --head` or give its address (docs/distributed.md)") from None
    _started_here = True
    return "a local Ray instance" if address == "local" else f"the Ray cluster at {address}"


def _is_auth_error(exc: BaseException | None) -> bool:
    """True when a failed connection was refused for a missing or wrong token (Ray's token authentication)."""
    while exc is not None:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _pool_size(settings: EngineSettings, where: str) -> int:
    """The number of actors: --workers, else as many as the cluster's CPUs hold; refused when they do not fit."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    threads = settings.threads_per_worker
    workers = settings.workers or max(1, cpus // threads)
    if workers * threads > cpus:
        raise CxrError(f"`workers` {workers} x `threads_per_worker` {threads} needs {workers * threads} CPUs, but "
                       f"{where} has {cpus}; give fewer workers or threads (or add nodes)")
    return workers


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """Up to ``shard_size`` images, in sha256 order, named by the hash of their sha256 list."""

    index: int
    samples: list[Sample]

    @property
    def name(self) -> str:
        return sha256_strings([s.sha256 for s in self.samples])[:16]

    @property
    def part_name(self) -> str:
        return f"part-shard-{self.name}.npz"

    def item(self) -> dict[str, object]:
        """What travels to a worker: the shard's name and its (absolute path, sha256) pairs as JSON."""
        return {"shard": self.name, "index": self.index,
                "samples": json.dumps([[os.path.abspath(s.path), s.sha256] for s in self.samples])}


def make_shards(samples: list[Sample], shard_size: int) -> list[Shard]:
    """The samples sorted by sha256 and cut into shards of ``shard_size`` (the last one smaller)."""
    ordered = sorted(samples, key=lambda s: s.sha256)
    return [Shard(i, ordered[start:start + shard_size])
            for i, start in enumerate(range(0, len(ordered), shard_size))]


# ---------------------------------------------------------------------------------------------- workers
class _Fatal(Exception):
    """A problem every shard on this worker would meet: the run stops with its message."""


def _test_fault(spec: str, index: int) -> None:
    """Test hook ($CXR_RAY_TEST_FAULT, read by the driver, passed to the actors): ``crash-once:INDEX:MARKER``
    ends the worker process on shard INDEX the first time (creating the file MARKER), ``crash:INDEX`` every
    time, ``sleep:SECONDS`` slows every shard down. Empty in normal use."""
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    if kind == "sleep":
        time.sleep(float(rest))
    elif kind == "crash" and int(rest) == index:
        os._exit(3)
    elif kind == "crash-once":
        target, _, marker = rest.partition(":")
        if int(target) == index and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(3)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class EmbedShard:
    """A Ray Data actor: one onnxruntime session (built on the first shard, kept for the actor's life); each
    call embeds one shard and writes its part file, returning one summary row."""

    def __init__(self, backbone: OnnxBackbone, batch_size: int, threads: int, mask: ImageMask | None,
                 parts_dir: str, fault: str = "") -> None:
        self.backbone = backbone
        self.batch_size = batch_size
        self.threads = threads
        self.mask = mask
        self.parts_dir = Path(parts_dir)
        self.fault = fault
        self._embedder = None

    def _session(self):
        if self._embedder is None:
            path, node = self.backbone.path, socket.gethostname()
            if not path.is_file():
                raise _Fatal(f"the model {path} is not on node {node}: the cache folder (`cache_dir`) must be on a "
                             f"filesystem every node sees, at the same path (docs/distributed.md)")
            if sha256_file(path) != self.backbone.sha256:
                raise _Fatal(f"the model {path} on node {node} is not the one the driver exported (sha256 differs); "
                             f"the cache folder must be one shared folder, not a copy per node")
            self._embedder = OnnxEmbedder(self.backbone, self.threads, spin=False)   # decoders share the cores
        return self._embedder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self._run(str(name), int(index), str(payload))
                for name, index, payload in zip(batch["shard"], batch["index"], batch["samples"])]
        return {key: np.array([row[key] for row in rows]) for key in rows[0]}

    def _run(self, name: str, index: int, payload: str) -> dict[str, object]:
        _test_fault(self.fault, index)
        row: dict[str, object] = {"shard": name, "index": index, "done": 0, "failures": "[]", "seconds": 0.0,
                                  "error": "", "fatal": False, "node": _node_id()}
        try:
            row.update(self._embed([Sample(Path(path), "", sha256=sha) for path, sha in json.loads(payload)],
                                   f"part-shard-{name}.npz"))
        except (_Fatal, CxrError) as exc:        # model missing on this node, disk full: every shard would fail
            row.update(error=str(exc), fatal=True)
        except Exception as exc:  # noqa: BLE001 - anything else fails this shard only; the driver names its images
            row.update(error=f"{type(exc).__name__}: {_first_line(exc)}")
        return row

    def _embed(self, samples: list[Sample], part_name: str) -> dict[str, object]:
        shas: list[str] = []
        blocks: list[np.ndarray] = []
        failures: list[list[str]] = []
        seconds = 0.0
        for embedded, rows, bad, batch_seconds in embed_batches(self._session(), samples, self.batch_size,
                                                                self.threads, self.mask):
            failures += [[s.sha256, reason] for s, reason in bad]
            seconds += batch_seconds
            if embedded:
                blocks.append(rows)
                shas += [s.sha256 for s in embedded]
        if shas:
            write_part(self.parts_dir, part_name, shas, np.concatenate(blocks))
        return {"done": len(shas), "failures": json.dumps(failures), "seconds": seconds}


# ---------------------------------------------------------------------------------------------- driver
class _NoTraceback(logging.Filter):
    """Ray Data logs each dropped shard with a traceback; the summary names its images instead (the one-line
    message stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    source = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    data = logging.getLogger("ray.data")
    no_traceback, level = _NoTraceback(), data.level
    source.addFilter(no_traceback)
    data.setLevel(max(level, logging.ERROR))   # not its notes on progress bars and execution plans
    try:
        yield
    finally:
        source.removeFilter(no_traceback)
        data.setLevel(level)


def embed_on_ray(todo: list[Sample], onnx: OnnxBackbone, cache: FeatureCache, settings: ExtractSettings,
                 label: str) -> Computed:
    """The Ray engine: embed ``todo`` on the cluster into part files of ``cache`` (see module docstring)."""
    require_ray()
    engine = settings.engine
    with ray_session():
        tick = time.perf_counter()
        where = _connect(engine, engine.workers)
        connect_seconds = time.perf_counter() - tick
        shards = make_shards(todo, engine.shard_size)
        workers = min(_pool_size(engine, where), len(shards))
        run = _Run(shards, {s.sha256: s for s in todo})
        run.consume(_mapped(shards, workers, onnx, cache, settings), settings.progress, label, len(todo))
    lost = [shard for shard in shards if shard.name not in run.finished]
    for shard in lost:
        log.warning("shard %d (%d images) did not finish", shard.index, len(shard.samples))
        reason = (f"not embedded: shard {shard.index}'s Ray worker died {engine.max_retries + 1} times (crash, "
                  f"out of memory or killed)")
        run.computed.failures += [(s, f"{s.path}: {reason}") for s in shard.samples]
    order = {s.sha256: i for i, s in enumerate(todo)}
    run.computed.failures.sort(key=lambda failure: order[failure[0].sha256])   # the dataset's order, as locally
    cache.adopt_parts()
    startup = f"connect {connect_seconds:.1f} s, first shard back after {run.first_seconds or 0.0:.1f} s"
    run.computed.note = (f"ray: {where}, {_count(workers, 'worker')} x {_count(engine.threads_per_worker, 'thread')} "
                         f"on {_count(len(run.nodes), 'node')}, {_count(len(shards), 'shard')}, "
                         f"{run.n_errored + len(lost)} failed; {startup}")
    return run.computed


def _mapped(shards: list[Shard], workers: int, onnx: OnnxBackbone, cache: FeatureCache,
            settings: ExtractSettings):
    """The Ray Data pipeline: one block per shard, mapped by a fixed pool of ``EmbedShard`` actors."""
    import ray.data

    engine = settings.engine
    dataset = ray.data.from_items([shard.item() for shard in shards], override_num_blocks=len(shards))
    context = dataset.context
    context.max_errored_blocks = -1           # a shard whose worker died too often: named by the driver, not fatal
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    with warnings.catch_warnings():
        # Ray Data takes an actor's restart and retry limits only as ``ray_remote_args`` (deprecated without a
        # named replacement so far); its own default retries a shard whose worker dies forever.
        warnings.simplefilter("ignore", DeprecationWarning)
        return dataset.map_batches(
            EmbedShard, batch_size=1,
            # one shard per actor at a time: a worker killed by one shard takes no other shard down with it
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=engine.threads_per_worker,
            fn_constructor_kwargs={"backbone": replace(onnx, path=onnx.path.absolute()),   # workers' cwd differs
                                   "batch_size": settings.batch_size, "threads": engine.threads_per_worker,
                                   "mask": settings.mask, "parts_dir": str(cache.parts_dir.absolute()),
                                   "fault": os.environ.get(FAULT_ENV, "")},
            max_restarts=-1, max_task_retries=engine.max_retries)


class _Run:
    """What the driver learns from the shards' summary rows as they stream in."""

    def __init__(self, shards: list[Shard], by_sha: dict[str, Sample]) -> None:
        self.shards, self.by_sha = shards, by_sha
        self.computed = Computed()
        self.finished: set[str] = set()
        self.nodes: set[str] = set()
        self.n_errored = 0
        self.first_seconds: float | None = None

    def consume(self, mapped, progress: bool, label: str, total: int) -> None:
        import ray
        from tqdm import tqdm

        started = time.perf_counter()
        with _quiet_ray_data(), tqdm(total=total, unit="img", desc=f"{label} (ray)", leave=False,
                                     disable=not progress) as bar:
            try:
                for row in mapped.iter_rows():
                    if self.first_seconds is None:
                        self.first_seconds = time.perf_counter() - started
                    bar.update(self.add(row))
            except ray.exceptions.RayError as exc:
                raise CxrError(f"the Ray workers failed ({_first_line(exc)}); every node needs cxr-transfer and its "
                               f"dependencies installed (docs/distributed.md); finished shards are kept") from None

    def add(self, row: dict) -> int:
        """Take one summary row; returns the shard's image count. A fatal row stops the run."""
        shard = self.shards[int(row["index"])]
        self.finished.add(shard.name)
        self.nodes.add(str(row["node"]))
        if row["fatal"]:
            raise CxrError(str(row["error"]))
        if row["error"]:
            self.n_errored += 1
            log.warning("shard %d (%d images) failed: %s", shard.index, len(shard.samples), row["error"])
            self.computed.failures += [(s, f"{s.path}: shard {shard.index} failed ({row['error']})")
                                       for s in shard.samples]
        else:
            self.computed.n_embedded += int(row["done"])
            self.computed.inference_seconds += float(row["seconds"])
            for sha, reason in json.loads(str(row["failures"])):
                log.warning("skipped %s", reason)
                self.computed.failures.append((self.by_sha[sha], reason))
        return len(shard.samples)
