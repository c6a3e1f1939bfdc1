"""Restore video clips frame by frame, keeping everything but the degradation.

Decoding and encoding go through PyAV (FFmpeg in its wheels). What is kept:
every frame (count in = count out) with its own timestamp (variable frame
rates too), the time base, the rotation (display matrix), the colour range,
space, primaries and transfer where the encoder takes them, and every audio
and subtitle stream the output container can hold, copied packet for packet
(never re-encoded). Frames are restored in their stored orientation, as the
decoder hands them over; the rotation travels as metadata.

A long clip is encoded in segments of about `segment_seconds`, each finalised
as a file of its own in a hidden folder beside the output
(`.<name>.derestore-parts/`); at the end the segments' packets and the copied
streams are concatenated, without re-encoding, into the output, which appears
atomically. An interrupted or killed run resumes from the first segment not
finalised (the caller asks for it: `resume=True`). Segments start on a key
frame and the encoder makes no B-frames, so they join seamlessly.

This module knows no models: it hands batches of decoded RGB frames to the
caller's `restore` function. It imports PyAV only when a clip is processed.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import atomic
from .errors import InputError, UsageError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})
# Output container → FFmpeg muxer name.
_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
# ISO base media brands of still images (HEIF, AVIF): an `ftyp` box that is not a video.
_IMAGE_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
DEFAULT_CRF = {"libx264": 18, "libx265": 20, "libvpx-vp9": 24, "libvpx": 10}

FrameBatch = list[np.ndarray]  # (H, W, 3) uint8 RGB frames
Restore = Callable[[FrameBatch], FrameBatch]


def container_of(path: str | Path) -> str | None:
    """The video container `path` holds, judged by its first bytes (".mp4", ".mkv", ".webm", ".avi",
    ".mov"), or None when it is not a video file (or cannot be read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return None
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_BRANDS:
            return None
        return ".mov" if brand == b"qt  " else ".mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return ".mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return ".webm" if b"webm" in head else ".mkv"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return ".avi"
    return None


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoOptions:
    """How restored clips are written. `codec` None: H.264 (VP9 for WebM, which holds no H.264);
    `crf` None: the codec's near-visually-lossless default; `bitrate` (e.g. "8M") replaces CRF."""

    codec: str | None = None
    crf: int | None = None
    bitrate: str | None = None
    frames_dir: bool = False  # numbered PNG frames in a folder instead of a video
    temporal: bool = False  # smooth frame-to-frame flicker where the input stands still
    segment_seconds: float = 10.0
    batch: int = 4  # frames restored per call of `restore`

    def codec_for(self, suffix: str) -> str:
        if self.codec:
            return self.codec
        return "libvpx-vp9" if suffix == ".webm" else "libx264"

    def check(self) -> None:
        import av

        if self.codec is not None and self.codec not in av.codecs_available:
            raise UsageError(f"video_codec='{self.codec}' is not an encoder this FFmpeg has; use e.g. libx264, "
                             "libx265, libvpx-vp9 or ffv1")
        if self.crf is not None and not 0 <= self.crf <= 63:
            raise UsageError(f"crf={self.crf}: must be between 0 (lossless) and 51 (x264) or 63 (VP9)")
        if self.crf is not None and self.bitrate is not None:
            raise UsageError("give either crf= or bitrate=, not both")
        if self.segment_seconds <= 0:
            raise UsageError(f"segment_seconds={self.segment_seconds:g}: must be positive")


@dataclass
class ClipReport:
    frames: int = 0
    fps: float | None = None
    duration: float | None = None  # seconds of video
    width: int | None = None
    height: int | None = None
    resumed_from: int = 0  # frames already done by an earlier, interrupted run
    notes: list[str] = field(default_factory=list)


def output_path(src: Path, out_dir: Path, stem: str, *, frames_dir: bool = False) -> Path:
    """Where a clip's restoration goes: the same container (judged by content), or a frames folder."""
    if frames_dir:
        return out_dir / stem
    suffix = src.suffix.lower() if is_video_path(src) else (container_of(src) or ".mp4")
    return out_dir / f"{stem}{suffix}"


# ---------------------------------------------------------------- reading


@dataclass
class _Source:
    """What the output must carry over from the input."""

    width: int
    height: int
    time_base: Fraction
    rate: Fraction | None
    frames: int | None  # from the container's header; None when it does not say
    duration: float | None
    rotation: int
    colour: dict[str, int]
    copied: list[int]  # indexes of the streams copied as they are (audio, subtitles)


def _probe(src: Path, muxer: str | None) -> _Source:
    import av

    with av.open(str(src)) as container:
        if not container.streams.video:
            raise InputError(f"{src}: has no video stream")
        stream = container.streams.video[0]
        first = next(container.decode(stream), None)
        if first is None:
            raise InputError(f"{src}: its video stream holds no frames")
        copied = [s.index for s in container.streams if s.type in ("audio", "subtitle")
                  and (muxer is None or _muxable(s, muxer))]
        colour = {name: int(getattr(first, name)) for name in ("color_range", "colorspace", "color_primaries",
                                                                 "color_trc")}
        duration = float(container.duration / 1e6) if container.duration else None
        return _Source(width=first.width, height=first.height, time_base=stream.time_base,
                       rate=stream.average_rate, frames=stream.frames or None, duration=duration,
                       rotation=int(first.rotation or 0), colour=colour, copied=copied)


def _muxable(stream: Any, muxer: str) -> bool:
    """Whether the output container can hold this stream's codec (e.g. WebM takes Opus/Vorbis only)."""
    import av

    try:
        return stream.codec_context.name in av.format.ContainerFormat(muxer, "w").supported_codecs
    except Exception:
        return True  # the muxer will say at the end if it cannot


def _decode(src: Path, frames: queue.Queue[Any], stop: threading.Event) -> None:
    """Decode every frame, in order, into `frames` (bounded: decoding waits for restoration); an
    exception or None ends the stream."""
    import av

    try:
        with av.open(str(src)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = None
            for frame in container.decode(stream):
                pts = frame.pts if frame.pts is not None else (last + 1 if last is not None else 0)
                if last is not None and pts <= last:  # encoders need strictly increasing timestamps
                    pts = last + 1
                last = pts
                _put(frames, (pts, frame.to_ndarray(format="rgb24")), stop)
                if stop.is_set():
                    return
        _put(frames, None, stop)
    except BaseException as exc:  # handed to the consumer
        _put(frames, exc, stop)


def _put(q: queue.Queue[Any], item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


# ---------------------------------------------------------------- writing


def _encoder(container: Any, source: _Source, codec: str, options: VideoOptions, notes: list[str]) -> Any:
    stream = container.add_stream(codec)
    stream.width, stream.height = source.width, source.height
    odd = source.width % 2 or source.height % 2
    if codec in ("libx264", "libx265") and odd:
        stream.pix_fmt = "yuv444p"
        _note(notes, f"odd frame size {source.width}×{source.height}: written as 4:4:4 ({codec} 4:2:0 needs even "
                     "sides)")
    elif codec == "ffv1":
        stream.pix_fmt = "yuv444p"
    else:
        stream.pix_fmt = "yuv420p"
    stream.time_base = source.time_base
    context = stream.codec_context
    context.time_base = source.time_base
    if source.rate:
        context.framerate = source.rate
    # Segments must join: no frame may be decoded from a later segment's frames.
    context.max_b_frames = 0
    for name, value in source.colour.items():
        try:
            setattr(context, name, value)
        except (AttributeError, ValueError, TypeError):
            pass
    settings: dict[str, str] = {}
    if options.bitrate:
        settings["b"] = options.bitrate
    elif codec in DEFAULT_CRF or options.crf is not None:
        settings["crf"] = str(options.crf if options.crf is not None else DEFAULT_CRF[codec])
        if codec.startswith("libvpx"):
            settings["b"] = "0"  # constant quality
    if codec.startswith("libvpx"):
        settings.update({"row-mt": "1", "deadline": "good", "cpu-used": "4"})
    stream.options = settings
    return stream


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def _encode_part(fh: IO[bytes], muxer: str, source: _Source, codec: str, options: VideoOptions,
                 frames: Iterator[tuple[int, np.ndarray]], notes: list[str]) -> None:
    import av

    with av.open(fh, "w", format=muxer) as container:
        stream = _encoder(container, source, codec, options, notes)
        for pts, rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = pts, source.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _join(fh: IO[bytes], muxer: str, src: Path, source: _Source, parts: list[Path]) -> None:
    """The segments' video packets and the input's copied streams, interleaved by time, into `fh`."""
    import av

    with av.open(str(parts[0])) as first, av.open(str(src)) as original, av.open(fh, "w", format=muxer) as out:
        video = out.add_stream_from_template(first.streams.video[0])
        if source.rotation:
            video.set_display_rotation(source.rotation)
        copies = {index: out.add_stream_from_template(original.streams[index]) for index in source.copied}
        streams = [_part_packets(parts, video)]
        if copies:
            streams.append(_copied_packets(original, copies))
        for packet in _by_time(streams):
            out.mux(packet)


def _part_packets(parts: list[Path], stream: Any) -> Iterator[Any]:
    import av

    for part in parts:
        with av.open(str(part)) as container:
            for packet in container.demux(container.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    yield packet


def _copied_packets(original: Any, copies: dict[int, Any]) -> Iterator[Any]:
    for packet in original.demux([original.streams[i] for i in copies]):
        if packet.dts is not None:
            packet.stream = copies[packet.stream_index if packet.stream is None else packet.stream.index]
            yield packet


def _by_time(streams: list[Iterator[Any]]) -> Iterator[Any]:
    """Merge packet streams in order of decoding time, so the muxer need not buffer whole streams."""
    heads = [next(s, None) for s in streams]
    while any(h is not None for h in heads):
        i = min((i for i, h in enumerate(heads) if h is not None), key=lambda i: float(heads[i].dts * heads[i].time_base))
        yield heads[i]
        heads[i] = next(streams[i], None)


# ---------------------------------------------------------------- resume state


def parts_folder(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.derestore-parts")


def _state_key(src: Path, fingerprint: dict[str, object]) -> dict[str, object]:
    st = src.stat()
    return {"input": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, **fingerprint}


def _prepare_parts(dst: Path, key: dict[str, object], resume: bool) -> Path:
    """The segments folder, emptied unless it holds an earlier run's segments of the same input and
    settings and resuming was asked for."""
    folder = parts_folder(dst)
    state = folder / "state.json"
    if folder.is_dir():
        try:
            same = json.loads(state.read_text()) == key
        except (OSError, ValueError):
            same = False
        if not (resume and same):
            shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not state.is_file():
        atomic.write_text(state, json.dumps(key, indent=1))
    atomic.sweep(folder)
    return folder


# ---------------------------------------------------------------- the clip


def restore_clip(src: Path, dst: Path, restore: Restore, options: VideoOptions = VideoOptions(), *,
                 resume: bool = False, fingerprint: dict[str, object] | None = None,
                 on_probe: Callable[[ClipReport], None] | None = None,
                 on_frames: Callable[[int, int | None], None] | None = None) -> ClipReport:
    """Restore every frame of `src` through `restore` and write the clip to `dst` (a video file, or a
    folder of numbered PNG frames `000001.png`… with `options.frames_dir`).

    `resume`: continue an interrupted run's segments (or frames) when they belong to the same input
    and `fingerprint` (the caller's settings: model, tiles…). `on_probe(report)` is told the clip's
    size and rate before the first frame; `on_frames(done, total)` reports progress (total None when
    the container does not say). Problems with the file raise InputError.
    """
    try:
        import av
    except ImportError:
        raise UsageError("video needs PyAV: pip install av (or 'derestore[video]')") from None
    options.check()
    suffix = dst.suffix.lower()
    muxer = None if options.frames_dir else _MUXERS.get(suffix)
    if not options.frames_dir and muxer is None:
        raise UsageError(f"{dst}: cannot write '{suffix}' clips; use one of {', '.join(sorted(_MUXERS))}")
    try:
        source = _probe(src, muxer)
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, StopIteration) as exc:
        raise InputError(f"{src}: not a video FFmpeg can read ({' '.join(str(exc).split())})") from None
    report = ClipReport(fps=float(source.rate) if source.rate else None, duration=source.duration,
                        width=source.width, height=source.height)
    if on_probe is not None:
        on_probe(report)
    codec = options.codec_for(suffix)
    key = _state_key(src, {**(fingerprint or {}), "options": asdict(options), "codec": codec})
    if options.frames_dir:
        dst.mkdir(parents=True, exist_ok=True)
        parts_dir = None
    else:
        parts_dir = _prepare_parts(dst, key, resume)
    per_part = max(1, round(options.segment_seconds * float(source.rate or 25)))
    frames_q: queue.Queue[Any] = queue.Queue(maxsize=2 * options.batch)
    stop = threading.Event()
    reader = threading.Thread(target=_decode, args=(src, frames_q, stop), daemon=True, name="derestore-decode")
    reader.start()
    smoother = _Smoother() if options.temporal else None
    try:
        done = _run(frames_q, restore, options, source, codec, muxer, dst, parts_dir, per_part, smoother, report,
                    on_frames)
    except InputError as exc:
        raise InputError(f"{src}: {exc}") from exc.__cause__
    finally:
        stop.set()
    report.frames = done
    if parts_dir is not None:
        parts = sorted(parts_dir.glob("part-*"))
        try:
            atomic.write(dst, lambda fh: _join(fh, muxer, src, source, parts))  # type: ignore[arg-type]
        except (av.error.FFmpegError, OSError) as exc:
            raise InputError(f"{dst}: cannot write the clip ({' '.join(str(exc).split())})") from None
        shutil.rmtree(parts_dir, ignore_errors=True)
    return report


def _run(frames_q: queue.Queue[Any], restore: Restore, options: VideoOptions, source: _Source, codec: str,
         muxer: str | None, dst: Path, parts_dir: Path | None, per_part: int, smoother: _Smoother | None,
         report: ClipReport, on_frames: Callable[[int, int | None], None] | None) -> int:
    """Restore the decoded frames batch by batch, straight into the segment being encoded (or into frame
    files), so that only a few frames are in memory however long the clip. Returns the number of frames."""
    count = 0

    def decoded() -> Iterator[tuple[int, int, np.ndarray]]:
        nonlocal count
        while True:
            item = frames_q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                if isinstance(item, (InputError, UsageError)):
                    raise item
                raise InputError(f"cannot decode frame {count + 1}: {' '.join(str(item).split())}") from item
            pts, rgb = item
            yield count, pts, rgb
            count += 1
            if on_frames is not None:
                on_frames(count, source.frames)

    def restored(items: Iterator[tuple[int, int, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
        batch: list[tuple[int, int, np.ndarray]] = []
        for item in items:
            batch.append(item)
            if len(batch) == options.batch:
                yield from _through(batch, restore, smoother)
                batch = []
        yield from _through(batch, restore, smoother)

    def skipped(index: int) -> None:
        report.resumed_from = index + 1
        if smoother is not None:
            smoother.forget()

    if parts_dir is None:
        todo = []
        for index, pts, rgb in decoded():
            if (dst / _frame_name(index)).is_file():  # written by an earlier run
                skipped(index)
                continue
            todo.append((index, pts, rgb))
            if len(todo) == options.batch:
                _write_frames(dst, restored(iter(todo)))
                todo = []
        _write_frames(dst, restored(iter(todo)))
        return count
    for number, items in itertools.groupby(decoded(), key=lambda item: item[0] // per_part):
        part = parts_dir / _part_name(number, muxer)
        if part.is_file():  # finalised by an earlier run: decoded past, not restored again
            last = None
            for last in items:
                pass
            if last is not None:
                skipped(last[0])
            continue
        atomic.write(part, lambda fh: _encode_part(fh, muxer, source, codec, options,  # type: ignore[arg-type]
                                                   ((pts, rgb) for _, pts, rgb in restored(items)), report.notes))
    return count


def _through(batch: list[tuple[int, int, np.ndarray]], restore: Restore,
             smoother: _Smoother | None) -> Iterator[tuple[int, int, np.ndarray]]:
    if not batch:
        return
    for (index, pts, rgb_in), rgb_out in zip(batch, restore([rgb for _, _, rgb in batch])):
        yield index, pts, (smoother(rgb_in, rgb_out) if smoother is not None else rgb_out)


def _write_frames(folder: Path, frames: Iterator[tuple[int, int, np.ndarray]]) -> None:
    for index, _, rgb in frames:
        _write_frame(folder / _frame_name(index), rgb)


def _part_name(number: int, muxer: str | None) -> str:
    return f"part-{number:06d}.{muxer}"


def _frame_name(index: int) -> str:
    return f"{index + 1:06d}.png"


def _write_frame(path: Path, rgb: np.ndarray) -> None:
    from . import imageio

    imageio.write_image(path, imageio.Image(pixels=rgb, alpha=None, format="PNG"))


class _Smoother:
    """Flicker reduction: where the input stands still, the output leans on the previous output.

    The weight of the previous output falls from `strength` (input unchanged) to 0 (input changed by
    `motion` or more, in 8-bit levels, largest over the colour channels), so moving content and
    rain or snow, which change between frames, are left as restored.
    """

    def __init__(self, strength: float = 0.5, motion: float = 6.0) -> None:
        self.strength, self.motion = strength, motion
        self.previous: tuple[np.ndarray, np.ndarray] | None = None

    def forget(self) -> None:
        self.previous = None

    def __call__(self, rgb_in: np.ndarray, rgb_out: np.ndarray) -> np.ndarray:
        out = rgb_out.astype(np.float32)
        if self.previous is not None and self.previous[0].shape == rgb_in.shape:
            prev_in, prev_out = self.previous
            change = np.abs(rgb_in.astype(np.float32) - prev_in).max(axis=2, keepdims=True)
            weight = self.strength * np.clip(1.0 - change / self.motion, 0.0, 1.0)
            out = out * (1.0 - weight) + prev_out * weight
        self.previous = (rgb_in.astype(np.float32), out)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def flicker(frames: list[np.ndarray], static: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames over the `static` mask (8-bit levels)."""
    diffs = [np.abs(b.astype(np.float32) - a.astype(np.float32))[static].mean() for a, b in zip(frames, frames[1:])]
    return float(np.mean(diffs)) if diffs else 0.0
