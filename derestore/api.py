"""The public Python API; the CLI is a thin layer over these functions.

    import derestore
    model = derestore.load(task="derain")            # or model="restormer-derain", or weights="file.pth"
    results = derestore.restore(["rainy/"], "out/", model=model)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import imageio, onnx_engine, stats_choice
from .errors import DeviceFailure, ModelUnavailable, UsageError
from .pipeline import (Job, Result, Scorer, Step, TileProgress, discover, parse_shard, plan_jobs, read_list,
                       remove_stale_temp_files, run_jobs)
from .pipeline import shard as pipeline_shard
from .evaluate import evaluate_folders
from .metrics import check_protocol
from .registry import ModelRecord, Registry, load_registry
from .runner import RunReport as RunReport
from .runner import run as run

if TYPE_CHECKING:
    from .engine import Engine
    from .evaluate import RunningMeans

# `derestore eval`'s library function.
evaluate = evaluate_folders

TILINGS = ("blend", "published")
AUTO = "auto"
STATS = (AUTO, *stats_choice.STATS)
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
PHOTO_SIDE = 1024  # a whole photo's long side, for timing (engine rows are capped at 768)


@dataclass
class Model:
    """A loaded checkpoint on its device, with the tiling hints that come with it."""

    name: str
    engine: Engine
    checkpoint: Path
    record: ModelRecord | None
    tile: int
    overlap: int
    _sha256: str | None = None
    _said: set[str] = field(default_factory=set)
    replicas: list[Engine] = field(default_factory=list)  # one per device; the first is `engine`
    _idle: queue.SimpleQueue[Engine] = field(default_factory=queue.SimpleQueue, repr=False)

    def __post_init__(self) -> None:
        if not self.replicas:
            self.replicas = [self.engine]
        for replica in self.replicas:
            self._idle.put(replica)

    @property
    def devices(self) -> str:
        return ",".join(str(r.device) for r in self.replicas)

    @contextlib.contextmanager
    def _replica(self) -> Iterator[Engine]:
        """An idle replica for one image; with several, images run on them side by side."""
        engine = self._idle.get()
        try:
            yield engine
        finally:
            self._idle.put(engine)

    @property
    def arch(self) -> str:
        return self.engine.arch

    @property
    def stats(self) -> str:
        """local or global statistics (see `load`)."""
        return self.engine.stats

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            from .hub import sha256_file

            self._sha256 = sha256_file(self.checkpoint)
        return self._sha256

    def restore_array(self, image: np.ndarray, *, tile: int | str | None = None, overlap: int | None = None,
                      tiling: str = "blend",
                      on_tiles: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[str]]:
        """Restore one (3, H, W) float32 array in [0, 1]; returns the result and notes for the user.

        `on_tiles(done, total)` follows a tiled image's progress (blend tiling).

        On a GPU out-of-memory error the image is retried with half the tile
        size (down to MIN_TILE); a half-precision result that is NaN/Inf or
        black where the input is not is redone in fp32. Each is said once.
        """
        with self._replica() as engine:
            return self._restore_on(engine, image, tile, overlap, tiling, on_tiles)

    def _restore_on(self, engine: Engine, image: np.ndarray, tile: int | str | None, overlap: int | None,
                    tiling: str, on_tiles: Callable[[int, int], None] | None) -> tuple[np.ndarray, list[str]]:
        from .tiled_engine import is_device_failure, is_out_of_memory

        tile = self.tile if tile is None else tile
        overlap = self.overlap if overlap is None else overlap
        if tile == AUTO:
            tile = self.tile if tiling == "published" else engine.auto_tile(*image.shape[1:], overlap)
        notes: list[str] = []
        while True:
            try:
                out = self._run(engine, image, tile, overlap, tiling, None, on_tiles)  # type: ignore[arg-type]
                break
            except (RuntimeError, MemoryError) as exc:
                if is_device_failure(exc):
                    raise _device_failed(engine, exc) from exc
                smaller = _halve_tile(tile, image.shape[1:], overlap)  # type: ignore[arg-type]
                if not is_out_of_memory(exc) or smaller is None:
                    raise
                if engine.device_type == "cuda":
                    import torch

                    torch.cuda.empty_cache()
                self._say_once(notes, "oom", f"out of memory at tile {tile or 'whole image'}; "
                                             f"retrying with smaller tiles (first retry: {smaller})")
                tile = smaller
        if engine.compile_seconds is not None:
            self._say_once(notes, "compile", f"torch.compile: the first forward pass took "
                                             f"{engine.compile_seconds:.1f} s, compilation included")
        if engine.precision != "fp32" and _broken(out, image):
            import torch

            out = self._run(engine, image, tile, overlap, tiling, torch.float32, on_tiles)  # type: ignore[arg-type]
            self._say_once(notes, "half", f"{engine.precision} output was NaN/Inf or black; "
                                          "redone in fp32 (precision='fp32' skips the first attempt)")
        return out, notes

    def _run(self, engine: Engine, image: np.ndarray, tile: int, overlap: int, tiling: str, dtype: object,
             on_tiles: Callable[[int, int], None] | None = None) -> np.ndarray:
        if tiling not in TILINGS:
            raise UsageError(f"tiling='{tiling}' is not one of {', '.join(TILINGS)}")
        check_statistics(tiling, engine.stats)
        if tiling == "published":
            if self.arch not in stats_choice.PUBLISHED_WINDOW_ARCHS:
                return engine.restore(image, tile=0, dtype=dtype)
            from .archs import PUBLISHED_WINDOWS

            window_fn = PUBLISHED_WINDOWS[self.arch]
            windows = functools.partial(window_fn, max_batch=engine.batch_size)
            return engine.restore(image, tile=tile, window_fn=windows, dtype=dtype)
        return engine.restore(image, tile=tile, overlap=overlap, dtype=dtype, on_tiles=on_tiles)

    def _say_once(self, notes: list[str], key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            notes.append(text)

    def restore_frames(self, frames: list[np.ndarray], *, tile: int | str | None = None, overlap: int | None = None,
                       tiling: str = "blend") -> tuple[list[np.ndarray], list[str]]:
        """Restore (H, W, 3) uint8 RGB frames of one size; frames that need no tiles share forward passes."""
        images = [imageio.Image(pixels=frame, alpha=None, format="PNG") for frame in frames]
        arrays = [imageio.to_float(image) for image in images]
        notes: list[str] = []
        with self._replica() as engine:
            height, width = arrays[0].shape[1:]
            size = self.tile if tile is None else tile
            overlap = self.overlap if overlap is None else overlap
            if size == AUTO:
                size = engine.auto_tile(height, width, overlap)
            whole = tiling == "blend" and not engine.plan(height, width, size, overlap).tiled  # type: ignore[arg-type]
            # Whole frames share forward passes where the engine batches (not PyTorch on a CPU by default).
            shared = engine.batch_size > 1
            outs = self._batched(engine, arrays) if whole and shared and len(arrays) > 1 else None
            if outs is None:
                outs = []
                for array in arrays:
                    out, said = self._restore_on(engine, array, size, overlap, tiling, None)
                    outs.append(out)
                    notes += said
        return [imageio.from_float(out, image).pixels for out, image in zip(outs, images)], notes

    def _batched(self, engine: Engine, arrays: list[np.ndarray]) -> list[np.ndarray] | None:
        """Several whole frames per forward pass; None (restore them one by one, with the out-of-memory
        and half-precision fallbacks) when that fails or a half-precision result is broken."""
        from .tiled_engine import is_device_failure

        try:
            outs = engine.restore_batch(arrays)
        except (RuntimeError, MemoryError) as exc:
            if is_device_failure(exc):
                raise _device_failed(engine, exc) from exc
            return None
        return None if any(_broken(out, array) for out, array in zip(outs, arrays)) else outs

    def check_tiling(self, tile: int | str | None, overlap: int | None, tiling: str = "blend") -> None:
        """Refuse, before any image, a tile and overlap that cannot be laid out with this model, and
        the published protocol on a network converted to local statistics."""
        check_statistics(tiling, self.stats)
        tile = self.tile if tile is None else tile
        if tiling == "blend" and isinstance(tile, int) and tile > 0:
            side = 3 * tile  # large enough to need several tiles per axis
            self.engine.plan(side, side, tile, self.overlap if overlap is None else overlap)

    def step(self, *, tile: int | str | None = None, overlap: int | None = None, tiling: str = "blend",
             max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS, score: Scorer | None = None) -> Step:
        """What this model does to one input file (read, restore, write), for any executor."""
        def restore(array: object, on_tiles: TileProgress | None = None) -> tuple[object, list[str]]:
            return self.restore_array(array, tile=tile, overlap=overlap, tiling=tiling,  # type: ignore[arg-type]
                                      on_tiles=on_tiles)

        return Step(restore, prepare=imageio.to_float, finish=imageio.from_float,  # type: ignore[arg-type]
                    score=score, max_pixels=max_pixels)

    def restore_image(self, image: imageio.Image, **kwargs: object) -> tuple[imageio.Image, list[str]]:
        restored, notes = self.restore_array(imageio.to_float(image), **kwargs)  # type: ignore[arg-type]
        return imageio.from_float(restored, image), notes


MIN_TILE = 64


def check_statistics(tiling: str, stats: str) -> None:
    """The published protocol runs the paper's network: global statistics."""
    if stats not in STATS:
        raise UsageError(f"stats='{stats}' is not one of {', '.join(STATS)}")
    if tiling == "published" and stats == "local":
        raise UsageError("tiling='published' replays the paper's network, with global statistics; "
                         "use stats='global' (or stats='auto', which picks it for tiling='published')")


