"""Video clips through the task commands: frames, timestamps, rotation and audio kept; resumable."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

from derestore import video
from derestore.cli import app

from .conftest import cli_command, dncnn_state, save_checkpoint, write_images

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "dncnn.pth", dncnn_state(nb=4), "params")


def make_clip(path: Path, *, codec: str = "libx264", audio: str | None = "aac", size: tuple[int, int] = (96, 64),
              frames: int = 24, rotation: int = 0, vfr: bool = False, muxer: str | None = None) -> Path:
    """A small test clip: moving colour fields, optional rotation metadata, variable frame rate, audio."""
    width, height = size
    with av.open(str(path), "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if codec == "libx264" and (width % 2 or height % 2) else "yuv420p"
        stream.codec_context.time_base = Fraction(1, 50)  # ticks of 20 ms: 25 fps with some frames held twice
        if rotation:
            stream.set_display_rotation(rotation)
        sound = out.add_stream(audio, rate=48000) if audio else None
        y, x = np.mgrid[0:height, 0:width]
        t = 0
        for i in range(frames):
            rgb = np.stack([(x * 3 + i * 5) % 256, (y * 4 + 60) % 256, np.full_like(x, 40 + i * 4)], -1)
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 50)
            t += 4 if vfr and i % 3 == 0 else 2
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            chunk = 960 if audio == "libopus" else 1024
            for k in range(0, 960 * t, chunk):
                samples = (0.2 * np.sin(np.arange(k, k + chunk) / 7.0)).astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 48000, k, Fraction(1, 48000)
                out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
    return path


def decoded(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def packet_bytes(path: Path, kind: str) -> bytes:
    with av.open(str(path)) as container:
        return b"".join(bytes(p) for p in container.demux(**{kind: 0}) if p.size)


@pytest.mark.parametrize(("name", "codec", "audio", "size", "rotation", "vfr"), [
    ("clip.mp4", "libx264", "aac", (96, 64), 90, True),
    ("clip.webm", "libvpx-vp9", "libopus", (97, 65), 0, False),
    ("clip.mkv", "libx264", "aac", (65, 49), 270, False),
])
def test_clip_keeps_frames_timestamps_rotation_and_audio(tmp_path, ckpt, name, codec, audio, size, rotation, vfr):
    clip = make_clip(tmp_path / name, codec=codec, audio=audio, size=size, rotation=rotation, vfr=vfr)
    res = invoke("derain", clip, "-o", tmp_path / "out", "--weights", ckpt, "--json")
    assert res.exit_code == 0, res.stderr
    record = json.loads(res.stdout.splitlines()[0])
    out = tmp_path / "out" / name
    assert record["output"] == str(out) and record["frames"] == 24 and record["status"] == "ok"
    before, after = decoded(clip), decoded(out)
    assert [f.pts for f in after] == [f.pts for f in before]
    assert after[0].time_base == before[0].time_base
    assert (after[0].width, after[0].height) == size
    assert after[0].rotation == before[0].rotation and after[0].rotation % 360 == rotation
    assert packet_bytes(out, "audio") == packet_bytes(clip, "audio")  # copied, not re-encoded
    with av.open(str(out)) as a, av.open(str(clip)) as b:
        assert abs(a.duration - b.duration) <= 0.05 * b.duration


def test_frames_dir_equals_restoring_the_decoded_frames_as_images(tmp_path, ckpt):
    clip = make_clip(tmp_path / "clip.mp4", frames=10)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(decoded(clip)):
        PILImage.fromarray(frame.to_ndarray(format="rgb24")).save(frames / f"{i + 1:06d}.png")
    assert invoke("derain", frames, "-o", tmp_path / "as_images", "--weights", ckpt).exit_code == 0
    res = invoke("derain", clip, "-o", tmp_path / "out", "--weights", ckpt, "--frames-dir")
    assert res.exit_code == 0, res.stderr
    written = sorted((tmp_path / "out" / "clip").glob("*.png"))
    assert [p.name for p in written] == [f"{i:06d}.png" for i in range(1, 11)]
    for path in written:
        a = np.asarray(PILImage.open(path)).astype(int)
        b = np.asarray(PILImage.open(tmp_path / "as_images" / path.name)).astype(int)
        # batching four frames per forward pass reorders float sums: one level, on few pixels
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.001


def test_a_clip_is_recognised_by_its_content_and_keeps_its_container(tmp_path, ckpt):
    clip = make_clip(tmp_path / "clip.mp4", frames=6)
    renamed = tmp_path / "camera_0001.bin"
    clip.rename(renamed)
    write_images(tmp_path / "photos", 1)
    res = invoke("derain", renamed, tmp_path / "photos", "-o", tmp_path / "out", "--weights", ckpt, "--ext", "jpg",
                 "--json")
    assert res.exit_code == 0, res.stderr
    outputs = sorted(Path(json.loads(line)["output"]).name for line in res.stdout.splitlines()[:-1])
    assert outputs == ["camera_0001.mp4", "img000.jpg"]  # --ext is for images
    assert len(decoded(tmp_path / "out" / "camera_0001.mp4")) == 6


def test_a_broken_clip_fails_alone(tmp_path, ckpt):
    clip = make_clip(tmp_path / "good.mp4", frames=6, audio=None)
    (tmp_path / "bad.mp4").write_bytes(clip.read_bytes()[: len(clip.read_bytes()) // 3])
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    res = invoke("derain", tmp_path / "good.mp4", tmp_path / "bad.mp4", tmp_path / "junk.mp4", "-o",
                 tmp_path / "out", "--weights", ckpt, "--json")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    records = {Path(r["input"]).name: r for r in map(json.loads, res.stdout.splitlines()[:-1])}
    assert records["good.mp4"]["status"] == "ok" and records["junk.mp4"]["status"] == "failed"
    assert records["junk.mp4"]["error"].startswith(f"{tmp_path / 'junk.mp4'}: ")
    assert records["bad.mp4"]["status"] in ("failed", "ok")  # a truncated tail may still decode partly
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("derestore-run")) == \
        sorted(["good.mp4"] + (["bad.mp4"] if records["bad.mp4"]["status"] == "ok" else []))


def test_a_killed_run_resumes_from_its_finished_segments(tmp_path):
    slow = save_checkpoint(tmp_path / "slow.pth", dncnn_state(nc=16, nb=8), "params")
    clip = make_clip(tmp_path / "long.mp4", size=(128, 96), frames=750, audio="aac")  # 30 s: three segments
    out = tmp_path / "out"
    cmd = cli_command("derain", str(clip), "-o", str(out), "--weights", str(slow), "--json")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = video.parts_folder(out / "long.mp4")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(parts.glob("part-*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in parts.glob("part-*"))
    assert finished and not (out / "long.mp4").exists()
    done = subprocess.run(cmd + ["--skip-existing"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[0])
    assert record["frames"] == 750
    assert any(f"resumed after frame {250 * len(finished)} " in n for n in record["notes"]), record["notes"]
    assert not parts.exists()
    after = decoded(out / "long.mp4")
    assert [f.pts for f in after] == [f.pts for f in decoded(clip)]
    assert packet_bytes(out / "long.mp4", "audio") == packet_bytes(clip, "audio")
    again = subprocess.run(cmd + ["--skip-existing"], capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout.splitlines()[0])["status"] == "skipped"


def test_temporal_smoothing_calms_static_regions_and_leaves_motion():
    rng = np.random.default_rng(0)
    still = np.full((32, 32, 3), 120, np.uint8)
    smoother = video._Smoother()
    outs = []
    for i in range(20):
        rgb_in = still.copy()
        rgb_in[:, 16:] = (i * 40) % 256  # the right half moves every frame
        rgb_out = np.clip(rgb_in.astype(int) + rng.integers(-6, 7, rgb_in.shape), 0, 255).astype(np.uint8)
        outs.append((rgb_out, smoother(rgb_in, rgb_out)))
    static = np.zeros((32, 32, 3), bool)
    static[:, :16] = True
    raw = video.flicker([o for o, _ in outs], static)
    smooth = video.flicker([s for _, s in outs], static)
    assert smooth < 0.6 * raw
    assert all((s[:, 16:] == o[:, 16:]).all() for o, s in outs)  # moving content is left as restored


def test_video_options_are_checked_before_the_model_loads(tmp_path, ckpt):
    clip = make_clip(tmp_path / "clip.mp4", frames=3, audio=None)
    for args, words in [(["--video-codec", "nosuchcodec"], "--video-codec 'nosuchcodec' is not an encoder"),
                        (["--crf", "99"], "--crf 99: must be between"),
                        (["--crf", "20", "--bitrate", "4M"], "give either --crf or --bitrate")]:
        res = invoke("derain", clip, "-o", tmp_path / "out", "--weights", ckpt, *args)
        assert res.exit_code == 2 and words in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_codec_and_bitrate_options_reach_the_encoder(tmp_path, ckpt):
    clip = make_clip(tmp_path / "clip.mkv", frames=6, audio=None)
    res = invoke("derain", clip, "-o", tmp_path / "out", "--weights", ckpt, "--video-codec", "ffv1")
    assert res.exit_code == 0, res.stderr
    with av.open(str(tmp_path / "out" / "clip.mkv")) as container:
        assert container.streams.video[0].codec_context.name == "ffv1"


def test_whole_frames_share_forward_passes_only_where_the_engine_batches(dncnn_ckpt, monkeypatch):
    import derestore
    from derestore.engine import Engine

    calls = []
    real = Engine.restore_batch

    def counting(self, images, dtype=None):
        calls.append(len(images))
        return real(self, images, dtype)

    monkeypatch.setattr(Engine, "restore_batch", counting)
    frames = [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(4)]
    model = derestore.load(weights=dncnn_ckpt, device="cpu", backend="torch")
    one_by_one, _ = model.restore_frames(frames, tile=0)
    assert calls == []  # PyTorch on a CPU: a batch of frames measured slower than one at a time
    batched = derestore.load(weights=dncnn_ckpt, device="cpu", backend="torch", batch_size=4)
    shared, _ = batched.restore_frames(frames, tile=0)
    assert calls == [4]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(one_by_one, shared))
