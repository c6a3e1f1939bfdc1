"""Decode and encode images for the restore pipeline.

Reading keeps what a restoration must not lose: 16-bit samples (decided by
the file's type, never by its pixel values), grayscale, alpha, EXIF and ICC.
EXIF orientation is applied on read so models see the upright picture, and
the kept EXIF says orientation 1 so viewers do not rotate it twice.

Who does what, and why:
- Pillow identifies files, reads metadata and decodes 8-bit pixels (palette,
  CMYK, 1-bit and friends are converted by it).
- OpenCV decodes 16-bit PNG/TIFF pixels: Pillow reduces 16-bit RGB to 8 bits.
- 16-bit PNG and all TIFF are written by the small encoders below (numpy +
  zlib): Pillow cannot write 16-bit colour, and OpenCV writes no gray+alpha
  and, before its recent metadata API, no ICC/EXIF.
- Writes are atomic: a temporary file in the destination folder, fsync'd,
  then renamed over the final name.

This module must not import torch; arrays cross into the engine as
(3, H, W) float32 through `to_float` and come back through `from_float`.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageCms, TiffImagePlugin, TiffTags, UnidentifiedImageError

from derestore import atomic
from derestore.errors import InputError, UsageError

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
)

# 2**28 pixels. The largest real photographs fit: 200 MP phone sensors and
# 241 MP pixel-shift composites (19008 x 12672). A decompression bomb declares
# orders of magnitude more. At this size a 16-bit RGB image is 1.5 GiB decoded
# and 3 GiB as float32, about what one workstation can restore; bigger
# panoramas are let through by raising the limit (--max-pixels).
DEFAULT_MAX_PIXELS: int = 16384 * 16384


_FORMAT_BY_EXTENSION = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
# Pillow reports multi-picture camera JPEGs as MPO; they are JPEGs to users.
_READABLE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP", "TIFF": "TIFF", "BMP": "BMP"}
_DISPLAY_NAME = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "TIFF": "TIFF", "BMP": "BMP"}
_SUPPORTED_LIST = "PNG, JPEG, WebP, TIFF, BMP"

_EXIF_HEADER = b"Exif\x00\x00"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_ORIENTATION = 0x0112
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
# Pillow modes that are converted on read, and what they become.
_CONVERTED_MODES = {"1": "L", "La": "LA", "RGBX": "RGB", "YCbCr": "RGB", "RGBa": "RGBA", "PA": "RGBA"}


@dataclass
class Image:
    """A decoded image, upright, as the pipeline carries it between read and write."""

    pixels: np.ndarray  # (H, W, C), C in {1, 3}, RGB order, uint8 or uint16
    alpha: np.ndarray | None  # (H, W), same dtype as pixels, or None
    format: str  # Pillow-style name of the source format: PNG, JPEG, WEBP, TIFF, BMP
    exif: bytes | None = None  # raw EXIF ("Exif\0\0" + TIFF block), orientation already 1
    icc_profile: bytes | None = None
    frames: int = 1  # pages/frames in the source file; only the first is decoded

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] not in (1, 3):
            raise ValueError(f"Image.pixels must be (H, W, 1) or (H, W, 3), got {self.pixels.shape}")
        if self.pixels.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"Image.pixels must be uint8 or uint16, got {self.pixels.dtype}")
        if self.alpha is not None and (
            self.alpha.shape != self.pixels.shape[:2] or self.alpha.dtype != self.pixels.dtype
        ):
            raise ValueError(
                f"Image.alpha must be {self.pixels.shape[:2]} {self.pixels.dtype}, "
                f"got {self.alpha.shape} {self.alpha.dtype}"
            )

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def is_gray(self) -> bool:
        return self.pixels.shape[2] == 1


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """Whether `path` has an extension derestore reads and writes (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


# --------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    """Decode `path` into an upright `Image`; any problem raises `InputError` naming the file.

    Only regular files are read (a named pipe or device is refused, never waited on). Of a
    multi-frame file (multi-page TIFF, animated WebP or PNG) the first frame is decoded;
    `Image.frames` tells how many there are.
    """
    path = Path(path)
    data = _read_bytes(path)
    pil = _open(path, data)
    fmt = _READABLE_FORMATS.get(pil.format or "")
    if fmt is None:
        raise InputError(f"{path}: {pil.format} images are not supported; convert it to {_SUPPORTED_LIST}")
    width, height = pil.size
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            f"{path}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (decompression-bomb guard); raise max_pixels= if the image is genuine"
        )
    try:
        image = _decode_tiff(path, pil, data) if fmt == "TIFF" else _decode(pil, data, fmt, orientation=None)
    except InputError:
        raise
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, cv2.error...
        raise InputError(f"{path}: cannot decode {_DISPLAY_NAME[fmt]} image: {_one_line(exc)}") from exc
    # A camera's MPO carries previews after the picture, not frames of it.
    if pil.format != "MPO":
        image.frames = _frame_count(pil)
    return image


def _frame_count(pil: PILImage.Image) -> int:
    try:
        return max(1, int(getattr(pil, "n_frames", 1)))
    except Exception:  # a damaged later frame must not cost the first
        return 1


def _open(path: Path, data: bytes) -> PILImage.Image:
    """Pillow's lazy open: format, size and metadata from the header, no pixels yet."""
    try:
        try:
            return PILImage.open(io.BytesIO(data))
        except PILImage.DecompressionBombError:
            # Pillow's process-wide limit is the host's setting, not ours to change; derestore
            # applies its own per call (max_pixels), so a picture it allows is opened here.
            return _open_within_our_limit(data)
    except UnidentifiedImageError:
        if data[:4] in _TIFF_MAGIC:
            raise InputError(
                f"{path}: this TIFF layout is not supported (e.g. 16-bit gray+alpha, or unusual "
                "sample formats); save it as 8/16-bit RGB(A) or grayscale"
            ) from None
        raise InputError(
            f"{path}: not an image, or not in a format derestore reads ({_SUPPORTED_LIST})"
        ) from None
    except Exception as exc:  # Pillow raises many types for a broken header
        raise InputError(f"{path}: corrupt or truncated image header ({_one_line(exc)})") from exc


def _open_within_our_limit(data: bytes) -> PILImage.Image:
    """What `PIL.Image.open` does, through the registered format plugins, without its pixel-count guard."""
    PILImage.init()
    prefix = data[:16]
    for fmt in PILImage.ID:
        factory, accept = PILImage.OPEN[fmt]
        if accept is not None and not accept(prefix):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all
            continue
    raise UnidentifiedImageError("cannot identify image file")


def _decode_tiff(path: Path, pil: PILImage.Image, data: bytes) -> Image:
    """TIFF orientation is a tag that some decoder versions apply and others do not; setting
    it to 1 in the bytes before decoding makes it derestore's job alone, done like the rest."""
    orientation = pil.tag_v2.get(_ORIENTATION, 1)
    if orientation not in range(2, 9):
        return _decode(pil, data, "TIFF", orientation=1)
    upright = _with_orientation_1(data, 0)
    if upright is None:
        raise ValueError(f"cannot read its orientation tag ({orientation}); re-save it upright")
    return _decode(_open(path, upright), upright, "TIFF", orientation=orientation)


def _read_bytes(path: Path) -> bytes:
    # O_NONBLOCK: opening a named pipe must not wait for a writer; it changes nothing for regular files.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: {file_problem(path)}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an image file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or _one_line(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: {_kind(st.st_mode)}, not an image file")
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            data = fh.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or _one_line(exc)}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if not data:
        raise InputError(f"{path}: empty file (0 bytes)")
    return data