def _device_failed(engine: Engine, exc: BaseException) -> DeviceFailure:
    return DeviceFailure(f"{engine.device} failed: {' '.join(str(exc).split())[:300]}; "
                         "the run stops here, finished outputs are kept")


def _halve_tile(tile: int, shape: tuple[int, ...], overlap: int) -> int | None:
    """The next smaller tile after an out-of-memory error, or None at the floor."""
    current = tile or max(shape)
    smaller = current // 2
    if smaller < max(MIN_TILE, 2 * overlap + 8):
        return None
    return smaller


def _broken(out: np.ndarray, image: np.ndarray) -> bool:
    """The classic half-precision failures: non-finite values, or an all-black result from a non-black input."""
    if not np.isfinite(out).all():
        return True
    return bool(out.max() < 1.0 / 255 and image.max() > 4.0 / 255)


def _hint(registry: Registry, record: ModelRecord | None, arch: str, field_name: str, fallback: int) -> int:
    """A tiling hint from the model's record, else from any record of the same architecture."""
    candidates = [record] if record else []
    candidates += [m for m in registry.models.values() if m.arch.lower() == arch.lower()]
    for m in candidates:
        value = getattr(m, field_name)
        if value is not None:
            return int(value)
    return fallback


def load(*, task: str | None = None, model: str | None = None, weights: str | Path | None = None,
         device: str = "auto", precision: str = "auto", batch_size: int | None = None, layout: str = "auto",
         compile: bool = False, offline: bool | None = None, registry: Registry | None = None,
         download_progress: Callable[[str, int, int | None], None] | None = None,
         tune_kernels: bool = False, backend: str = "auto", stats: str = "auto",
         stats_window: int | None = None, typical_tile: int | None = None, threads: int | None = None) -> Model:
    """Resolve a task / registry name / checkpoint file to a ready-to-run model.

    Precedence: `weights` (a file), then `model` (a registry name), then the task's default.
    `layout`: auto | channels_last | contiguous; `compile`: run the network through torch.compile;
    `download_progress(name, done, total)` is called while a checkpoint downloads;
    `tune_kernels` lets cuDNN autotune (process-wide, see `Engine.create`); `backend`: auto | torch |
    onnxruntime (auto: ONNX Runtime where measured exact and faster, see `derestore.onnx_backend`).
    `stats`: local | global | auto — local statistics over windows of `stats_window` pixels (default:
    the record's, else 1.5 × the architecture's training crop), which make tiled output equal
    whole-image output; global ones are the published network's; auto picks per checkpoint
    (`derestore.local_stats`). A ModelUnavailable raised for a registry model lists in
    `alternatives` the bundled models of the same task, which need no download. `typical_tile`: the
    tile most runs will use (0: whole photos), the size at which quick networks time their backend
    and layout (default: the model's tile hint). `threads`: the CPU threads to run with — PyTorch's are
    process-wide and set only when given; ONNX Runtime's are its session's (default: torch's).

    Where a checkpoint's first use on this machine chose ONNX Runtime on the CPU, later loads run its
    cached export without importing torch or reading the checkpoint (`derestore.onnx_engine`).
    """
    check_engine_options(device=device, precision=precision, layout=layout, batch_size=batch_size,
                         backend=backend)
    check_statistics("blend", stats)
    if stats_window is not None and (isinstance(stats_window, bool) or not isinstance(stats_window, int)
                                     or stats_window < 1):
        raise UsageError(f"stats_window={stats_window}: give the window's side in pixels, at least 1")
    registry = registry or load_registry()
    if weights is not None and model is not None:
        raise UsageError("give either model= or weights=, not both")
    record: ModelRecord | None = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UsageError(f"weights={path}: no such file; check the path")
        name = path.stem
    else:
        if model is not None:
            record = registry.model(model)
        elif task is not None:
            record = registry.default_for(task)
        else:
            raise UsageError("name a task, a model= or a weights= file")
        from . import hub

        try:
            # The loader (spandrel: seconds to import) comes after the download, so that a machine
            # without network learns it at once.
            path = hub.fetch(record, offline=offline, progress=download_progress, check=_loads_as(record))
        except ModelUnavailable as exc:
            exc.alternatives = [m.name for m in registry.for_task(record.task) if m.bundled and m is not record]
            raise
        name = record.name
    from .hub import sha256_file

    # Verdicts (precision, backend, layout) are kept per checkpoint digest: hashed only where one is read.
    sha256 = record.sha256 if record is not None and record.sha256 else None
    if backend != "torch" and not compile and precision in ("auto", "fp32") and onnx_engine.cpu_only(device):
        sha256 = sha256 or sha256_file(path)
        found = _open_cached(registry, record, sha256, backend=backend, layout=layout, stats=stats,
                             stats_window=stats_window, typical_tile=typical_tile, batch_size=batch_size,
                             threads=threads)
        if found is not None:
            return Model(name=name, engine=found, checkpoint=path, record=record,
                         tile=_hint(registry, record, found.arch, "tile", DEFAULT_TILE),
                         overlap=_hint(registry, record, found.arch, "overlap", DEFAULT_OVERLAP), _sha256=sha256)
    from .loading import load_model

    loaded = load_model(path, container=record.container, expected_arch=record.arch) if record else load_model(path)
    if threads is not None:
        from .engine import set_cpu_threads

        set_cpu_threads(threads)
    from .engine import Engine, choose_device, parse_devices
    from .precision import half_types

    devices = parse_devices(device)
    if sha256 is None and (precision != "auto" or backend != "torch" or layout == "auto"
                           or any(half_types(choose_device(d)) for d in devices)):
        sha256 = sha256_file(path)
    conversion = _convert(loaded.descriptor, stats, stats_window or (record.stats_window if record else None))
    tile = _hint(registry, record, loaded.arch, "tile", DEFAULT_TILE)
    typical_tile = _typical(typical_tile, tile)
    # One replica per device (e.g. per GPU), each with its own copy of the weights.
    descriptors = [loaded.descriptor] + [copy.deepcopy(loaded.descriptor) for _ in devices[1:]]
    replicas = [Engine.create(d, device=spec, precision=precision, batch_size=batch_size, layout=layout,
                              compile=compile, tune_kernels=tune_kernels, checkpoint_sha256=sha256,
                              backend=backend, conversion=conversion, tile_hint=typical_tile)
                for d, spec in zip(descriptors, devices)]
    return Model(
        name=name,
        engine=replicas[0],
        replicas=replicas,
        checkpoint=path,
        record=record,
        tile=tile,
        overlap=_hint(registry, record, loaded.arch, "overlap", DEFAULT_OVERLAP),
        _sha256=sha256,
    )


