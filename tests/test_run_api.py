"""`derestore.run`: the API owns the run — its events, its checks (the CLI's, in library terms), its display."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from typer.testing import CliRunner

import derestore
from derestore.cli import app
from derestore.cli.common import in_flag_terms
from derestore.errors import UsageError
from derestore.runner import Finished, Loaded, Planned, Started, Tiles

from .conftest import cli_command, dncnn_state, save_checkpoint, smooth_image, to_uint, write_images


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "dncnn.pth", dncnn_state(nb=4), "params")


def test_events_arrive_in_order_with_tiles_of_the_tiled_image(tmp_path, ckpt):
    write_images(tmp_path / "in", 2, size=24)
    PILImage.fromarray(to_uint(smooth_image(100, 100))).save(tmp_path / "in" / "wide.png")
    events = []
    report = derestore.run([str(tmp_path / "in")], tmp_path / "out", weights=ckpt, tile=32, overlap=8,
                           batch_size=4, device="cpu", on_event=events.append)
    assert report.exit_code == 0 and (report.ok, report.failed, report.total) == (3, 0, 3)
    kinds = [type(e).__name__ for e in events]
    assert kinds[:2] == ["Planned", "Loaded"] and len(events[0].jobs) == 3
    assert isinstance(events[1], Loaded) and events[1].where == "cpu in fp32"
    # per image: Started, its tiles (in batches of 4), Finished
    wide = [e for e in events if isinstance(e, (Started, Tiles)) and e.job.input.name == "wide.png"]
    assert isinstance(wide[0], Started) and (wide[0].width, wide[0].height) == (100, 100)
    total = wide[1].total  # 6×6: tiles of 32 with 8 pixels of context on each side of a seam
    assert total == 36 and [(e.done, e.total) for e in wide[1:]] == [(d, 36) for d in range(4, 37, 4)]
    assert [e.result.input.name for e in events if isinstance(e, Finished)] == ["img000.png", "img001.png",
                                                                                 "wide.png"]
    assert report.record == tmp_path / "out" / "derestore-run.json" and report.record.is_file()


def test_max_pixels_zero_means_no_limit_in_the_api_as_on_the_command_line(tmp_path, ckpt):
    write_images(tmp_path / "in", 1)
    model = derestore.load(weights=ckpt, device="cpu")
    [result] = derestore.restore([str(tmp_path / "in")], tmp_path / "out", model=model, max_pixels=0)
    assert result.status == "ok"
    [limited] = derestore.restore([str(tmp_path / "in")], tmp_path / "out2", model=model, max_pixels=100)
    assert limited.status == "failed" and "max_pixels=" in limited.error


BAD_OPTIONS = [
    ({"tile": -1}, ["--tile", "-1"]),
    ({"tile": "big"}, ["--tile", "big"]),
    ({"overlap": -2}, ["--overlap", "-2"]),
    ({"tiling": "mosaic"}, ["--tiling", "mosaic"]),
    ({"batch_size": 0}, ["--batch-size", "0"]),
    ({"device": "tpu"}, ["--device", "tpu"]),
    ({"precision": "fp8"}, ["--precision", "fp8"]),
    ({"layout": "nhwc"}, ["--layout", "nhwc"]),
    ({"max_pixels": -1}, ["--max-pixels", "-1"]),
    ({"ext": "gif"}, ["--ext", "gif"]),
    ({"shard": "3/2"}, ["--shard", "3/2"]),
    ({"protocol": "matlab"}, ["--protocol", "matlab"]),
    ({"crop_border": -1}, ["--crop-border", "-1"]),
    ({"from_list": "/nonexistent/list.txt"}, ["--from-list", "/nonexistent/list.txt"]),
]


@pytest.mark.parametrize(("kwargs", "flags"), BAD_OPTIONS, ids=[next(iter(k)) for k, _ in BAD_OPTIONS])
def test_api_run_refuses_what_the_cli_refuses_with_the_same_words(tmp_path, ckpt, kwargs, flags):
    write_images(tmp_path / "in", 1)
    with pytest.raises(UsageError) as caught:
        derestore.run([str(tmp_path / "in")], tmp_path / "out", weights=ckpt, **kwargs)
    message = str(caught.value)
    assert "--" not in message  # library terms: keyword arguments, not flags
    res = CliRunner().invoke(app, ["derain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                   str(ckpt), *flags])
    assert res.exit_code == 2
    assert res.stderr == f"error: {in_flag_terms(message)}\n"
    assert not (tmp_path / "out").exists()


def test_a_pipe_gets_lines_and_no_redraws(tmp_path, ckpt):
    write_images(tmp_path / "in", 3)
    done = subprocess.run(cli_command("derain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                      str(ckpt)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith(str(tmp_path / "in"))]) == 3


def test_a_terminal_gets_a_progress_display(tmp_path):
    slow = save_checkpoint(tmp_path / "slow.pth", dncnn_state(nc=16, nb=8), "params")
    write_images(tmp_path / "in", 6, size=400)  # slow enough per image for the display to draw its tiles
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(cli_command("derain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                        str(slow), "--tile", "64", "--overlap", "8"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm-256color"})
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the command ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    proc.wait(timeout=60)
    os.close(controller)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace"))
    assert proc.returncode == 0
    assert "\r" in text or "\x1b[" in shown.decode("utf-8", "replace")  # redrawn in place
    assert re.search(r"images .* \d/6", text) and "ETA" in text
    assert re.search(r"img00\d\.png \(400×400\) .* \d+/64 tiles", text)  # the bar of an 8×8-tile image


def test_tile_and_overlap_that_cannot_be_laid_out_are_refused_before_any_image(tmp_path, ckpt):
    write_images(tmp_path / "in", 2)
    events = []
    with pytest.raises(UsageError, match=r"^tile=16 overlap=32: tile 16 leaves no room between two overlaps"):
        derestore.run([str(tmp_path / "in")], tmp_path / "out", weights=ckpt, tile=16, overlap=32,
                      on_event=events.append)
    assert [type(e) for e in events] == [Planned] and not (tmp_path / "out").exists()


def test_run_record_of_an_api_run_lists_options_and_threads(tmp_path, ckpt):
    write_images(tmp_path / "in", 1)
    report = derestore.run([str(tmp_path / "in")], tmp_path / "out", weights=ckpt, device="cpu", threads=1)
    record = json.loads(report.record.read_text())
    assert record["threads"] == 1 and record["options"]["tile"] == 512 and record["ray"] is None
    assert record["counts"] == {"ok": 1, "skipped": 0, "failed": 0, "total": 1, "seconds": record["counts"]["seconds"],
                                "model": "dncnn", "interrupted": False, "stopped": None}
    assert np.isfinite(record["counts"]["seconds"])


def test_an_interrupt_in_the_event_handler_finishes_the_writes_in_flight_before_run_returns(tmp_path, ckpt,
                                                                                               monkeypatch):
    from derestore import imageio

    write_images(tmp_path / "in", 6, size=24)
    real_write = imageio.write_image

    def slow_write(path, image):
        time.sleep(0.4)  # still writing when the first result is handed out
        return real_write(path, image)

    monkeypatch.setattr(imageio, "write_image", slow_write)
    finished = []

    def on_event(event):
        if isinstance(event, Finished):
            finished.append(event.result)
            if len(finished) == 1:
                raise KeyboardInterrupt

    out = tmp_path / "out"
    report = derestore.run([str(tmp_path / "in")], out, weights=ckpt, device="cpu", on_event=on_event)
    assert report.interrupted and report.exit_code == 130
    # Every write that had started was completed and reported before run() returned: no temp file,
    # and each output on disk is one the report counted as ok.
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    written = sorted(p.name for p in out.glob("*.png"))
    assert 1 < len(written) < 6
    assert sorted(r.output.name for r in finished if r.status == "ok") == written
    assert report.ok == len(written)


def test_an_interrupted_run_leaves_no_reference_cycle_holding_the_model(tmp_path, ckpt):
    """A model kept alive until interpreter shutdown is torn down there (ONNX Runtime aborted the
    process doing so: "terminate called without an active exception", exit -6 instead of 130)."""
    import gc
    import weakref

    write_images(tmp_path / "in", 4, size=24)
    loaded = []

    def on_event(event):
        if isinstance(event, Loaded):
            loaded.append(weakref.ref(event.model))
        if isinstance(event, Finished):
            raise KeyboardInterrupt

    gc.disable()  # freed by reference counting alone, or not at all
    try:
        report = derestore.run([str(tmp_path / "in")], tmp_path / "out", weights=ckpt, device="cpu",
                               on_event=on_event)
        assert report.interrupted
        assert loaded and loaded[0]() is None
    finally:
        gc.enable()