def _kind(mode: int) -> str:
    """What a non-regular file is, in a user's words."""
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    return "is not a regular file"


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as an image file (None: it is a regular file, or a link to one)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(path)})"
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or _one_line(exc)})"
    if stat.S_ISREG(st.st_mode):
        return None
    return _kind(st.st_mode)


def _decode(pil: PILImage.Image, data: bytes, fmt: str, orientation: int | None) -> Image:
    """`orientation` None: read it from the EXIF (after the pixels: a PNG's may follow them)."""
    icc = pil.info.get("icc_profile") or None
    if _is_16_bit(pil, data, fmt):
        pixels, alpha = _decode_16_bit(pil, data, fmt)
    else:
        pixels, alpha, icc = _decode_8_bit(pil, icc)
    if orientation is None:
        orientation = _orientation(pil)
    exif = _tiff_exif(pil) if fmt == "TIFF" else _kept_exif(pil.info.get("exif"))
    pixels = _orient(pixels, orientation)
    alpha = None if alpha is None else _orient(alpha, orientation)[:, :, 0]
    return Image(pixels=pixels, alpha=alpha, format=fmt, exif=exif, icc_profile=icc)


def _is_16_bit(pil: PILImage.Image, data: bytes, fmt: str) -> bool:
    if fmt == "PNG":
        return data[24] == 16  # IHDR bit depth: signature(8) + length(4) + type(4) + width(4) + height(4)
    if fmt == "TIFF":
        bits = pil.tag_v2.get(258, 1)
        deepest = max(bits) if isinstance(bits, tuple) else bits
        if deepest > 8 and deepest != 16:
            raise ValueError(f"{deepest}-bit samples are not supported; save it as 8- or 16-bit")
        return deepest == 16
    return False