def _typical(typical_tile: int | None, tile: int) -> int:
    """The side quick networks are timed at: `typical_tile`, the model's tile hint, or for 0 a photo's."""
    if typical_tile is None:
        return tile
    return PHOTO_SIDE if typical_tile == 0 else typical_tile


def _open_cached(registry: Registry, record: ModelRecord | None, sha256: str, *, backend: str, layout: str,
                 stats: str, stats_window: int | None, typical_tile: int | None, batch_size: int | None,
                 threads: int | None) -> Engine | None:
    """The engine of the checkpoint's cached ONNX export where its first use here chose it (else None)."""
    threads = onnx_engine.threads_for(threads)
    verdict = onnx_engine.cached_verdict(sha256, threads)
    if verdict is None:
        return None
    arch = verdict.network.architecture  # type: ignore[union-attr]  # a cached verdict records its network
    return onnx_engine.open_cached(
        verdict, threads=threads, backend=backend, layout=layout, stats=stats,
        stats_window=stats_window or (record.stats_window if record else None), batch_size=batch_size,
        tile=_typical(typical_tile, _hint(registry, record, arch, "tile", DEFAULT_TILE)))


def _convert(descriptor: object, stats: str, window: int | None) -> object:
    """The network in the statistics asked for (auto: the architecture's and record's choice)."""
    from . import local_stats

    if stats == AUTO:
        stats = local_stats.default_stats(descriptor.architecture.id, window)  # type: ignore[attr-defined]
    return local_stats.apply(descriptor, stats=stats, window=window or None)  # type: ignore[arg-type]


