"""derestore.imageio: formats, bit depths, alpha, orientation, metadata, errors, atomic writes.

The reader's inputs are made with Pillow or OpenCV, and the writer's outputs
are also decoded by them, so that a reader bug and a matching writer bug
cannot hide each other behind a passing round trip.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage
from PIL import ImageCms, ImageOps

from derestore import imageio
from derestore.errors import InputError, UsageError
from derestore.imageio import (
    Image,
    from_float,
    is_image_path,
    read_image,
    to_float,
    write_image,
)

H, W = 13, 17  # odd and unequal, so a swapped or transposed axis shows
RNG = np.random.default_rng(2024)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def random_pixels(dtype: type, channels: int, high: int | None = None) -> np.ndarray:
    top = high if high is not None else np.iinfo(dtype).max + 1
    return RNG.integers(0, top, (H, W, channels)).astype(dtype)


def exif_bytes(orientation: int = 1, make: str = "TestCam") -> bytes:
    tags = PILImage.Exif()
    tags[0x0112] = orientation
    tags[0x010F] = make
    tags.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal, in the Exif sub-IFD
    return tags.tobytes()


def exif_tags(raw: bytes | None) -> dict[str, object]:
    assert raw is not None
    tags = PILImage.Exif()
    tags.load(raw)
    return {"orientation": tags.get(0x0112, 1), "make": tags.get(0x010F), "taken": tags.get_ifd(0x8769).get(0x9003)}


def cv2_write(path: Path, rgb_or_gray: np.ndarray) -> None:
    """An input file written by OpenCV (16-bit capable), RGB(A) given, BGR(A) stored."""
    array = rgb_or_gray[:, :, 0] if rgb_or_gray.shape[2] == 1 else rgb_or_gray
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(path.suffix, array)
    assert ok
    path.write_bytes(encoded.tobytes())


def cv2_read(path: Path) -> np.ndarray:
    """(H, W, C) RGB(A) as stored in `path`, read by OpenCV."""
    array = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if array.ndim == 2:
        return array[:, :, None]
    code = cv2.COLOR_BGR2RGB if array.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
    return cv2.cvtColor(array, code)


# ----------------------------------------------------------------- extensions


def test_supported_extensions_and_is_image_path() -> None:
    assert imageio.SUPPORTED_EXTENSIONS == {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
    assert is_image_path("a/photo.JPG") and is_image_path(Path("x.TiFf")) and is_image_path("y.webp")
    assert not is_image_path("notes.txt") and not is_image_path("anim.gif") and not is_image_path("png")
    assert 100_000_000 < imageio.DEFAULT_MAX_PIXELS < 1_000_000_000


# ----------------------------------------------------------------- round trips

# kind -> (dtype, colour channels, alpha)
KINDS = {
    "rgb8": (np.uint8, 3, False),
    "rgb16": (np.uint16, 3, False),
    "gray8": (np.uint8, 1, False),
    "gray16": (np.uint16, 1, False),
    "rgba8": (np.uint8, 3, True),
    "rgba16": (np.uint16, 3, True),
    "graya8": (np.uint8, 1, True),
    "graya16": (np.uint16, 1, True),
}


def make_image(kind: str, fmt: str = "PNG", icc: bytes | None = None, exif: bytes | None = None) -> Image:
    dtype, channels, has_alpha = KINDS[kind]
    alpha = random_pixels(dtype, 1)[:, :, 0] if has_alpha else None
    return Image(pixels=random_pixels(dtype, channels), alpha=alpha, format=fmt, exif=exif, icc_profile=icc)


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_lossless_formats_round_trip_exactly(tmp_path: Path, kind: str, ext: str) -> None:
    image = make_image(kind)
    out = tmp_path / f"out{ext}"
    notes = write_image(out, image)
    back = read_image(out)
    assert back.format == ("PNG" if ext == ".png" else "TIFF")
    assert back.pixels.dtype == image.pixels.dtype and back.bit_depth == image.bit_depth
    if kind == "graya16" and ext != ".png":
        # Pillow cannot open 16-bit gray+alpha TIFF, so it is written as RGBA and says so.
        assert notes == ["16-bit gray+alpha written as RGBA: few TIFF readers (Pillow among them) open it"]
        np.testing.assert_array_equal(back.pixels, np.repeat(image.pixels, 3, axis=2))
    else:
        assert notes == []
        assert back.is_gray == image.is_gray
        np.testing.assert_array_equal(back.pixels, image.pixels)
    if image.alpha is None:
        assert back.alpha is None
    else:
        np.testing.assert_array_equal(back.alpha, image.alpha)
    # An independent decoder sees the same samples: Pillow for 8 bits, OpenCV for 16
    # (OpenCV premultiplies 8-bit TIFF alpha, Pillow reduces 16-bit colour to 8).
    if image.bit_depth == 8:
        with PILImage.open(out) as opened:
            stored = np.asarray(opened)
        stored = stored[:, :, None] if stored.ndim == 2 else stored
    else:
        stored = cv2_read(out)
    assert stored.dtype == image.pixels.dtype
    np.testing.assert_array_equal(stored[:, :, : back.pixels.shape[2]], back.pixels)


@pytest.mark.parametrize("kind", ["rgb8", "gray8"])
def test_bmp_round_trips_exactly(tmp_path: Path, kind: str) -> None:
    image = make_image(kind)
    out = tmp_path / "out.bmp"
    assert write_image(out, image) == []
    back = read_image(out)
    assert back.format == "BMP" and back.is_gray == image.is_gray
    np.testing.assert_array_equal(back.pixels, image.pixels)


@pytest.mark.parametrize("kind", ["rgb8", "rgba8"])
def test_webp_is_lossless_and_keeps_colour_under_transparency(tmp_path: Path, kind: str) -> None:
    image = make_image(kind)
    if image.alpha is not None:
        image.alpha[:4] = 0  # fully transparent rows: their RGB must survive too
    out = tmp_path / "out.webp"
    assert write_image(out, image) == []
    back = read_image(out)
    assert back.format == "WEBP"
    np.testing.assert_array_equal(back.pixels, image.pixels)
    if image.alpha is None:
        assert back.alpha is None
    else:
        np.testing.assert_array_equal(back.alpha, image.alpha)


def smooth_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, (x + y) / (width + height)], axis=2)
    return (rgb * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak**2 / mse)) if mse else float("inf")


def test_jpeg_is_quality_95_with_full_chroma(tmp_path: Path) -> None:
    pixels = smooth_rgb()
    pixels[::2, ::2, 0] = 255  # red detail at full resolution: 4:2:0 would smear it
    out = tmp_path / "out.jpg"
    assert write_image(out, Image(pixels=pixels, alpha=None, format="JPEG")) == []
    with PILImage.open(out) as stored:
        assert stored.layer[0][1:3] == stored.layer[1][1:3] == (1, 1)  # 4:4:4 sampling factors
    back = read_image(out)
    assert back.format == "JPEG" and back.pixels.shape == pixels.shape
    assert psnr(back.pixels, pixels, 255) > 38
    low = tmp_path / "low.jpg"
    write_image(low, Image(pixels=pixels, alpha=None, format="JPEG"), quality=30)
    assert low.stat().st_size < out.stat().st_size


def test_gray_jpeg_stays_gray(tmp_path: Path) -> None:
    pixels = smooth_rgb()[:, :, :1]
    out = tmp_path / "gray.jpg"
    write_image(out, Image(pixels=pixels, alpha=None, format="JPEG"))
    with PILImage.open(out) as stored:
        assert stored.mode == "L"
    back = read_image(out)
    assert back.is_gray and psnr(back.pixels, pixels, 255) > 40


@pytest.mark.parametrize(
    ("ext", "kind", "expected_notes"),
    [
        (".jpg", "rgba8", ["alpha channel dropped: JPEG has no transparency"]),
        (".bmp", "graya8", ["alpha channel dropped: BMP has no transparency"]),
        (".jpg", "rgb16", ["16-bit reduced to 8-bit: JPEG has no 16-bit"]),
        (".webp", "rgba16", ["16-bit reduced to 8-bit: WebP has no 16-bit"]),
        (".bmp", "gray16", ["16-bit reduced to 8-bit: BMP has no 16-bit"]),
        (".webp", "gray8", ["grayscale written as RGB: WebP has no grayscale"]),
    ],
)
def test_what_a_format_cannot_hold_is_dropped_with_a_note(
    tmp_path: Path, ext: str, kind: str, expected_notes: list[str]
) -> None:
    image = make_image(kind)
    out = tmp_path / f"out{ext}"
    assert write_image(out, image) == expected_notes
    back = read_image(out)
    assert back.bit_depth == 8
    assert (back.alpha is None) == (ext != ".webp" or image.alpha is None)
    if ext == ".jpg":
        return  # lossy: the pixel checks below are for the lossless formats
    expected = image.pixels
    if image.bit_depth == 16:
        expected = np.floor(expected / 257 + 0.5).astype(np.uint8)  # rounded, not truncated
    if ext == ".webp" and image.is_gray:
        expected = np.repeat(expected, 3, axis=2)
    np.testing.assert_array_equal(back.pixels, expected)
    if back.alpha is not None:
        np.testing.assert_array_equal(back.alpha, np.floor(image.alpha / 257 + 0.5).astype(np.uint8))


def test_16_bit_is_decided_by_the_file_type_not_by_pixel_values(tmp_path: Path) -> None:
    dark = random_pixels(np.uint16, 3, high=200)  # every sample would fit in 8 bits
    dark_gray = random_pixels(np.uint16, 1, high=3)
    for name, pixels in [("dark.png", dark), ("dark.tif", dark), ("dark_gray.png", dark_gray)]:
        cv2_write(tmp_path / name, pixels)
        back = read_image(tmp_path / name)
        assert back.bit_depth == 16 and back.pixels.dtype == np.uint16, name
        np.testing.assert_array_equal(back.pixels, pixels)
        write_image(tmp_path / f"again_{name}", back)
        assert cv2_read(tmp_path / f"again_{name}").dtype == np.uint16


@pytest.mark.parametrize("name", ["rgb16.png", "rgba16.png", "gray16.png", "rgb16.tif", "rgba16.tif", "gray16.tif"])
def test_16_bit_files_from_opencv_are_read_exactly(tmp_path: Path, name: str) -> None:
    channels = {"rgb": 3, "rgba": 4, "gray": 1}[name.split("16")[0]]
    stored = random_pixels(np.uint16, channels)
    cv2_write(tmp_path / name, stored)
    back = read_image(tmp_path / name)
    np.testing.assert_array_equal(back.pixels, stored[:, :, :3] if channels == 4 else stored)
    if channels == 4:
        np.testing.assert_array_equal(back.alpha, stored[:, :, 3])


def test_16_bit_png_written_here_matches_libpng_decoding_at_scale(tmp_path: Path) -> None:
    # Tall enough for several compression blocks, so several IDAT chunks.
    y, x = np.mgrid[0:700, 0:300]
    smooth = ((x * 97 + y * 31) % 65536).astype(np.uint16)
    pixels = np.stack([smooth, smooth[::-1], RNG.integers(0, 65536, smooth.shape).astype(np.uint16)], axis=2)
    out = tmp_path / "big16.png"
    write_image(out, Image(pixels=pixels, alpha=None, format="PNG"))
    np.testing.assert_array_equal(cv2_read(out), pixels)
    with PILImage.open(out) as stored:
        stored.verify()  # chunk CRCs and structure


# ------------------------------------------------------------- palette, CMYK, modes


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    source = PILImage.fromarray(smooth_rgb()).quantize(colors=16)
    source.save(tmp_path / "p.png")
    back = read_image(tmp_path / "p.png")
    assert back.pixels.shape[2] == 3 and back.alpha is None and back.bit_depth == 8
    np.testing.assert_array_equal(back.pixels, np.asarray(source.convert("RGB")))


def test_palette_with_transparency_becomes_rgba(tmp_path: Path) -> None:
    source = PILImage.fromarray(smooth_rgb()).quantize(colors=16)
    source.info["transparency"] = 3
    source.save(tmp_path / "pt.png", transparency=3)
    back = read_image(tmp_path / "pt.png")
    index = np.asarray(source)
    assert back.alpha is not None
    np.testing.assert_array_equal(back.alpha, np.where(index == 3, 0, 255))
    np.testing.assert_array_equal(back.pixels, np.asarray(source.convert("RGB")))


def test_colour_key_transparency_becomes_alpha(tmp_path: Path) -> None:
    gray = smooth_rgb()[:, :, 0]
    PILImage.fromarray(gray).save(tmp_path / "key.png", transparency=int(gray[5, 5]))
    back = read_image(tmp_path / "key.png")
    assert back.is_gray
    np.testing.assert_array_equal(back.pixels[:, :, 0], gray)
    np.testing.assert_array_equal(back.alpha, np.where(gray == gray[5, 5], 0, 255))


@pytest.mark.parametrize("ext", [".jpg", ".tif"])
def test_cmyk_becomes_rgb(tmp_path: Path, ext: str) -> None:
    cmyk = PILImage.fromarray(smooth_rgb()).convert("CMYK")
    # The JPEG carries a profile that does not fit CMYK: the conversion falls back, and the
    # profile, which describes the source's colours and not the RGB result's, is dropped.
    options = {"quality": 98, "icc_profile": SRGB_ICC} if ext == ".jpg" else {}
    cmyk.save(tmp_path / f"cmyk{ext}", **options)
    back = read_image(tmp_path / f"cmyk{ext}")
    assert back.pixels.shape == (48, 64, 3) and back.alpha is None and back.icc_profile is None
    with PILImage.open(tmp_path / f"cmyk{ext}") as stored:
        assert stored.mode == "CMYK"
        expected = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(back.pixels, expected)
    assert psnr(back.pixels, smooth_rgb(), 255) > 30  # and it looks like the picture


def test_one_bit_png_becomes_gray(tmp_path: Path) -> None:
    bits = smooth_rgb()[:, :, 0] > 128
    PILImage.fromarray(bits).save(tmp_path / "bits.png")
    back = read_image(tmp_path / "bits.png")
    assert back.is_gray and back.bit_depth == 8
    np.testing.assert_array_equal(back.pixels[:, :, 0], np.where(bits, 255, 0))


def test_gray_alpha_8_bit_png_from_pillow(tmp_path: Path) -> None:
    la = random_pixels(np.uint8, 2)
    PILImage.fromarray(la).save(tmp_path / "la.png")
    back = read_image(tmp_path / "la.png")
    assert back.is_gray
    np.testing.assert_array_equal(back.pixels[:, :, 0], la[:, :, 0])
    np.testing.assert_array_equal(back.alpha, la[:, :, 1])


# --------------------------------------------------------------- orientation


def upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for `stored` pixels with this EXIF orientation (Pillow's reference)."""
    with_tag = PILImage.fromarray(stored)
    exif = with_tag.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    with_tag.save(buffer, "PNG", exif=exif)
    return np.asarray(ImageOps.exif_transpose(PILImage.open(buffer)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_reset(tmp_path: Path, orientation: int) -> None:
    stored = random_pixels(np.uint8, 3)
    PILImage.fromarray(stored).save(tmp_path / "o.png", exif=exif_bytes(orientation))
    back = read_image(tmp_path / "o.png")
    np.testing.assert_array_equal(back.pixels, upright(stored, orientation))
    assert back.pixels.shape[:2] == ((W, H) if orientation >= 5 else (H, W))
    assert exif_tags(back.exif) == {"orientation": 1, "make": "TestCam", "taken": "2024:05:06 07:08:09"}


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_on_jpeg(tmp_path: Path, orientation: int) -> None:
    stored = smooth_rgb()
    PILImage.fromarray(stored).save(tmp_path / "o.jpg", quality=98, exif=exif_bytes(orientation))
    back = read_image(tmp_path / "o.jpg")
    assert psnr(back.pixels, upright(stored, orientation), 255) > 35
    assert exif_tags(back.exif)["orientation"] == 1
    # Saved again, no viewer turns it a second time.
    write_image(tmp_path / "again.jpg", back)
    with PILImage.open(tmp_path / "again.jpg") as again:
        assert again.getexif()[0x0112] == 1 and again.size == (back.width, back.height)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_on_16_bit_png_and_rgba_alpha(tmp_path: Path, orientation: int) -> None:
    image = make_image("rgba16", exif=exif_bytes(orientation))
    write_image(tmp_path / "o16.png", image)  # write_image stores the EXIF as given
    back = read_image(tmp_path / "o16.png")
    k = {3: 2, 6: -1, 8: 1}[orientation]
    np.testing.assert_array_equal(back.pixels, np.rot90(image.pixels, k))
    np.testing.assert_array_equal(back.alpha, np.rot90(image.alpha, k))
    assert exif_tags(back.exif)["orientation"] == 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_tag_is_applied_once(tmp_path: Path, orientation: int) -> None:
    stored8 = random_pixels(np.uint8, 3)
    PILImage.fromarray(stored8).save(tmp_path / "o8.tif", exif=exif_bytes(orientation))
    with PILImage.open(tmp_path / "o8.tif") as raw:
        assert raw.tag_v2[0x0112] == orientation
    np.testing.assert_array_equal(read_image(tmp_path / "o8.tif").pixels, upright(stored8, orientation))
    stored16 = random_pixels(np.uint16, 1)
    write_image(tmp_path / "o16.tif", Image(pixels=stored16, alpha=None, format="TIFF", exif=exif_bytes(orientation)))
    back = read_image(tmp_path / "o16.tif")
    k = {3: 2, 6: -1, 8: 1}[orientation]
    np.testing.assert_array_equal(back.pixels, np.rot90(stored16, k))


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif"])
@pytest.mark.parametrize("kind", ["rgb8", "rgb16"])
def test_exif_and_icc_are_kept(tmp_path: Path, ext: str, kind: str) -> None:
    image = make_image(kind, icc=SRGB_ICC, exif=exif_bytes(1, make="KeepMe"))
    out = tmp_path / f"meta{ext}"
    write_image(out, image)
    with PILImage.open(out) as stored:  # what other programs see
        assert stored.info.get("icc_profile") == SRGB_ICC
        assert stored.getexif().get(0x010F) == "KeepMe"
    back = read_image(out)
    assert back.icc_profile == SRGB_ICC
    assert exif_tags(back.exif) == {"orientation": 1, "make": "KeepMe", "taken": "2024:05:06 07:08:09"}


def test_exif_travels_from_tiff_to_jpeg(tmp_path: Path) -> None:
    PILImage.fromarray(random_pixels(np.uint8, 3)).save(tmp_path / "cam.tif", exif=exif_bytes(1, make="TiffCam"))
    back = read_image(tmp_path / "cam.tif")
    assert exif_tags(back.exif)["make"] == "TiffCam"
    write_image(tmp_path / "cam.jpg", back)
    assert exif_tags(read_image(tmp_path / "cam.jpg").exif)["taken"] == "2024:05:06 07:08:09"


def test_bmp_drops_metadata_with_a_note(tmp_path: Path) -> None:
    notes = write_image(tmp_path / "m.bmp", make_image("rgb8", icc=SRGB_ICC, exif=exif_bytes()))
    assert notes == ["EXIF and ICC profile dropped: BMP cannot store them"]
    back = read_image(tmp_path / "m.bmp")
    assert back.exif is None and back.icc_profile is None


def test_raw_exif_is_kept_byte_for_byte_except_orientation(tmp_path: Path) -> None:
    raw = exif_bytes(6)
    PILImage.fromarray(random_pixels(np.uint8, 3)).save(tmp_path / "r.png", exif=raw)
    kept = read_image(tmp_path / "r.png").exif
    assert kept is not None and len(kept) == len(raw)
    assert sum(a != b for a, b in zip(kept, raw)) == 1  # the orientation value's one byte


def big_endian_exif(orientation: int) -> bytes:
    """A minimal Motorola-order EXIF block (Pillow writes Intel order): Make, then Orientation."""
    make = b"MotoCam\0"
    entries = struct.pack(">HHII", 0x010F, 2, len(make), 8 + 2 + 2 * 12 + 4)
    entries += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + b"\0" * 4 + make


def test_big_endian_exif_orientation(tmp_path: Path) -> None:
    stored = random_pixels(np.uint8, 3)
    PILImage.fromarray(stored).save(tmp_path / "mm.png", exif=big_endian_exif(8))
    back = read_image(tmp_path / "mm.png")
    np.testing.assert_array_equal(back.pixels, np.rot90(stored, 1))
    tags = PILImage.Exif()
    tags.load(back.exif)
    assert tags[0x0112] == 1 and tags[0x010F] == "MotoCam"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_costs_the_metadata_not_the_picture(tmp_path: Path) -> None:
    stored = random_pixels(np.uint8, 3)
    PILImage.fromarray(stored).save(tmp_path / "junk.png", exif=b"Exif\0\0II*\0\xff\xff\xff\x7f garbage")
    back = read_image(tmp_path / "junk.png")
    np.testing.assert_array_equal(back.pixels, stored)
    assert back.exif is None
    assert write_image(tmp_path / "junk_out.jpg", back) == []


def test_exif_too_big_for_jpeg_is_dropped_with_a_note(tmp_path: Path) -> None:
    tags = PILImage.Exif()
    tags[0x010F] = "BigCam"
    tags.get_ifd(0x8769)[0x927C] = b"\1" * 70_000  # a camera maker note
    image = make_image("rgb8", exif=tags.tobytes())
    notes = write_image(tmp_path / "big.jpg", image)
    assert len(notes) == 1 and notes[0].startswith("EXIF dropped:") and "64 KiB" in notes[0]
    assert read_image(tmp_path / "big.jpg").exif is None
    assert write_image(tmp_path / "big.png", image) == []
    assert exif_tags(read_image(tmp_path / "big.png").exif)["make"] == "BigCam"


# ------------------------------------------------------------ non-ASCII names


@pytest.mark.parametrize("kind", ["rgb8", "rgb16", "graya8"])
@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg"])
def test_non_ascii_file_names(tmp_path: Path, kind: str, ext: str) -> None:
    folder = tmp_path / "déjà vu 雨"
    folder.mkdir()
    out = folder / f"фото_雪 ☔{ext}"
    image = make_image(kind)
    write_image(out, image)
    back = read_image(out)
    assert back.pixels.shape[:2] == (H, W)
    if ext != ".jpg":
        np.testing.assert_array_equal(back.pixels, image.pixels)
    assert [p.name for p in folder.iterdir()] == [out.name]


# ------------------------------------------------------------------ errors


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims `width` x `height`: a decompression bomb's header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def expect_input_error(path: Path, *words: str, **kwargs: object) -> str:
    with pytest.raises(InputError) as caught:
        read_image(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_missing_file(tmp_path: Path) -> None:
    expect_input_error(tmp_path / "nope.png", "does not exist")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    expect_input_error(tmp_path / "dir.png", "is a folder, not an image file")


def test_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    expect_input_error(fifo, "is a named pipe (FIFO), not an image file")
    assert time.monotonic() - started < 1.0


def test_broken_symlink_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "deleted.png")
    expect_input_error(link, f"is a broken symbolic link (to {tmp_path / 'deleted.png'})")


def test_multi_page_tiff_decodes_the_first_page_and_counts_them(tmp_path: Path) -> None:
    pages = [PILImage.fromarray(np.full((H, W, 3), v, np.uint8)) for v in (10, 120, 240)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    image = read_image(tmp_path / "pages.tif")
    assert image.frames == 3 and (image.pixels == 10).all()


def test_animated_webp_decodes_the_first_frame_and_counts_them(tmp_path: Path) -> None:
    frames = [PILImage.fromarray(np.full((H, W, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    image = read_image(tmp_path / "anim.webp")
    assert image.frames == 2 and (image.pixels == 0).all()
    frames[0].save(tmp_path / "one.webp", lossless=True)
    assert read_image(tmp_path / "one.webp").frames == 1


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file whatever its mode, so the denial is simulated.
    path = tmp_path / "locked.png"
    path.write_bytes(png_with_header(4, 4))

    real_open = os.open

    def denied(file: object, flags: int, *args: object) -> int:
        if Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    expect_input_error(path, "cannot read: Permission denied")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    expect_input_error(tmp_path / "empty.jpg", "empty file (0 bytes)")


@pytest.mark.parametrize(
    ("name", "depth"), [("a.png", 8), ("a.png", 16), ("a.jpg", 8), ("a.tif", 8), ("a.tif", 16), ("a.webp", 8)]
)
def test_truncated_file(tmp_path: Path, name: str, depth: int) -> None:
    pixels = np.tile(smooth_rgb(), (4, 4, 1))
    if depth == 16:
        pixels = pixels.astype(np.uint16) * 257
    whole = tmp_path / name
    write_image(whole, Image(pixels=pixels, alpha=None, format="PNG"))
    data = whole.read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: len(data) // 2])
    message = expect_input_error(cut)
    assert any(word in message for word in ("truncated", "corrupt", "cannot decode")), message


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("these are not pixels\n" * 20)
    expect_input_error(tmp_path / "notes.png", "not an image")


def test_unsupported_format(tmp_path: Path) -> None:
    PILImage.fromarray(smooth_rgb()).save(tmp_path / "anim.gif")
    expect_input_error(tmp_path / "anim.gif", "GIF images are not supported")


def test_tiff_layout_pillow_cannot_open_is_named(tmp_path: Path) -> None:
    # 16-bit gray+alpha, as GIMP writes it; built with the module's TIFF encoder,
    # which write_image itself never uses for this layout.
    buffer = io.BytesIO()
    gray = random_pixels(np.uint16, 1)
    imageio._write_tiff(buffer, gray, gray[:, :, 0], None, None, 95)
    (tmp_path / "la16.tif").write_bytes(buffer.getvalue())
    expect_input_error(tmp_path / "la16.tif", "TIFF layout is not supported", "16-bit gray+alpha")


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header(100_000, 100_000))
    assert bomb.stat().st_size < 200
    expect_input_error(bomb, "100000x100000 = 10,000,000,000 pixels", f"limit of {imageio.DEFAULT_MAX_PIXELS:,}")
    # The limit is the caller's: a small one refuses a small image too...
    PILImage.fromarray(smooth_rgb()).save(tmp_path / "small.png")
    expect_input_error(tmp_path / "small.png", "64x48 = 3,072 pixels", "limit of 3,000", max_pixels=3000)
    # ...and a raised one lets through what Pillow's own guard (~179 MP) would refuse.
    big = tmp_path / "big.png"
    big.write_bytes(png_with_header(20_000, 10_000))
    message = expect_input_error(big, max_pixels=None)
    assert "cannot decode" in message and "exceeds" not in message


# --------------------------------------------------------------- atomic writes


def test_successful_write_leaves_only_the_output(tmp_path: Path) -> None:
    for ext in (".png", ".tif", ".jpg"):
        write_image(tmp_path / f"a{ext}", make_image("rgb16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.png", "a.tif"]


@pytest.mark.parametrize("ext", [".png", ".tif", ".jpg"])
def test_failed_write_leaves_nothing_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str
) -> None:
    out = tmp_path / f"out{ext}"
    out.write_bytes(b"previous complete output")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(InputError) as caught:
        write_image(out, make_image("rgb16"))
    assert str(caught.value) == f"{out}: cannot write: No space left on device"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert out.read_bytes() == b"previous complete output"


def test_failure_inside_the_encoder_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("encoder exploded")

    monkeypatch.setattr(PILImage.Image, "save", broken)
    with pytest.raises(InputError, match="out.jpg: cannot write: encoder exploded"):
        write_image(tmp_path / "out.jpg", make_image("rgb8"))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing_and_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio, "_deflater", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "out.tif", make_image("rgb8"))
    assert list(tmp_path.iterdir()) == []


def test_write_into_a_missing_folder_names_the_output(tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "x.png"
    with pytest.raises(InputError, match=r"x\.png: cannot write: No such file or directory"):
        write_image(out, make_image("rgb8"))


def test_unknown_output_extension_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot write '\.gif' files"):
        write_image(tmp_path / "x.gif", make_image("rgb8"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ floats


@pytest.mark.parametrize("kind", list(KINDS))
def test_to_float_and_back_is_exact(kind: str) -> None:
    image = make_image(kind, icc=SRGB_ICC, exif=exif_bytes())
    x = to_float(image)
    assert x.shape == (3, H, W) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    back = from_float(x, image)
    assert back.pixels.dtype == image.pixels.dtype and back.pixels.shape == image.pixels.shape
    np.testing.assert_array_equal(back.pixels, image.pixels)
    assert back.alpha is image.alpha and back.exif == image.exif and back.icc_profile == SRGB_ICC
    assert back.format == image.format


def test_to_float_scales_by_the_type_and_replicates_gray() -> None:
    gray16 = Image(pixels=np.full((2, 3, 1), 65535, np.uint16), alpha=None, format="PNG")
    np.testing.assert_array_equal(to_float(gray16), np.ones((3, 2, 3), np.float32))
    dark16 = Image(pixels=np.full((2, 3, 3), 255, np.uint16), alpha=None, format="PNG")
    assert dark16.bit_depth == 16
    np.testing.assert_allclose(to_float(dark16), 255 / 65535)
    rgb8 = Image(pixels=np.array([[[0, 51, 255]]], np.uint8), alpha=None, format="PNG")
    np.testing.assert_allclose(to_float(rgb8)[:, 0, 0], [0.0, 0.2, 1.0])


def test_from_float_clips_rounds_and_makes_luma() -> None:
    like = Image(pixels=np.zeros((1, 4, 3), np.uint8), alpha=None, format="PNG")
    x = np.array([[[-0.5, 0.5, 1.5, np.nan]]] * 3, np.float32)
    np.testing.assert_array_equal(from_float(x, like).pixels[0, :, 0], [0, 128, 255, 0])
    like16 = Image(pixels=np.zeros((1, 1, 3), np.uint16), alpha=None, format="PNG")
    assert from_float(np.full((3, 1, 1), 0.5, np.float32), like16).pixels[0, 0, 0] == 32768
    gray = Image(pixels=np.zeros((1, 3, 1), np.uint8), alpha=None, format="PNG")
    primaries = np.eye(3, dtype=np.float32)[:, None, :]  # pixel i is pure channel i
    luma = from_float(primaries, gray).pixels
    assert luma.shape == (1, 3, 1)
    np.testing.assert_array_equal(luma[0, :, 0], [76, 150, 29])  # BT.601: 0.299, 0.587, 0.114
    with pytest.raises(ValueError, match="must be"):
        from_float(np.zeros((3, 2, 2), np.float32), gray)


def test_image_validates_its_arrays() -> None:
    with pytest.raises(ValueError):
        Image(pixels=np.zeros((2, 2, 4), np.uint8), alpha=None, format="PNG")
    with pytest.raises(ValueError):
        Image(pixels=np.zeros((2, 2, 3), np.float32), alpha=None, format="PNG")
    with pytest.raises(ValueError):
        Image(pixels=np.zeros((2, 2, 3), np.uint8), alpha=np.zeros((2, 2), np.uint16), format="PNG")
    image = Image(pixels=np.zeros((5, 7, 1), np.uint16), alpha=None, format="TIFF")
    assert (image.height, image.width, image.bit_depth, image.is_gray) == (5, 7, 16, True)