def _decode_16_bit(pil: PILImage.Image, data: bytes, fmt: str) -> tuple[np.ndarray, np.ndarray | None]:
    if fmt == "PNG":
        gray = data[25] in (0, 4)  # IHDR colour type: 0 gray, 4 gray+alpha
    else:
        photometric = pil.tag_v2.get(262)
        if photometric not in (1, 2):
            raise ValueError(
                f"16-bit TIFF with photometric interpretation {photometric} (e.g. CMYK) is not "
                "supported; convert it to 16-bit RGB or grayscale"
            )
        gray = photometric == 1
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError("the 16-bit pixel data is corrupt or truncated")
    if decoded.dtype != np.uint16:
        raise ValueError(f"expected 16-bit unsigned samples, found {decoded.dtype}")
    if decoded.ndim == 2:
        decoded = decoded[:, :, None]
    if decoded.shape[:2] != (pil.size[1], pil.size[0]):
        raise ValueError(f"decoded size {decoded.shape[1]}x{decoded.shape[0]} differs from the header's")
    channels = decoded.shape[2]
    if channels in (1, 2):
        return decoded[:, :, :1], (decoded[:, :, 1] if channels == 2 else None)
    rgb = decoded[:, :, 2::-1]  # OpenCV gives BGR(A)
    pixels = rgb[:, :, :1] if gray else rgb
    return pixels, (decoded[:, :, 3] if channels == 4 else None)


def _decode_8_bit(
    pil: PILImage.Image, icc: bytes | None
) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    mode = pil.mode
    if mode == "CMYK":
        pil, icc = _cmyk_to_rgb(pil, icc), None
    elif mode == "P" or (mode in ("L", "RGB") and "transparency" in pil.info):
        # A transparent palette entry or colour key becomes a real alpha channel.
        has_key = "transparency" in pil.info
        target = {"P": "RGBA" if has_key else "RGB", "L": "LA", "RGB": "RGBA"}[mode]
        pil = pil.convert(target)
    elif mode in _CONVERTED_MODES:
        pil = pil.convert(_CONVERTED_MODES[mode])
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(f"colour mode {mode} is not supported; convert it to RGB or grayscale")
    array = np.asarray(pil)
    if array.ndim == 2:
        array = array[:, :, None]
    if pil.mode in ("LA", "RGBA"):
        return array[:, :, :-1], array[:, :, -1], icc
    return array, None, icc