def _loads_as(record: ModelRecord) -> Callable[[Path], None]:
    """The hub's check that an unpinned download really is a checkpoint of the record's architecture."""
    def check(path: Path) -> None:
        from .loading import check_loads

        check_loads(path, arch=record.arch, container=record.container)

    return check


def check_engine_options(*, device: str = "auto", precision: str = "auto", layout: str = "auto",
                         batch_size: int | None = None, local: bool = True, backend: str = "auto") -> None:
    """Refuse a bad device, precision, layout, batch size or backend before anything is loaded.

    `local`: the device must exist here; otherwise (a cluster's workers) only its spelling is checked.
    The CPU is checked without importing torch (a cached ONNX export may run without it).
    """
    from .tiled_engine import LAYOUTS, PRECISIONS, check_backend

    if device not in ("auto", "cpu"):
        from .engine import choose_device, parse_device, parse_devices

        for one in parse_devices(device) if local else device.split(","):
            if local:
                choose_device(one)
            else:
                parse_device(one)
    if precision not in PRECISIONS:
        raise UsageError(f"precision='{precision}' is not one of {', '.join(PRECISIONS)}")
    if layout not in LAYOUTS:
        raise UsageError(f"layout='{layout}' is not one of {', '.join(LAYOUTS)}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size={batch_size}: must be at least 1")
    check_backend(backend, precision)


