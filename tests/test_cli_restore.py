"""The task commands as a user runs them: files in, files out, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from derestore.cli import app

from .conftest import dncnn_state, save_checkpoint, smooth_image, to_uint

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def read_any(path: Path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "dncnn.pth", dncnn_state(nb=5), "params")


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    """RGB, RGBA, 16-bit RGB, grayscale and an EXIF-rotated JPEG."""
    src = tmp_path / "in"
    src.mkdir()
    rgb = to_uint(smooth_image(40, 56, seed=1))
    PILImage.fromarray(rgb).save(src / "rgb.png")
    alpha = np.tile(np.linspace(0, 255, 56).astype(np.uint8), (40, 1))
    PILImage.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src / "rgba.png")
    rgb16 = to_uint(smooth_image(40, 56, seed=2), 16)
    cv2.imwrite(str(src / "deep.png"), rgb16[..., ::-1])
    gray = to_uint(smooth_image(33, 47, seed=3, channels=1))[..., 0]
    PILImage.fromarray(gray, "L").save(src / "gray.png")
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    PILImage.fromarray(to_uint(smooth_image(30, 50, seed=4))).save(src / "rotated.jpg", exif=exif, quality=95)
    return src


def test_mixed_folder(tmp_path, ckpt, mixed_dir):
    out = tmp_path / "out"
    res = invoke("derain", mixed_dir, "-o", out, "--weights", ckpt, "--tile", "0")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["deep.png", "derestore-run.json", "gray.png", "rgb.png", "rgba.png", "rotated.jpg"]

    rgba_in, rgba_out = read_any(mixed_dir / "rgba.png"), read_any(out / "rgba.png")
    assert rgba_out.shape == (40, 56, 4)
    assert np.array_equal(rgba_out[..., 3], rgba_in[..., 3])  # alpha carried through unchanged
    assert not np.array_equal(rgba_out[..., :3], rgba_in[..., :3])  # colour went through the model

    deep = read_any(out / "deep.png")
    assert deep.dtype == np.uint16 and deep.shape == (40, 56, 3)
    assert len(np.unique(deep)) > 256  # not a round trip through 8 bits

    gray = read_any(out / "gray.png")
    assert gray.ndim == 2 and gray.shape == (33, 47)

    with PILImage.open(out / "rotated.jpg") as im:
        assert im.size == (30, 50)  # orientation applied: 50 rows × 30 columns
        assert im.getexif().get(0x0112, 1) == 1


def test_tiled_equals_untiled_through_cli(tmp_path, ckpt):
    src = tmp_path / "big.png"
    PILImage.fromarray(to_uint(smooth_image(120, 90, seed=7))).save(src)
    whole = invoke("derain", src, "-o", tmp_path / "whole.png", "--weights", ckpt, "--tile", "0")
    tiled = invoke("derain", src, "-o", tmp_path / "tiled.png", "--weights", ckpt, "--tile", "40",
                   "--overlap", "12", "--batch-size", "2")
    assert whole.exit_code == 0 and tiled.exit_code == 0, whole.output + tiled.output
    a = read_any(tmp_path / "whole.png").astype(int)
    b = read_any(tmp_path / "tiled.png").astype(int)
    assert a.shape == b.shape == (120, 90, 3)
    assert np.abs(a - b).max() <= 1  # equal up to float rounding at .5 boundaries
    assert (a != b).mean() < 0.001


def test_ext_suffix_and_json(tmp_path, ckpt, mixed_dir):
    out = tmp_path / "o"
    res = invoke("denoise", mixed_dir / "rgb.png", mixed_dir / "gray.png", "-o", out, "--weights", ckpt,
                 "--ext", "webp", "--suffix", "_clean", "--json")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in lines[:-1]] == ["ok", "ok"]
    assert {Path(r["output"]).name for r in lines[:-1]} == {"rgb_clean.webp", "gray_clean.webp"}
    assert lines[0]["width"] == 47 and lines[0]["height"] == 33  # gray.png sorts first
    assert len(lines[0]["sha256"]) == 64 and lines[0]["model"] == "dncnn"
    assert lines[-1]["summary"]["ok"] == 2 and lines[-1]["summary"]["failed"] == 0
    assert (out / "rgb_clean.webp").is_file()


def test_glob_and_recursive(tmp_path, ckpt, mixed_dir):
    nested = mixed_dir / "sub"
    nested.mkdir()
    PILImage.fromarray(to_uint(smooth_image(20, 20, seed=9))).save(nested / "deep_inside.png")
    flat = invoke("derain", mixed_dir, "-o", tmp_path / "flat", "--weights", ckpt)
    assert flat.exit_code == 0
    assert not (tmp_path / "flat" / "deep_inside.png").exists()
    rec = invoke("derain", mixed_dir, "-r", "-o", tmp_path / "rec", "--weights", ckpt)
    assert rec.exit_code == 0 and (tmp_path / "rec" / "deep_inside.png").is_file()
    globbed = invoke("derain", str(mixed_dir / "r*.png"), "-o", tmp_path / "g", "--weights", ckpt)
    assert globbed.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "g").glob("*.png")) == ["rgb.png", "rgba.png"]


def test_bad_file_is_skipped_and_exit_1(tmp_path, ckpt, mixed_dir):
    (mixed_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    res = invoke("derain", mixed_dir, "-o", out, "--weights", ckpt)
    assert res.exit_code == 1
    assert "broken.png" in res.stderr
    assert len(list(out.glob("*.*g"))) == 5
    assert not (out / "broken.png").exists()


@pytest.mark.parametrize("args,code,needle", [
    (["derain", "{missing}", "--weights", "{ckpt}"], 2, "does not exist"),
    (["derain", "{img}", "-m", "no-such-model"], 2, "unknown model"),
    (["derain", "{img}", "--weights", "{ckpt}", "--tile", "-5"], 2, "--tile"),
    (["derain", "{img}", "--weights", "{ckpt}", "--device", "tpu"], 2, "--device"),
    (["derain", "{img}", "--weights", "{ckpt}", "--precision", "fp8"], 2, "--precision"),
    (["derain", "{img}", "--weights", "{ckpt}", "--tiling", "magic"], 2, "--tiling"),
    (["derain", "{img}", "--weights", "{ckpt}", "--ext", "gif"], 2, "--ext"),
    (["derain", "{img}", "--weights", "{ckpt}", "--batch-size", "0"], 2, "--batch-size"),
    (["derain", "{img}", "--weights", "{ckpt}", "-m", "restormer-derain"], 2, "not both"),
    (["derain", "{img}", "--weights", "{nofile}"], 2, "no such file"),
    (["derain", "{img}", "--weights", "{junk}"], 3, "junk.pth"),
    (["derain", "{img}", "-o", "{img}", "--weights", "{ckpt}"], 2, "overwrite"),
])
def test_errors_exit_codes(tmp_path, ckpt, args, code, needle):
    img = tmp_path / "x.png"
    PILImage.fromarray(to_uint(smooth_image(16, 16))).save(img)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    subs = {"{missing}": str(tmp_path / "missing.png"), "{ckpt}": str(ckpt), "{img}": str(img),
            "{nofile}": str(tmp_path / "nofile.pth"), "{junk}": str(junk)}
    res = invoke(*[subs.get(a, a) for a in args])
    assert res.exit_code == code, res.output
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_same_stem_collision_is_refused_before_work(tmp_path, ckpt):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d in (a, b):
        PILImage.fromarray(to_uint(smooth_image(16, 16))).save(d / "same.png")
    res = invoke("derain", a, b, "-o", tmp_path / "out", "--weights", ckpt)
    assert res.exit_code == 2 and "both be written" in res.stderr
    assert not (tmp_path / "out").exists()


def test_user_registry_and_local_source(tmp_path, ckpt):
    reg = tmp_path / "mine.toml"
    reg.write_text(
        f'[models.my-dncnn]\ntask = "derain"\narch = "DnCNN"\nsources = ["{ckpt.as_uri()}"]\ntile = 24\noverlap = 8\n'
        '[tasks.derain]\ndefault = "my-dncnn"\n'
    )
    img = tmp_path / "x.png"
    PILImage.fromarray(to_uint(smooth_image(50, 50))).save(img)
    env = {"DERESTORE_REGISTRY": str(reg), "DERESTORE_HOME": str(tmp_path / "cache")}
    res = invoke("derain", img, "-o", tmp_path / "out", "--json", env=env)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout.splitlines()[0])
    assert record["model"] == "my-dncnn" and record["status"] == "ok"


def test_version_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "derestore", "--version"], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith("derestore ")


def test_help_lists_tasks_and_explains_options():
    res = invoke("--help")
    assert res.exit_code == 0
    for task in ("derain", "desnow", "dehaze", "deblur", "denoise"):
        assert task in res.stdout
    sub = invoke("derain", "--help")
    for opt in ("--tile", "--overlap", "--batch-size", "--device", "--precision", "--weights", "--suffix", "--ext",
                "Example"):
        assert opt in sub.stdout


def test_gt_scores_each_output_on_the_fly(tmp_path, ckpt, mixed_dir):
    from derestore.metrics import score

    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("rgb", "deep"):
        (gt / f"{name}.png").write_bytes((mixed_dir / f"{name}.png").read_bytes())
    out = tmp_path / "out"
    res = invoke("derain", mixed_dir / "rgb.png", mixed_dir / "deep.png", mixed_dir / "gray.png", "-o", out,
                 "--weights", ckpt, "--gt", gt, "--protocol", "rgb", "--json")
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.stdout.splitlines()]
    by_name = {Path(r["input"]).name: r for r in records[:-1]}
    expected = score(read_any(gt / "rgb.png")[..., ::-1], read_any(out / "rgb.png")[..., ::-1], protocol="rgb")
    assert by_name["rgb.png"]["psnr"] == pytest.approx(expected.psnr, abs=1e-9)
    assert by_name["rgb.png"]["ssim"] == pytest.approx(expected.ssim, abs=1e-9)
    assert by_name["gray.png"]["gt"] is None
    summary = records[-1]["summary"]["metrics"]
    assert summary["count"] == 2 and summary["protocol"] == "rgb"
    assert summary["mean"]["psnr"] == pytest.approx((by_name["rgb.png"]["psnr"] + by_name["deep.png"]["psnr"]) / 2)
    assert "no ground truth" in res.stderr
    bad = invoke("derain", mixed_dir / "rgb.png", "-o", out, "--weights", ckpt, "--gt", tmp_path / "nope")
    assert bad.exit_code == 2


@pytest.mark.parametrize("args, words", [
    (["derain", "x.png", "--batch-size", "abc"], "--batch-size"),
    (["derain", "x.png", "--bogus"], "--bogus"),
    (["eval", "--gt", "a"], "--pred"),
])
def test_malformed_command_lines_get_one_line_and_exit_2(args, words):
    proc = subprocess.run([sys.executable, "-m", "derestore", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    assert proc.stdout == ""