def _cmyk_to_rgb(pil: PILImage.Image, icc: bytes | None) -> PILImage.Image:
    """Through the embedded profile when there is one (print CMYK is far from naive inversion)."""
    if icc:
        with contextlib.suppress(ImageCms.PyCMSError, OSError, ValueError):
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(pil, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    return pil.convert("RGB")


def _orientation(pil: PILImage.Image) -> int:
    try:
        # The base method on purpose: PNG's override decodes every pixel (8-bit)
        # to look for EXIF after them, wasted work on the 16-bit path.
        value = PILImage.Image.getexif(pil).get(_ORIENTATION, 1)
    except Exception:  # a corrupt EXIF block must not cost the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (H, W) or (H, W, C) stored pixels upright for EXIF orientation 1..8."""
    if array.ndim == 2:
        array = array[:, :, None]
    upright = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }[orientation](array)
    return np.array(upright, order="C")  # an own, writable, contiguous copy


def _kept_exif(raw: bytes | None) -> bytes | None:
    """The source's EXIF with orientation set to 1, patched in place so everything else stays byte-exact."""
    if not raw:
        return None
    exif = raw if raw.startswith(_EXIF_HEADER) else _EXIF_HEADER + raw
    # When the raw patch finds no orientation entry, Pillow rewrites the block;
    # nothing is kept rather than a block that would rotate the picture again.
    try:
        patched = _with_orientation_1(exif, len(_EXIF_HEADER))
        if patched is not None:
            return patched
        tags = PILImage.Exif()
        tags.load(exif)
        if not len(tags):  # unreadable: nothing worth carrying
            return None
        if _ORIENTATION in tags:
            tags[_ORIENTATION] = 1
        rewritten = tags.tobytes()
        return rewritten if _orientation_of(rewritten) in (None, 1) else None
    except Exception:
        return None


def _with_orientation_1(data: bytes, start: int) -> bytes | None:
    """Copy of `data` whose TIFF structure (at `start`: an EXIF block's or a TIFF file's) has
    IFD0 Orientation 1, or `data` itself when it has none; None when it cannot be patched."""
    order = {b"II": "<", b"MM": ">"}.get(data[start : start + 2])
    if order is None:
        return None
    try:
        (ifd0,) = struct.unpack_from(order + "I", data, start + 4)
        (count,) = struct.unpack_from(order + "H", data, start + ifd0)
        for entry in range(start + ifd0 + 2, start + ifd0 + 2 + 12 * count, 12):
            tag, kind, n = struct.unpack_from(order + "HHI", data, entry)
            if tag == _ORIENTATION:
                if kind != 3 or n != 1:  # not one SHORT stored inline
                    return None
                patched = bytearray(data)
                struct.pack_into(order + "H", patched, entry + 8, 1)
                return bytes(patched)
    except struct.error:
        return None
    return data


def _orientation_of(exif: bytes) -> int | None:
    tags = PILImage.Exif()
    tags.load(exif)
    return tags.get(_ORIENTATION)


# Descriptive tags of a TIFF's first IFD that are EXIF's too (the rest of that
# IFD describes the TIFF's own layout and must not travel).
_TIFF_DESCRIPTIVE_TAGS = (270, 271, 272, 305, 306, 315, 33432)


def _tiff_exif(pil: PILImage.Image) -> bytes | None:
    """A TIFF keeps EXIF-like tags in its own IFD; gather them into an EXIF block."""
    try:
        source = PILImage.Image.getexif(pil)
        kept = PILImage.Exif()
        for tag in _TIFF_DESCRIPTIVE_TAGS:
            if tag in source:
                kept[tag] = source[tag]
        for tag in (_EXIF_IFD, _GPS_IFD):
            sub = {k: v for k, v in source.get_ifd(tag).items() if not isinstance(v, dict)}
            if sub:
                kept[tag] = sub
        return kept.tobytes() if len(kept) else None
    except Exception:  # metadata is a courtesy: a broken tag must not cost the picture
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------- floats


