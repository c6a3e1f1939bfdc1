"""`derestore models` and `derestore weights …` as a user runs them: output, cache contents, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from derestore.cli import app
from derestore.errors import ModelUnavailable
from tests.httpserver_util import FaultServer

PAYLOAD = b"checkpoint bytes " * 5000
REPO = Path(__file__).resolve().parents[1]
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


APP = app  # the real one: its root callback routes the library's log records to stderr


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


@pytest.fixture
def loader_calls(monkeypatch) -> list[tuple[Path, str]]:
    """A stand-in loader (the toy files are no real checkpoints): only PAYLOAD loads, as any architecture."""
    calls: list[tuple[Path, str]] = []

    def check_loads(path: Path, *, arch: str) -> None:
        calls.append((path, arch))
        if path.read_bytes() != PAYLOAD:
            raise ModelUnavailable(f"{path} is not a PyTorch checkpoint that can be read (invalid load key)")

    monkeypatch.setitem(sys.modules, "derestore.loading", types.SimpleNamespace(check_loads=check_loads))
    return calls


@pytest.fixture
def cli(tmp_path, monkeypatch, server, loader_calls):
    """Run the CLI against a user registry whose models live on the local server."""
    url = server.add("/w/toy.pth", PAYLOAD)
    server.add("/w/free.pth", PAYLOAD)
    server.add("/w/junk.pth", PAYLOAD)
    server.always("/w/junk.pth", "login")
    registry = tmp_path / "my.toml"
    registry.write_text(
        f"""
[models.toy-pinned]
task = "derain"
arch = "Toy"
dataset = "Toyset"
sources = ["{url}"]
filename = "toy.pth"
sha256 = "{DIGEST}"
license = "MIT"

[models.toy-free]
task = "derain"
arch = "Toy"
sources = ["{server.url('/w/free.pth')}"]
filename = "free.pth"

[models.toy-gone]
task = "derain"
arch = "Toy"
sources = ["{server.url('/missing.pth')}"]

