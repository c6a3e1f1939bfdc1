"""Running a planned run on a Ray cluster, and a `map_batches` class for Ray Data pipelines.

`run_jobs_on_ray` is the Ray executor behind `derestore.run(..., ray=ADDRESS)`:
a pool of model replicas (Ray actors) each running the same `pipeline.Step`
as a local run — read, restore, write one input, per-file failures included —
so output names, atomic writes and error reports cannot differ from a local
run. It is a pool over Ray core rather than a Ray Data dataset of the jobs:
the driver hands each replica at most `IN_FLIGHT` jobs at a time (memory stays
flat for millions of inputs, where a dataset would first materialise every job
in the object store), a slow replica never holds a queue of work hostage, and
an interrupt reaches the replicas at once. Inputs, outputs and `weights`
files must be on a file system every node mounts at the same path.

`Restorer` is for users who compose their own Ray Data pipeline:

    ds = ray.data.read_images("s3://bucket/rainy/")
    ds = ds.map_batches(Restorer, fn_constructor_kwargs={"task": "derain"}, concurrency=2, batch_size=4)
    ds.write_images("s3://bucket/derained/", column="image")
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import imageio
from .errors import DerestoreError, DeviceFailure, ModelUnavailable, UsageError
from .pipeline import WRITE_GRACE, Job, Result, Step, already_done

log = logging.getLogger(__name__)

_CLIENT_ADDRESS = re.compile(r"ray://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}")
# Threads of one CPU replica by default: torch's convolutions gain little per thread beyond a few,
# while replicas scale almost linearly (each holds its own copy of the model and of one image).
THREADS_PER_REPLICA = 4
# Jobs handed to a replica at a time: one being restored while the other is read or written.
IN_FLIGHT = 2
# Times Ray restarts a replica that died (its jobs in flight are reported failed) before it is given up.
RESTARTS = 2
# Seconds a Ray cluster's address may take to answer before the run gives up on it.
PROBE_TIMEOUT = 5.0
# Seconds without any replica started before the run says it is waiting for the cluster.
PATIENCE = 60.0
# Environment variables that configure derestore (cache, offline mode, registries, mirror): the replicas
# get the driver's, whatever environment the cluster was started in.
_ENVIRONMENT = re.compile(r"DERESTORE_\w+")


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster a run uses, and how many model replicas it got."""

    address: str  # as given: "local", "auto" or "ray://host:port"
    workers: int  # model replicas (actors)
    gpus_per_worker: float
    threads_per_worker: int | None  # torch threads of a CPU replica; None on GPUs
    nodes: int
    why: str  # how the number of replicas was chosen, in words

    def record(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def check_ray_options(address: str, workers: int | None, device: str = "auto") -> None:
    """Refuse, before anything is loaded, an address that is not a Ray address, fewer than one replica,
    a device that cannot name every replica's, or a missing Ray."""
    if address not in ("local", "auto") and not _CLIENT_ADDRESS.fullmatch(address):
        raise UsageError(f"ray='{address}' is not a Ray address; use local, auto or ray://HOST:PORT")
    if workers is not None and workers < 1:
        raise UsageError(f"ray_workers={workers}: must be at least 1")
    if re.fullmatch(r"cuda:\d+", device):
        raise UsageError(f"device='{device}' names one GPU of one machine; on Ray each replica gets a GPU "
                         "of its own: use device='auto' or 'cuda'")
    if importlib.util.find_spec("ray") is None:
        raise UsageError("Ray is not installed; pip install 'derestore[ray]'")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError(f"Ray cannot be imported ({exc}); pip install 'derestore[ray]'") from None
    return ray


def plan_cluster(address: str, node_resources: list[dict[str, float]], workers: int | None,
                 device: str = "auto") -> Cluster:
    """How many replicas, with what, on nodes of these resources (Ray's "CPU"/"GPU" per alive node).

    GPUs (unless device='cpu'): one replica per GPU, or `workers` with one GPU each.
    CPUs only: replicas of THREADS_PER_REPLICA threads (fewer on smaller nodes), as
    many as each node holds; or `workers` sharing the CPUs between them.
    """
    gpus = sum(math.floor(node.get("GPU", 0.0)) for node in node_resources)
    nodes = len(node_resources)
    if gpus and device != "cpu":
        if workers is None:
            return Cluster(address, gpus, 1.0, None, nodes, f"one per GPU ({gpus} GPUs)")
        return Cluster(address, workers, 1.0, None, nodes, f"workers={workers} as asked, one GPU each")
    if device == "cuda":
        raise UsageError("device='cuda': the Ray cluster has no GPUs; use device='auto' or 'cpu'")
    cpus = [math.floor(node.get("CPU", 0.0)) for node in node_resources]
    if max(cpus, default=0) < 1:
        raise UsageError(f"the Ray cluster at {address} has no CPUs or GPUs for replicas; add nodes that have")
    total = sum(cpus)
    if workers is None:
        threads = min(THREADS_PER_REPLICA, max(cpus))
        count = sum(c // threads for c in cpus)
        return Cluster(address, count, 0.0, threads, nodes,
                       f"{total} CPUs / {threads} thread{'s' * (threads > 1)} per replica")
    threads = max(1, min(total // workers, max(cpus)))
    return Cluster(address, workers, 0.0, threads, nodes,
                   f"workers={workers} as asked, {threads} thread{'s' * (threads > 1)} each")


class _Abandoned(BaseException):
    """The run stopped while this input was being restored: it is dropped, not reported.

    A BaseException, so that `Step` lets it through instead of reporting the input failed."""


class _Replica:
    """One model replica (a Ray actor): runs `Step` on the jobs the driver hands it.

    Its methods run on up to IN_FLIGHT + 1 threads: the model runs one image at a
    time, while other images are read and written, and `stop` still gets through.
    """

    def __init__(self, cwd: str, load: dict[str, Any], step: dict[str, Any], threads: int | None) -> None:
        self.error: tuple[str, str] | None = None
        self.lock = threading.Lock()
        self.stopping = False
        try:
            self.step = self._prepare(cwd, load, step, threads)
        except DerestoreError as exc:
            # Reported through `ready`, in one line, rather than as a Ray traceback.
            self.error = (type(exc).__name__, " ".join(str(exc).split()))

    def _prepare(self, cwd: str, load: dict[str, Any], options: dict[str, Any], threads: int | None) -> Step:
        import socket

        from . import api

        try:
            # Relative paths (inputs, outputs, weights) then mean what they mean to the driver, and results
            # and error messages name files exactly as a local run does.
            os.chdir(cwd)
        except OSError:
            raise UsageError(f"the driver's working folder {cwd} does not exist on Ray node "
                             f"{socket.gethostname()}; inputs and outputs must be on a file system every "
                             "node mounts at the same path") from None
        options = dict(options)
        gt, protocol, crop_border = options.pop("gt", None), options.pop("protocol"), options.pop("crop_border")
        score = api.GroundTruth.open(gt, protocol, crop_border) if gt is not None else None
        # This process is the replica's own: `threads` may set torch's process-wide, and a replica that
        # finds the checkpoint's export cached for them never imports torch at all.
        step = api.load(**load, threads=threads).step(**options, score=score)
        return dataclasses.replace(step, restore=self._guard(step.restore))

    def _guard(self, restore: Callable[..., tuple[object, list[str]]]) -> Callable[..., tuple[object, list[str]]]:
        """`restore`, one image at a time, given up between batches of tiles once the run stops."""
        def check(done: int = 0, total: int = 0) -> None:
            if self.stopping:
                raise _Abandoned

        def guarded(payload: object, on_tiles: object = None) -> tuple[object, list[str]]:
            with self.lock:
                check()
                return restore(payload, check)

        return guarded

    def ready(self) -> tuple[str, str] | None:
        """None once the model is loaded, else (error class, message)."""
        return self.error

    def run(self, job: Job) -> tuple[Result | None, bool]:
        """`job`'s result and whether the device failed on it; no result if the run stopped first."""
        try:
            return self.step(job), False
        except DeviceFailure as exc:
            return Result(job.input, job.output, "failed", error=" ".join(str(exc).split())), True
        except _Abandoned:
            return None, False

    def stop(self) -> None:
        self.stopping = True


@dataclass
class _Member:
    handle: Any
    free: int = 0  # job slots; none until the replica has started
    restarting: bool = False  # its process died; Ray restarts it


class _Pool:
    """The replicas of one run and the jobs in flight on them."""

    def __init__(self, ray: Any, cluster: Cluster, load: dict[str, Any], step: dict[str, Any]) -> None:
        self.ray = ray
        env = {k: v for k, v in os.environ.items() if _ENVIRONMENT.fullmatch(k)}
        options: dict[str, Any] = {
            "num_cpus": cluster.threads_per_worker or 1, "num_gpus": cluster.gpus_per_worker,
            "max_concurrency": IN_FLIGHT + 1, "max_restarts": RESTARTS, "max_task_retries": 0,
            "scheduling_strategy": "SPREAD",
        }
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = ray.remote(_Replica).options(**options)
        cwd = os.getcwd()
        self.members = [_Member(actor.remote(cwd, load, step, cluster.threads_per_worker))
                        for _ in range(cluster.workers)]
        self.starting = {m.handle.ready.remote(): m for m in self.members}
        self.running: dict[Any, tuple[_Member, Job]] = {}
        self.started_any = False
        self.last_error: tuple[str, str] | None = None
        self.said: set[str] = set()

    def results(self, jobs: list[Job]) -> Iterator[tuple[Result, bool]]:
        """(result, device failed) for every job, as replicas finish them (any order)."""
        queue = deque(jobs)
        waiting_since = time.monotonic()
        while queue or self.running:
            for member in self.members:
                while member.free and queue:
                    job = queue.popleft()
                    self.running[member.handle.run.remote(job)] = (member, job)
                    member.free -= 1
            if not self.running and not self.starting:
                raise self._unavailable()
            done, _ = self.ray.wait([*self.running, *self.starting], num_returns=1, timeout=PATIENCE)
            if not done:
                if not self.started_any and time.monotonic() - waiting_since >= PATIENCE:
                    self._say(f"no Ray worker has started after {PATIENCE:.0f} s: the cluster may lack the "
                              f"resources of a replica; still waiting")
                continue
            for ref in done:
                if ref in self.starting:
                    self._started(ref)
                else:
                    result, failed = self._finished(ref)
                    if result is not None:
                        yield result, failed

    def _started(self, ref: Any) -> None:
        member = self.starting.pop(ref)
        try:
            error = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            error = ("ModelUnavailable", _first_line(exc))
        if error is None:
            member.restarting = False
            member.free = IN_FLIGHT - sum(m is member for m, _ in self.running.values())
            self.started_any = True
            return
        self.last_error = error
        self.members.remove(member)
        self.ray.kill(member.handle, no_restart=True)
        what = "stopped for good" if member.restarting else "could not start"
        self._say(f"a Ray worker {what}, the others go on: {error[1]}")

    def _finished(self, ref: Any) -> tuple[Result | None, bool]:
        member, job = self.running.pop(ref)
        try:
            result, failed = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            # The replica's process died (killed for memory, a lost node): its jobs in flight fail, and it
            # gets work again once Ray has restarted it.
            if not member.restarting:
                member.restarting, member.free = True, 0
                self.starting[member.handle.ready.remote()] = member
            return Result(job.input, job.output, "failed",
                          error=f"{job.input}: the Ray worker restoring it stopped ({_first_line(exc)})"), False
        except self.ray.exceptions.RayError as exc:
            member.free += 1
            return Result(job.input, job.output, "failed", error=f"{job.input}: {_first_line(exc)}"), False
        member.free += 1
        return result, failed

    def _unavailable(self) -> DerestoreError:
        kind, message = self.last_error or ("ModelUnavailable", "every Ray worker stopped")
        if self.started_any:
            return DeviceFailure(f"every Ray worker has stopped (last: {message}); the run stops here, "
                                 "finished outputs are kept")
        cls = UsageError if kind == "UsageError" else ModelUnavailable
        return cls(f"no Ray worker could load the model: {message}")

    def _say(self, text: str) -> None:
        if text not in self.said:
            self.said.add(text)
            log.warning("%s", text)

    def stop(self, grace: float) -> Iterator[tuple[Result, bool]]:
        """Stop the run: images being restored are given up, those being written are finished (for at
        most `grace` seconds) and reported; then the replicas are ended."""
        try:
            for member in self.members:
                member.handle.stop.remote()
            deadline = time.monotonic() + grace
            while self.running:
                done, _ = self.ray.wait(list(self.running), num_returns=1,
                                        timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    break
                result, failed = self._finished(done[0])
                if result is not None:
                    yield result, failed
        finally:
            for member in self.members:
                self.ray.kill(member.handle, no_restart=True)
            self.members, self.running, self.starting = [], {}, {}


def _first_line(exc: BaseException) -> str:
    """The gist of a Ray error: its cause's last line where it carries a traceback, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b.*:", line)]
    return (causes[-1] if causes else lines[0] if lines else type(exc).__name__)[:300]


class _Session:
    """A connection to Ray for one run: started or joined, and released the way it was obtained.

    "local" starts a Ray instance here and shuts it down at the end; "auto" and
    ray:// join a cluster and only disconnect. A Ray connection the caller already
    has is used as it is and left open. Ray's own log chatter is kept off stderr
    (errors still show) and the caller's SIGTERM handler, which ray.init replaces,
    is put back.
    """

    def __init__(self, ray: Any, address: str) -> None:
        self.ray = ray
        self.owned = False
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": logging.ERROR}
        if address == "local":
            kwargs["include_dashboard"] = False
        if address == "auto":
            _probe_environment_address()
        ray_logger = logging.getLogger("ray")
        self.saved_level = ray_logger.level
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray fails to connect or start with many types; each is one line
            self._release()
            raise _connect_error(address, exc) from None
        except BaseException:
            self._release()
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if sigterm is None else sigterm)
        self.owned = True

    def close(self) -> None:
        if self.owned:
            self.owned = False
            self._release()

    def _release(self) -> None:
        try:
            self.ray.shutdown()  # "local": ends the instance; a cluster: only this connection
        finally:
            logging.getLogger("ray").setLevel(self.saved_level)

    def node_resources(self) -> list[dict[str, float]]:
        return [node["Resources"] for node in self.ray.nodes() if node.get("Alive")]


def _probe_environment_address() -> None:
    """Refuse at once a RAY_ADDRESS (host:port) where nothing listens: Ray itself would retry for minutes."""
    target = os.environ.get("RAY_ADDRESS", "")
    host, _, port = target.rpartition(":")
    if "://" in target or not host or not port.isdigit():
        return
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {target} (RAY_ADDRESS): {exc.strerror or exc}; "
                         "check that it is up, or unset RAY_ADDRESS") from None


def _connect_error(address: str, exc: Exception) -> UsageError:
    reason = _first_line(exc)
    if "ray[client]" in reason:
        return UsageError("a ray:// address needs Ray's client; pip install 'derestore[ray]'")
    if address == "local":
        return UsageError(f"cannot start a local Ray instance: {reason}")
    if address == "auto" and "Could not find any running Ray instance" in reason:
        return UsageError("ray='auto' found no running Ray cluster (RAY_ADDRESS is unset and `ray start` has "
                          "not run on this machine); start one, or use ray='local'")
    where = f"{os.environ['RAY_ADDRESS']} (RAY_ADDRESS)" if address == "auto" and os.environ.get("RAY_ADDRESS") \
        else address
    return UsageError(f"cannot reach the Ray cluster at {where}: {reason}; check that it is up")


def run_jobs_on_ray(jobs: list[Job], *, address: str, workers: int | None, load: dict[str, object],
                    step: dict[str, object], skip_existing: bool = False, fail_fast: bool = False,
                    on_cluster: Callable[[Cluster], None] | None = None) -> Iterator[Result]:
    """Run every job on the Ray cluster at `address` ("local", "auto" or "ray://HOST:PORT"); yield results
    as replicas finish them (any order).

    `load`: keyword arguments of `api.load`, run once in each replica. `step`: those of
    `Model.step` but `score`, plus `gt`, `protocol` and `crop_border` (each replica scores
    against `api.GroundTruth.open(gt, …)` when `gt` is given). `workers`: model replicas
    (default: one per GPU, or as many as the CPUs hold; see `plan_cluster`);
    `on_cluster(cluster)` is called once the cluster is known, before any result. With
    `skip_existing`, jobs whose output exists are reported skipped without going to Ray;
    when that is all of them, Ray is not contacted (`on_cluster` gets 0 workers).

    A failed input is reported and the run goes on (`fail_fast`: it ends after the first
    failure). A device failure on a replica is reported for its image, then raises
    DeviceFailure; an interrupt (KeyboardInterrupt) gives up the images being restored,
    reports those being written (for at most WRITE_GRACE seconds) and re-raises. Whatever
    ends the run, its replicas are ended and a Ray instance started here is shut down.
    """
    device = str(load.get("device") or "auto")
    check_ray_options(address, workers, device)
    done: list[Job] = []
    todo: list[Job] = []
    for job in jobs:
        (done if skip_existing and already_done(job) else todo).append(job)
    if not todo:
        if on_cluster is not None:
            on_cluster(Cluster(address, 0, 0.0, None, 0, "every output exists: Ray was not needed"))
        for job in done:
            yield Result(job.input, job.output, "skipped")
        return
    session = _Session(_import_ray(), address)
    pool: _Pool | None = None
    try:
        cluster = plan_cluster(address, session.node_resources(), workers, device)
        log.debug("Ray cluster %s: %s replica(s), %s", address, cluster.workers, cluster.why)
        if on_cluster is not None:
            on_cluster(cluster)
        pool = _Pool(session.ray, cluster, dict(load), dict(step))
        for job in done:
            yield Result(job.input, job.output, "skipped")
        try:
            for result, device_failed in pool.results(todo):
                yield result
                if device_failed:
                    raise DeviceFailure(result.error or "the device failed")
                if fail_fast and result.status == "failed":
                    return
        except (KeyboardInterrupt, DeviceFailure):
            for result, _ in pool.stop(WRITE_GRACE):
                yield result
            raise
    finally:
        try:
            if pool is not None:
                for _ in pool.stop(WRITE_GRACE):  # left unreported: the consumer has stopped listening
                    pass
        finally:
            session.close()


class Restorer:
    """A callable class for `ray.data.Dataset.map_batches`: restores the images of each batch.

        ds.map_batches(Restorer, fn_constructor_kwargs={"task": "derain"}, concurrency=2, batch_size=4)

    Each actor loads the model once (`task`, `model` or `weights`, as `derestore.load`;
    `batch_size` is the tiles per forward pass, not Ray's batch size). Batches are as
    `ray.data.read_images` makes them: the `column` ("image") holds uint8 or uint16 arrays
    H×W×3, H×W×4 (alpha kept), H×W (gray; 1×H×W among colour images, as Ray stores it),
    H×W×1 or H×W×2 (gray and alpha), stacked in one array when their sizes agree or as a
    list / object array when not. The restored images
    come back in the same column, with the same dtype, shape and container; other columns
    are passed through untouched.
    """

    def __init__(self, task: str | None = None, *, model: str | None = None, weights: str | Path | None = None,
                 tile: int | str | None = None, overlap: int | None = None, tiling: str = "blend",
                 precision: str = "auto", device: str = "auto", batch_size: int | None = None, layout: str = "auto",
                 column: str = "image") -> None:
        from . import api

        self.tile = api.check_tiling(tile, overlap, tiling)
        self.overlap, self.tiling, self.column = overlap, tiling, column
        self.model = api.load(task=task, model=model, weights=weights, device=device, precision=precision,
                              batch_size=batch_size, layout=layout)
        self.model.check_tiling(self.tile, overlap, tiling)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.column not in batch:
            raise UsageError(f"the batch has no '{self.column}' column (it has {', '.join(map(str, batch))}); "
                             "name the image column with column=")
        images = batch[self.column]
        restored = [self.restore(np.asarray(image)) for image in images]
        if isinstance(images, np.ndarray) and images.dtype != object:
            out: Any = np.stack(restored) if restored else images.copy()
        elif isinstance(images, np.ndarray):
            out = np.empty(len(restored), dtype=object)
            out[:] = restored
        else:
            out = restored
        return {**batch, self.column: out}

    def restore(self, pixels: np.ndarray) -> np.ndarray:
        """One H×W[×C] uint8/uint16 array restored, in the same shape and dtype."""
        if pixels.dtype not in (np.uint8, np.uint16):
            raise UsageError(f"images must be uint8 or uint16 arrays, not {pixels.dtype}; "
                             "convert them (e.g. read_images gives uint8)")
        if pixels.ndim == 2:
            planes = pixels[..., None]
        elif pixels.ndim == 3 and pixels.shape[2] <= 4:
            planes = pixels
        elif pixels.ndim == 3 and pixels.shape[0] == 1:
            planes = pixels[0, ..., None]  # gray among colour images: Ray's ragged tensors give it a leading axis
        else:
            raise UsageError(f"an image of shape {pixels.shape} is not H×W, H×W×1, H×W×2, H×W×3 or H×W×4")
        channels = planes.shape[2]
        color = 3 if channels >= 3 else 1
        alpha = planes[..., color] if channels in (2, 4) else None
        image = imageio.Image(pixels=np.ascontiguousarray(planes[..., :color]), alpha=alpha, format="PNG")
        out, notes = self.model.restore_array(imageio.to_float(image), tile=self.tile, overlap=self.overlap,
                                              tiling=self.tiling)
        for note in notes:
            log.info("%s", note)
        result = imageio.from_float(out, image)
        planes = result.pixels if alpha is None else np.concatenate([result.pixels, alpha[..., None]], axis=2)
        return planes.reshape(pixels.shape)