def to_float(image: Image) -> np.ndarray:
    """(3, H, W) float32 in [0, 1] for a model: gray replicated to 3 channels, alpha left out."""
    chw = image.pixels.transpose(2, 0, 1)
    if image.is_gray:
        chw = np.broadcast_to(chw, (3, image.height, image.width))
    out = np.empty((3, image.height, image.width), np.float32)
    np.divide(chw, 255.0 if image.bit_depth == 8 else 65535.0, out=out, dtype=np.float32)
    return out


def from_float(restored: np.ndarray, like: Image) -> Image:
    """Back to `like`'s bit depth and channels (gray through BT.601 luma), keeping its alpha and metadata."""
    x = np.asarray(restored, dtype=np.float32)
    if x.shape != (3, like.height, like.width):
        raise ValueError(f"restored array must be (3, {like.height}, {like.width}), got {x.shape}")
    if like.is_gray:
        x = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        x = x[None]
    if like.bit_depth == 8:
        scale, dtype = 255.0, np.uint8
    else:
        scale, dtype = 65535.0, np.uint16
    x = x * np.float32(scale)
    # fmax/fmin rather than clip: they also send NaN to 0 (and +Inf to the top),
    # where a cast would make arbitrary integers of them.
    np.fmax(x, 0.0, out=x)
    np.fmin(x, scale, out=x)
    np.rint(x, out=x)
    pixels = x.transpose(1, 2, 0).astype(dtype, order="C")
    return Image(pixels=pixels, alpha=like.alpha, format=like.format, exif=like.exif, icc_profile=like.icc_profile)


# --------------------------------------------------------------------- writing

def write_image(path: str | os.PathLike[str], image: Image, *, quality: int = 95) -> list[str]:
    """Encode `image` to `path` (format from the extension) atomically; returns notes on what was lost.

    The output is either complete or absent (`atomic.write`). Failures raise `InputError` naming `path`.
    """
    path = Path(path)
    fmt = _FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"{path}: cannot write '{path.suffix}' files; use one of {', '.join(sorted(SUPPORTED_EXTENSIONS))}"
        )
    pixels, alpha, exif, icc, notes = _fit_to_format(image, fmt)
    try:
        notes += atomic.write(path, lambda fh: _ENCODERS[fmt](fh, pixels, alpha, exif, icc, quality))
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
        raise InputError(f"{path}: cannot write: {reason}") from exc
    return notes


def _fit_to_format(
    image: Image, fmt: str
) -> tuple[np.ndarray, np.ndarray | None, bytes | None, bytes | None, list[str]]:
    """Drop what `fmt` cannot hold, saying so."""
    pixels, alpha, exif, icc = image.pixels, image.alpha, image.exif, image.icc_profile
    name = _DISPLAY_NAME[fmt]
    notes: list[str] = []
    if alpha is not None and fmt in ("JPEG", "BMP"):
        alpha = None
        notes.append(f"alpha channel dropped: {name} has no transparency")
    if pixels.dtype == np.uint16 and fmt in ("JPEG", "WEBP", "BMP"):
        pixels = _to_8_bit(pixels)
        alpha = None if alpha is None else _to_8_bit(alpha)
        notes.append(f"16-bit reduced to 8-bit: {name} has no 16-bit")
    if pixels.shape[2] == 1 and fmt == "WEBP":
        pixels = np.repeat(pixels, 3, axis=2)
        notes.append("grayscale written as RGB: WebP has no grayscale")
    if fmt == "TIFF" and pixels.dtype == np.uint16 and pixels.shape[2] == 1 and alpha is not None:
        pixels = np.repeat(pixels, 3, axis=2)
        notes.append("16-bit gray+alpha written as RGBA: few TIFF readers (Pillow among them) open it")
    if fmt == "BMP" and (exif or icc):
        exif = icc = None
        notes.append("EXIF and ICC profile dropped: BMP cannot store them")
    if fmt == "JPEG" and exif and len(exif) > 65533:
        exif = None
        notes.append(f"EXIF dropped: {len(image.exif or b''):,} bytes exceed JPEG's 64 KiB segment")
    return pixels, alpha, exif, icc, notes