def plan(inputs: list[str] | str, output: str | Path, *, recursive: bool = False, ext: str | None = None,
         suffix: str = "", keep_tree: bool = False, from_list: str | None = None,
         shard: str | None = None, frames_dir: bool = False) -> list[Job]:
    """Find the inputs (images and video clips) and name their outputs; every usage error surfaces here,
    before a model is loaded.

    `from_list` names a file of paths (`-` = stdin); `shard` = "K/N" keeps the K-th of N parts;
    `frames_dir`: a clip's output is a folder of numbered PNG frames.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    listed = read_list(from_list) if from_list else []
    if not inputs and not listed:
        raise UsageError("no inputs: name image files, folders or globs, or a list file (from_list=FILE)")
    part = parse_shard(shard) if shard else None
    sources = discover(inputs, recursive=recursive, listed=listed)
    jobs = plan_jobs(sources, Path(output).expanduser(), ext=ext, suffix=suffix, keep_tree=keep_tree,
                     frames_dir=frames_dir)
    return pipeline_shard(jobs, *part) if part else jobs


def parse_tile(value: str | int | None) -> int | str | None:
    """`--tile` as given: a size in pixels, 0 (whole image), `auto`, or None (the model's hint)."""
    if value is None or value == AUTO or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"tile={value}: give a size in pixels, 0 (whole image) or auto") from None


def check_tiling(tile: int | str | None, overlap: int | None, tiling: str) -> int | str | None:
    """Refuses bad tiling options; returns `tile` parsed (see parse_tile)."""
    tile = parse_tile(tile)
    if isinstance(tile, int) and tile < 0:
        raise UsageError(f"tile={tile}: must be 0 (whole image), a positive size or auto")
    if overlap is not None and overlap < 0:
        raise UsageError(f"overlap={overlap}: must not be negative")
    if tiling not in TILINGS:
        raise UsageError(f"tiling='{tiling}' is not one of {', '.join(TILINGS)}")
    return tile