[models.toy-junk]
task = "derain"
arch = "Toy"
sources = ["{server.url('/w/junk.pth')}"]
dataset = "Rain [/x] and [bold]snow"
license = "[red]MIT"
"""
    )
    monkeypatch.setenv("DERESTORE_REGISTRY", str(registry))
    monkeypatch.setenv("DERESTORE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DERESTORE_BACKOFF", "0.01")
    monkeypatch.setenv("DERESTORE_RETRIES", "1")
    for name in ("DERESTORE_OFFLINE", "DERESTORE_MIRROR", "DERESTORE_GDRIVE_URL"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(APP, list(args))

    return run


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_models_json_lists_every_record_honestly(cli):
    result = cli("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json_lines(result.stdout)}
    assert rows["toy-pinned"]["pinned"] is True and rows["toy-pinned"]["cached"] is False
    assert rows["toy-free"]["pinned"] is False and rows["toy-free"]["sha256"] is None
    # the built-in registry is listed too, with what a user must do for each entry
    assert rows["restormer-derain"]["default"] is True and rows["restormer-derain"]["download"] == "automatic"
    assert rows["derestormer-snow100k"]["download"] == "manual import"
    assert rows["derestormer-snow100k"]["manual_code"] == "t6w4"
    assert rows["dtpnet-derain"]["download"] == "import only"
    assert rows["mixdehazenet-b-indoor"]["download"] == "automatic (Google Drive)"
    derestormers = [r for r in rows.values() if r["arch"] == "DeRestormer"]
    assert len(derestormers) == 13 and {r["download"] for r in derestormers} == {"manual import"}
    for task in ("derain", "desnow", "dehaze", "deblur", "denoise"):
        assert sum(r["default"] for r in rows.values() if r["task"] == task) == 1


def test_models_reports_cache_state_after_download(cli):
    assert cli("weights", "download", "toy-free").exit_code == 0
    rows = {r["name"]: r for r in json_lines(cli("models", "--json", "--task", "derain").stdout)}
    assert {r["task"] for r in rows.values()} == {"derain"}
    assert rows["toy-free"]["cached"] is True and rows["toy-free"]["pinned"] is False
    assert rows["toy-free"]["sha256"] == DIGEST and rows["toy-free"]["size"] == len(PAYLOAD)


def test_models_table(cli):
    result = cli("models", "--task", "derain")
    assert result.exit_code == 0
    assert "toy-pinned" in result.stdout and "derestormer-rain200h" in result.stdout
    assert "manual import" in result.stdout and "nafnet-sidd-w64" not in result.stdout
    assert cli("models", "--task", "nope").exit_code == 2


def test_download_path_verify_rm(cli, tmp_path, server):
    result = cli("weights", "download", "toy-pinned")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    assert path == tmp_path / "cache" / "checkpoints" / "toy-pinned" / "toy.pth"
    assert path.read_bytes() == PAYLOAD

    assert cli("weights", "download", "toy-pinned").exit_code == 0
    assert server.full_transfers("/w/toy.pth") == 1
    assert cli("weights", "path", "toy-pinned").stdout.strip() == str(path)

    result = cli("weights", "verify", "--json")
    assert result.exit_code == 0
    assert json_lines(result.stdout) == [
        {"name": "toy-pinned", "status": "ok", "path": str(path), "expected": DIGEST, "actual": DIGEST}
    ]

    assert cli("weights", "rm", "toy-pinned").exit_code == 0
    assert not path.parent.exists()
    result = cli("weights", "path", "toy-pinned")
    assert result.exit_code == 3 and "not in the cache" in result.output


def test_verify_finds_corruption(cli):
    path = Path(cli("weights", "download", "toy-pinned").stdout.strip())
    path.write_bytes(b"rotten")
    result = cli("weights", "verify", "toy-pinned")
    assert result.exit_code == 3 and "corrupt" in result.output and DIGEST in result.output
    assert not path.exists()


def test_download_failure_is_exit_3_and_others_still_download(cli):
    result = cli("weights", "download", "toy-gone", "toy-free", "--json")
    assert result.exit_code == 3
    rows = json_lines(result.stdout)
    assert [(r["name"], r["status"]) for r in rows] == [("toy-gone", "failed"), ("toy-free", "ok")]
    assert "HTTP 404" in rows[0]["error"]


def test_unknown_name_is_exit_2(cli, server):
    result = cli("weights", "download", "toy-free", "no-such-model")
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output
    assert server.hits == []  # names are checked before anything is fetched


def test_manual_only_model_prints_share_code_and_import_command(cli):
    result = cli("weights", "download", "derestormer-snow100k")
    assert result.exit_code == 3
    text = " ".join(result.output.split())
    assert "https://pan.baidu.com/s/16BLNtCYDTRcOQpZpTosrAQ?pwd=t6w4" in text
    assert "extraction code t6w4" in text
    assert "derestore weights import derestormer-snow100k FILE" in text


def test_offline_download_is_exit_3_without_requests(cli, server, monkeypatch):
    monkeypatch.setenv("DERESTORE_OFFLINE", "1")
    result = cli("weights", "download", "toy-pinned")
    assert result.exit_code == 3 and "DERESTORE_OFFLINE=1" in result.output
    assert server.hits == []


def test_import_pinned(cli, tmp_path):
    good = tmp_path / "from-browser.bin"
    good.write_bytes(PAYLOAD)
    result = cli("weights", "import", "toy-pinned", str(good))
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()).read_bytes() == PAYLOAD

    bad = tmp_path / "other.bin"
    bad.write_bytes(b"other")
    result = cli("weights", "import", "toy-pinned", str(bad))
    assert result.exit_code == 3
    assert DIGEST in result.output and hashlib.sha256(b"other").hexdigest() in result.output


def test_import_unpinned_asks_the_loader(cli, tmp_path, loader_calls):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    result = cli("weights", "import", "toy-free", str(junk))
    assert result.exit_code == 3 and f"{junk} is not a PyTorch checkpoint" in result.output
    assert cli("weights", "path", "toy-free").exit_code == 3

    good = tmp_path / "good.pth"
    good.write_bytes(PAYLOAD)
    assert cli("weights", "import", "toy-free", str(good)).exit_code == 0
    assert loader_calls == [(junk, "Toy"), (good, "Toy")]
    assert cli("weights", "path", "toy-free").exit_code == 0


def test_import_missing_file_is_exit_2(cli, tmp_path):
    result = cli("weights", "import", "toy-pinned", str(tmp_path / "nope.pth"))
    assert result.exit_code == 2 and "no such file" in result.output


def test_unpinned_download_that_does_not_load_is_deleted_and_described(cli, tmp_path, loader_calls):
    result = cli("weights", "download", "toy-junk")
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 2  # "downloading …" and the one error line
    error = result.stderr.splitlines()[-1]
    assert "got 28 bytes (Content-Type text/plain), which is not a Toy checkpoint" in error
    assert "the file is not a PyTorch checkpoint" in error
    assert [arch for _, arch in loader_calls] == ["Toy"]
    assert not (tmp_path / "cache" / "checkpoints" / "toy-junk").exists() or not any(
        (tmp_path / "cache" / "checkpoints" / "toy-junk").iterdir()
    )
    result = cli("weights", "verify", "toy-junk")
    assert result.exit_code == 3 and "missing" in result.output


def test_download_logs_what_it_fetches_and_from_where(cli, server):
    result = cli("weights", "download", "toy-pinned")
    assert result.exit_code == 0
    assert result.stderr == f"downloading toy-pinned from {server.url('/w/toy.pth')}\n"


def test_download_from_a_range_ignoring_dropping_mirror_is_bounded(cli, server, monkeypatch):
    server.always("/w/toy.pth", "norange", "drop")
    monkeypatch.setenv("DERESTORE_RETRIES", "2")
    result = cli("weights", "download", "toy-pinned")
    assert result.exit_code == 3 and len(server.hits_for("/w/toy.pth")) == 3
    assert "connection dropped mid-transfer after 3 attempts" in result.stderr.splitlines()[-1]


def test_import_over_a_bundled_model_is_refused_with_the_way_to_use_the_file(cli, tmp_path):
    mine = tmp_path / "my denoiser.pth"
    mine.write_bytes(PAYLOAD)
    result = cli("weights", "import", "lite-denoise", str(mine))
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "lite-denoise ships with derestore" in line
    assert f"`derestore denoise INPUTS --weights '{mine}'`" in line and "DERESTORE_REGISTRY" in line
    assert not (tmp_path / "cache" / "checkpoints" / "lite-denoise").exists()


def test_registry_strings_and_paths_are_printed_as_text_not_markup(cli, tmp_path):
    result = cli("models", "--task", "derain")
    assert result.exit_code == 0
    (row,) = [line for line in result.stdout.splitlines() if "toy-junk" in line]
    assert "Rain [/x] and [bold]snow" in row and "[red]MIT" in row

    odd = tmp_path / "IMG [edited] [/x]" / "nope.pth"
    result = cli("weights", "import", "toy-pinned", str(odd))
    assert result.exit_code == 2 and f"{odd}: no such file" in result.stderr


def test_unknown_task_for_models_lists_the_tasks(cli):
    result = cli("models", "--task", "dera")
    assert result.exit_code == 2 and "unknown task 'dera'; known tasks: deblur," in result.stderr


def test_download_progress_draws_a_bar_on_a_terminal_only(monkeypatch):
    import io

    from rich.console import Console

    from derestore.cli import download_progress as module

    quiet = Console(file=io.StringIO(), force_terminal=False)
    monkeypatch.setattr(module, "console", quiet)
    with module.download_progress() as progress:
        progress("toy", 10, 100)
    assert quiet.file.getvalue() == ""

    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(module, "console", terminal)
    with module.download_progress() as progress:
        progress("toy[/x]", 0, 100)
        progress("toy[/x]", 100, 100)
    assert "toy[/x]" in terminal.file.getvalue()


# ---------------------------------------------------------------- without any network


def _no_network_available() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


no_network = pytest.mark.skipif(not _no_network_available(), reason="needs `unshare -n` (root or user namespaces)")


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERESTORE_") and "proxy" not in k.lower()}
    # A large backoff: any retry of an unreachable source would blow the time limit.
    return {**env, "DERESTORE_HOME": str(tmp_path / "cache"), "DERESTORE_BACKOFF": "30", "PYTHONPATH": str(REPO)}


@no_network
def test_without_network_the_default_derain_download_fails_fast_with_exit_3(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "derestore", "weights", "download", "restormer-derain"],
        env=_offline_env(tmp_path), capture_output=True, text=True, timeout=60, check=False,
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 3 and "Traceback" not in result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: could not download restormer-derain: https://github.com/")
    assert error.count("cannot resolve the host name") == 2


@no_network
def test_without_network_a_derain_run_fails_within_10_seconds_with_exit_3(tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), "gray").save(photo)
    started = time.monotonic()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "derestore", "derain", str(photo)],
        env=_offline_env(tmp_path), capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 3 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "could not download restormer-derain" in error and "`derestore weights import restormer-derain FILE`" in error
    assert error.endswith("; the bundled -m lite-derain needs no download")
    assert not (tmp_path / "restored").exists()  # nothing written for a run that never started