def _to_8_bit(samples: np.ndarray) -> np.ndarray:
    # Round to nearest: the exact inverse of the usual 8 -> 16 scaling (x * 257).
    return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _with_alpha(pixels: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    return pixels if alpha is None else np.concatenate([pixels, alpha[:, :, None]], axis=2)


def _save_with_pillow(
    fh: BinaryIO, fmt: str, pixels: np.ndarray, alpha: np.ndarray | None,
    exif: bytes | None, icc: bytes | None, quality: int,
) -> list[str]:
    samples = _with_alpha(pixels, alpha)
    pil = PILImage.fromarray(samples[:, :, 0] if samples.shape[2] == 1 else samples)
    options: dict[str, object] = {}
    if exif:
        options["exif"] = exif
    if icc:
        options["icc_profile"] = icc
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0)  # 4:4:4: restored detail is not chroma-halved
    elif fmt == "PNG":
        options.update(compress_type=zlib.Z_RLE)  # see _deflater: 5x faster, about as small
    elif fmt == "WEBP":
        # Lossless, and exact: colour under transparent pixels is kept. Effort 1/25
        # is within 2% of libwebp's default size at a quarter of its time.
        options.update(lossless=True, exact=True, method=1, quality=25)
    pil.save(fh, format=fmt, **options)
    return []


def _write_png(
    fh: BinaryIO, pixels: np.ndarray, alpha: np.ndarray | None,
    exif: bytes | None, icc: bytes | None, quality: int,
) -> list[str]:
    if pixels.dtype == np.uint8:
        return _save_with_pillow(fh, "PNG", pixels, alpha, exif, icc, quality)
    samples = _with_alpha(pixels, alpha)
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    fh.write(b"\x89PNG\r\n\x1a\n")
    _png_chunk(fh, b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
    if icc:
        _png_chunk(fh, b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc))
    if exif:
        _png_chunk(fh, b"eXIf", exif.removeprefix(_EXIF_HEADER))
    bytes_per_pixel = channels * 2
    row_bytes = width * bytes_per_pixel
    rows_per_block = max(1, 2**20 // row_bytes)
    compressor = _deflater()
    for top in range(0, height, rows_per_block):
        rows = samples[top : top + rows_per_block].astype(">u2").view(np.uint8).reshape(-1, row_bytes)
        filtered = np.empty((len(rows), 1 + row_bytes), np.uint8)
        filtered[:, 0] = 1  # filter type Sub: each byte minus the same byte of the pixel to its left
        filtered[:, 1:] = rows
        filtered[:, 1 + bytes_per_pixel :] -= rows[:, :-bytes_per_pixel]
        compressed = compressor.compress(filtered.tobytes())
        if compressed:
            _png_chunk(fh, b"IDAT", compressed)
    _png_chunk(fh, b"IDAT", compressor.flush())
    _png_chunk(fh, b"IEND", b"")
    return []


def _deflater() -> zlib._Compress:
    # Z_RLE after a prediction filter: as small as the default strategy on photos
    # (within a few %) at a quarter of its time, which matters on 12+ MP outputs.
    return zlib.compressobj(6, zlib.DEFLATED, 15, 8, zlib.Z_RLE)


def _png_chunk(fh: BinaryIO, kind: bytes, payload: bytes) -> None:
    fh.write(struct.pack(">I", len(payload)) + kind + payload)
    fh.write(struct.pack(">I", zlib.crc32(kind + payload)))


# First-IFD tags that describe a file's own layout (strips, tiles, sub-images,
# thumbnails): an EXIF block's values for them are never copied into a TIFF.
_TIFF_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317}
    | {322, 323, 324, 325, 330, 338, 339, 513, 514, 34675}
)