def restore(inputs: list[str] | str | list[Job], output: str | Path | None = None, *, model: Model,
            recursive: bool = False, ext: str | None = None, suffix: str = "", tile: int | str | None = None,
            overlap: int | None = None, tiling: str = "blend",
            max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS, skip_existing: bool = False,
            fail_fast: bool = False, score: Scorer | None = None) -> Iterator[Result]:
    """Restore every image named by `inputs` (files, folders, globs — or jobs from `plan`) into `output`.

    Yields one `Result` per input, in input order, as each finishes. `max_pixels`:
    larger images are refused (decompression-bomb guard); 0 or None: no limit.
    For a whole run with its checks, events and run record, use `run`.
    """
    tile = check_tiling(tile, overlap, tiling)
    max_pixels = check_max_pixels(max_pixels)
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], Job):
        jobs = list(inputs)  # type: ignore[arg-type]
    else:
        if output is None:
            raise UsageError("name an output folder")
        jobs = plan(inputs, output, recursive=recursive, ext=ext, suffix=suffix)  # type: ignore[arg-type]
    remove_stale_temp_files(jobs)

    return run_jobs(jobs, model.step(tile=tile, overlap=overlap, tiling=tiling, max_pixels=max_pixels, score=score),
                    skip_existing=skip_existing, fail_fast=fail_fast)


def check_max_pixels(max_pixels: int | None) -> int | None:
    """The pixel limit as the reader takes it: 0 and None mean no limit; a negative one is refused."""
    if max_pixels is not None and max_pixels < 0:
        raise UsageError(f"max_pixels={max_pixels}: must be 0 (no limit) or positive")
    return max_pixels or None


@dataclass
class GroundTruth:
    """Scores each output as it is written against the same-stem file in a ground-truth folder."""

    folder: Path
    protocol: str = "restormer"
    crop_border: int = 0
    by_stem: dict[str, Path] = field(default_factory=dict)
    means: RunningMeans | None = None
    unmatched: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, folder: str | Path, protocol: str = "restormer", crop_border: int = 0) -> GroundTruth:
        from .evaluate import RunningMeans

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UsageError(f"gt={folder}: not a folder; give the folder of ground-truth images")
        check_protocol(protocol, crop_border)
        by_stem = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and imageio.is_image_path(p)}
        return cls(folder, protocol, crop_border, by_stem, RunningMeans())

    def __call__(self, job: Job, restored: imageio.Image) -> dict[str, object]:
        """The output's metrics (no state changes: it may run on any thread or worker); see `add`."""
        from .evaluate import score_output

        gt = self.by_stem.get(job.input.stem)
        if gt is None:
            return {"gt": None, "psnr": None, "ssim": None}
        pixels = restored.pixels[..., 0] if restored.is_gray else restored.pixels
        score = score_output(pixels, gt, protocol=self.protocol, crop_border=self.crop_border)
        finite = [v if math.isfinite(v) else None for v in (score.psnr, score.ssim)]
        return {"gt": str(gt), "psnr": finite[0], "ssim": finite[1], "identical": score.identical}

    def add(self, result: Result) -> None:
        """Count a finished output's metrics into the means (or its input as unmatched)."""
        from .metrics import Score

        metrics = result.metrics
        if metrics is None or result.status != "ok":
            return
        if metrics["gt"] is None:
            self.unmatched.append(result.input)
            return
        assert self.means is not None
        psnr, ssim = metrics["psnr"], metrics["ssim"]
        self.means.add(Score(psnr=math.inf if psnr is None else float(psnr),  # type: ignore[arg-type]
                             ssim=math.nan if ssim is None else float(ssim),  # type: ignore[arg-type]
                             identical=bool(metrics["identical"])))


def list_models(task: str | None = None, *, registry: Registry | None = None) -> list[dict[str, object]]:
    """Every registered checkpoint (of `task`, if given) with its cache state, sorted by task and name;
    `default` says whether it is its task's default, `precision` the verdicts of precision probes
    run with it under this torch (device name → fp32/fp16/bf16), `stats` and `stats_window` the
    statistics it runs with under `stats="auto"` and `tiling="blend"`."""
    from . import hub
    from .stats_choice import record_choice

    registry = registry or load_registry()
    if task is not None:
        registry.task(task)
    records = sorted((r for r in registry.models.values() if task is None or r.task == task),
                     key=lambda r: (r.task, r.name))
    from .precision import cached_verdicts

    defaults = {task.default for task in registry.tasks.values()}
    infos = []
    for record in records:
        info = {**hub.describe(record), "default": record.name in defaults,
                **record_choice(record.arch, record.stats_window)}
        info["precision"] = {v.device: v.precision for v in cached_verdicts(str(info["sha256"] or ""))}
        infos.append(info)
    return infos