def _write_tiff(
    fh: BinaryIO, pixels: np.ndarray, alpha: np.ndarray | None,
    exif: bytes | None, icc: bytes | None, quality: int,
) -> list[str]:
    """Baseline TIFF, Adobe Deflate with horizontal differencing, 8 or 16 bits per sample."""
    samples = _with_alpha(pixels, alpha)
    height, width, channels = samples.shape
    little_endian = samples.astype(samples.dtype.newbyteorder("<"), copy=False)
    rows_per_strip = max(1, 2**18 // (width * channels * samples.itemsize))
    strips = []
    for top in range(0, height, rows_per_strip):
        strip = little_endian[top : top + rows_per_strip]
        differences = strip.copy()
        differences[:, 1:] -= strip[:, :-1]  # Predictor 2: each sample minus its left neighbour's
        compressor = _deflater()
        strips.append(compressor.compress(differences.tobytes()) + compressor.flush())
    notes: list[str] = []
    try:
        ifd = _tiff_ifd(samples, pixels.shape[2], rows_per_strip, strips, exif, icc).tobytes(8)
    except Exception as exc:  # an EXIF value Pillow cannot serialise into a TIFF
        ifd = _tiff_ifd(samples, pixels.shape[2], rows_per_strip, strips, None, icc).tobytes(8)
        notes.append(f"EXIF dropped: cannot be stored in TIFF ({_one_line(exc)})")
    fh.write(b"II*\x00" + struct.pack("<I", 8))
    fh.write(ifd)
    for strip in strips:
        fh.write(strip)
    return notes


def _tiff_ifd(
    samples: np.ndarray, colour_channels: int, rows_per_strip: int, strips: list[bytes],
    exif: bytes | None, icc: bytes | None,
) -> TiffImagePlugin.ImageFileDirectory_v2:
    height, width, channels = samples.shape
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[282], ifd[283], ifd[296] = 72.0, 72.0, 2  # 72 dpi unless the EXIF says otherwise
    if exif:
        tags = PILImage.Exif()
        tags.load(exif)
        for tag, value in tags.items():
            if tag in (_EXIF_IFD, _GPS_IFD):
                # Nested IFDs (interoperability) would carry stale offsets.
                sub = {k: v for k, v in tags.get_ifd(tag).items() if not isinstance(v, dict) and k != 0xA005}
                if sub:
                    ifd[tag] = sub
            elif tag not in _TIFF_LAYOUT_TAGS:
                ifd[tag] = value
    ifd[256], ifd[257] = width, height
    ifd[258] = (samples.itemsize * 8,) * channels
    ifd[259] = 8  # Adobe Deflate
    ifd[262] = 1 if colour_channels == 1 else 2  # BlackIsZero or RGB
    ifd[277] = channels
    ifd[278] = rows_per_strip
    ifd[284] = 1  # samples interleaved
    ifd[317] = 2  # horizontal differencing
    ifd[339] = (1,) * channels  # unsigned integers
    if channels > colour_channels:
        ifd[338] = 2  # the extra sample is unassociated alpha
    if icc:
        ifd[34675] = icc
        ifd.tagtype[34675] = TiffTags.UNDEFINED
    # Offsets are relative to the end of the IFD: Pillow adds that when writing it.
    ifd[273] = tuple(int(offset) for offset in np.cumsum([0] + [len(s) for s in strips[:-1]]))
    ifd[279] = tuple(len(s) for s in strips)
    ifd.tagtype[273] = ifd.tagtype[279] = TiffTags.LONG
    return ifd


_ENCODERS = {
    "PNG": _write_png,
    "TIFF": _write_tiff,
    "JPEG": lambda fh, *args: _save_with_pillow(fh, "JPEG", *args),
    "WEBP": lambda fh, *args: _save_with_pillow(fh, "WEBP", *args),
    "BMP": lambda fh, *args: _save_with_pillow(fh, "BMP", *args),
}
