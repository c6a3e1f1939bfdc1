"""The checkpoint hub against a local fault-injecting HTTP server: no network."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from derestore import atomic, hub
from derestore.errors import ModelUnavailable, UsageError
from derestore.registry import ModelRecord
from tests.httpserver_util import FaultServer

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not a multiple of the chunk size below
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DERESTORE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DERESTORE_BACKOFF", "0.01")
    monkeypatch.setenv("DERESTORE_RETRIES", "3")
    monkeypatch.setenv("DERESTORE_TIMEOUT", "5")
    for name in ("DERESTORE_OFFLINE", "DERESTORE_MIRROR", "DERESTORE_GDRIVE_URL", "DERESTORE_REGISTRY"):
        monkeypatch.delenv(name, raising=False)


def record(*sources: str, sha256: str | None = DIGEST, name: str = "toy", filename: str = "toy.pth", **kw) -> ModelRecord:
    return ModelRecord(
        name=name, task="derain", arch="Toy", sources=tuple(sources), filename=filename, sha256=sha256, **kw
    )


def loads_anything(path: Path) -> None:
    """A load check that accepts every file (the hub's tests are not about the loader)."""


def cache_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "checkpoints"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---------------------------------------------------------------- plain download and cache


def test_download_caches_file_and_metadata_then_serves_from_cache(server, tmp_path, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    rec = record(url)
    path = hub.fetch(rec)
    assert path == tmp_path / "cache" / "checkpoints" / "toy" / "toy.pth"
    assert path.read_bytes() == PAYLOAD
    entry = hub.cache_entry(rec)
    assert (entry.sha256, entry.size, entry.source, entry.pinned) == (DIGEST, len(PAYLOAD), url, True)
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]

    # The second use neither downloads nor re-hashes.
    monkeypatch.setattr(hub, "sha256_file", lambda p: pytest.fail("re-hashed an unchanged file"))
    assert hub.fetch(rec) == path
    assert hub.cached_path(rec) == path
    assert len(server.hits) == 1


def test_cache_root_defaults_to_platform_cache(monkeypatch):
    import platformdirs

    monkeypatch.delenv("DERESTORE_HOME")
    assert hub.cache_root() == Path(platformdirs.user_cache_dir("derestore", appauthor=False))


def test_changed_cached_file_is_rehashed_and_replaced(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    rec = record(url)
    path = hub.fetch(rec)
    path.write_bytes(b"x" * len(PAYLOAD))  # same size, new mtime: must be caught
    assert hub.cached_path(rec) is None
    assert hub.fetch(rec).read_bytes() == PAYLOAD
    assert server.full_transfers("/w/toy.pth") == 2


# ---------------------------------------------------------------- faults


def test_dropped_connection_resumes_with_range(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "drop")
    path = hub.fetch(record(url))
    assert path.read_bytes() == PAYLOAD
    first, second = server.hits_for("/w/toy.pth")
    assert first.range is None and not first.complete and first.sent == len(PAYLOAD) // 2
    assert second.range == f"bytes={first.sent}-" and second.status == 206 and second.complete
    assert server.bytes_sent("/w/toy.pth") == len(PAYLOAD)  # nothing fetched twice
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]


def test_interrupted_run_is_resumed_by_the_next_run(server, tmp_path, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "drop")
    monkeypatch.setenv("DERESTORE_RETRIES", "0")
    with pytest.raises(ModelUnavailable, match="bytes kept, the next run resumes"):
        hub.fetch(record(url))
    partials = [f for f in cache_files(tmp_path) if f.endswith(".incomplete.pth")]
    assert len(partials) == 1 and hub.cached_path(record(url)) is None

    path = hub.fetch(record(url))
    assert path.read_bytes() == PAYLOAD
    assert server.hits_for("/w/toy.pth")[-1].range == f"bytes={len(PAYLOAD) // 2}-"
    assert server.bytes_sent("/w/toy.pth") == len(PAYLOAD)
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]


def test_server_ignoring_range_restarts_cleanly(server):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "drop", "norange")
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert [h.status for h in server.hits_for("/w/toy.pth")] == [200, 200]


def test_sha256_mismatch_caches_nothing_and_shows_both_digests(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "wrong")
    wrong = hashlib.sha256(bytes(b ^ 0xFF for b in PAYLOAD)).hexdigest()
    with pytest.raises(ModelUnavailable) as info:
        hub.fetch(record(url))
    assert info.value.exit_code == 3
    assert DIGEST in str(info.value) and wrong in str(info.value)
    assert cache_files(tmp_path) == []


@pytest.fixture
def hub_log(monkeypatch) -> Iterator[list[logging.LogRecord]]:
    """The records the hub logs, with no handler a CLI test may have left on the `derestore` logger."""
    monkeypatch.setattr(logging.getLogger("derestore"), "handlers", [])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("derestore.hub")
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the isEnabledFor cache
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_mismatching_mirror_falls_through_to_next_source_with_a_logged_warning(server, capsys, hub_log):
    bad = server.add("/mirror/toy.pth", b"\0" * len(PAYLOAD))
    good = server.add("/w/toy.pth", PAYLOAD)
    path = hub.fetch(record(bad, good))
    assert path.read_bytes() == PAYLOAD
    assert hub.cache_entry(record(good)).source == good
    warnings = [r.getMessage() for r in hub_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sha256 mismatch" in warnings[0] and "trying the next source" in warnings[0]
    assert f"downloading toy from {bad}" in [r.getMessage() for r in hub_log if r.levelno == logging.INFO]
    assert capsys.readouterr() == ("", "")  # the library logs, it never prints


def test_404_moves_on_without_retrying(server):
    missing = server.url("/gone/toy.pth")
    good = server.add("/w/toy.pth", PAYLOAD)
    assert hub.fetch(record(missing, good)).read_bytes() == PAYLOAD
    assert len(server.hits_for("/gone/toy.pth")) == 1


def test_500_then_200_retries(server):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "500", "500")
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert [h.status for h in server.hits_for("/w/toy.pth")] == [500, 500, 200]


def test_persistent_500_gives_up_with_exit_3(server, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", *["500"] * 10)
    monkeypatch.setenv("DERESTORE_RETRIES", "2")
    with pytest.raises(ModelUnavailable, match=r"HTTP 500 after 3 attempts"):
        hub.fetch(record(url))
    assert len(server.hits_for("/w/toy.pth")) == 3


def test_slow_response_times_out_and_retries(server, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.slow_seconds = 1.5
    server.fault("/w/toy.pth", "slow")
    monkeypatch.setenv("DERESTORE_TIMEOUT", "0.5")
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert len(server.hits_for("/w/toy.pth")) == 2


def test_html_page_is_not_a_checkpoint(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "html")
    with pytest.raises(ModelUnavailable, match="HTML page"):
        hub.fetch(record(url, sha256=None), check=loads_anything)
    assert cache_files(tmp_path) == []


def test_progress_callback_gets_model_name_bytes_done_and_total(server):
    url = server.add("/w/toy.pth", PAYLOAD)
    calls: list[tuple[str, int, int | None]] = []
    hub.fetch(record(url), progress=lambda *event: calls.append(event))
    assert calls[0] == ("toy", 0, len(PAYLOAD)) and calls[-1] == ("toy", len(PAYLOAD), len(PAYLOAD))
    done = [call[1] for call in calls]
    assert done == sorted(done)


# ---------------------------------------------------------------- bounded retries


@pytest.mark.parametrize("retries", [0, 3])
def test_range_ignoring_server_that_drops_gets_retries_plus_one_requests(server, monkeypatch, retries):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.always("/w/toy.pth", "norange", "drop")
    monkeypatch.setenv("DERESTORE_RETRIES", str(retries))
    monkeypatch.setenv("DERESTORE_BACKOFF", "0")
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        hub.fetch(record(url))
    assert time.monotonic() - started < 5
    # The first half is progress; every later 200 restarts the file and only repeats it.
    assert len(server.hits_for("/w/toy.pth")) == retries + 1
    message = str(info.value)
    assert "\n" not in message and f"connection dropped mid-transfer after {retries + 1} attempts" in message


def test_range_ignoring_server_that_stalls_counts_each_read_timeout_as_an_attempt(server, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.always("/w/toy.pth", "norange", "stall")
    server.stall_seconds = 5
    monkeypatch.setenv("DERESTORE_TIMEOUT", "0.3")
    monkeypatch.setenv("DERESTORE_RETRIES", "2")
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="timed out after 3 attempts"):
        hub.fetch(record(url))
    assert time.monotonic() - started < 4
    assert len(server.hits_for("/w/toy.pth")) == 3


def test_each_resume_that_adds_bytes_earns_a_fresh_retry_budget(server, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", *["drop"] * 4)
    monkeypatch.setenv("DERESTORE_RETRIES", "1")
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert len(server.hits_for("/w/toy.pth")) == 5
    assert server.bytes_sent("/w/toy.pth") == len(PAYLOAD)


# ---------------------------------------------------------------- unreachable sources


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every backoff sleep the hub takes, without sleeping."""
    taken: list[float] = []
    monkeypatch.setattr(hub.time, "sleep", taken.append)
    return taken


@pytest.fixture(autouse=True)
def invalid_names_never_resolve(monkeypatch):
    """Names under .invalid (RFC 2606) fail to resolve at once, as they do without any network."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_unresolvable_and_refusing_sources_fail_over_without_backoff(server, monkeypatch, closed_port, sleeps):
    good = server.add("/w/toy.pth", PAYLOAD)
    monkeypatch.setenv("DERESTORE_BACKOFF", "30")
    monkeypatch.setenv("DERESTORE_RETRIES", "5")
    started = time.monotonic()
    path = hub.fetch(record(f"http://127.0.0.1:{closed_port}/toy.pth", "https://nonexistent.invalid/toy.pth", good))
    assert path.read_bytes() == PAYLOAD
    assert time.monotonic() - started < 3 and sleeps == []


def test_no_reachable_source_fails_at_once_naming_each_source_and_why(monkeypatch, closed_port, sleeps, tmp_path):
    refused, unknown = f"http://127.0.0.1:{closed_port}/toy.pth", "https://nonexistent.invalid/toy.pth"
    monkeypatch.setenv("DERESTORE_BACKOFF", "30")
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        hub.fetch(record(refused, unknown))
    assert time.monotonic() - started < 3 and sleeps == []
    message = str(info.value)
    assert "\n" not in message
    assert f"{refused}: connection refused" in message and f"{unknown}: cannot resolve the host name" in message
    assert cache_files(tmp_path) == []


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listen queue is full: connection attempts get no answer, as behind a dropping firewall."""
    server_sock = socket.socket()
    server_sock.bind(("127.0.0.1", 0))
    server_sock.listen(0)
    port = server_sock.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.1)
    yield port
    for sock in [server_sock, *fillers]:
        sock.close()


def test_connect_timeout_fails_over_after_one_timeout(server, monkeypatch, unanswered_port, sleeps):
    good = server.add("/w/toy.pth", PAYLOAD)
    monkeypatch.setenv("DERESTORE_TIMEOUT", "1")
    monkeypatch.setenv("DERESTORE_RETRIES", "5")
    monkeypatch.setenv("DERESTORE_BACKOFF", "30")
    started = time.monotonic()
    path = hub.fetch(record(f"http://127.0.0.1:{unanswered_port}/toy.pth", good))
    assert path.read_bytes() == PAYLOAD
    assert 0.9 < time.monotonic() - started < 3 and sleeps == []


def test_drive_source_on_an_unresolvable_host_fails_over_without_backoff(server, monkeypatch, sleeps):
    good = server.add("/w/toy.pth", PAYLOAD)
    monkeypatch.setenv("DERESTORE_GDRIVE_URL", "https://drive.nonexistent.invalid/uc")
    monkeypatch.setenv("DERESTORE_BACKOFF", "30")
    assert hub.fetch(record("gdrive:1AbC", good)).read_bytes() == PAYLOAD
    assert sleeps == []


# ---------------------------------------------------------------- encodings


def test_downloads_ask_a_gzip_mirror_for_identity_encoding(server, monkeypatch):
    server.gzip_when_allowed = True
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "drop")  # the resume request must ask for identity too
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    server.add_drive("1AbC", PAYLOAD)
    monkeypatch.setenv("DERESTORE_GDRIVE_URL", server.url("/uc"))
    assert hub.fetch(record("gdrive:1AbC", name="drive")).read_bytes() == PAYLOAD
    assert [h.path for h in server.hits] == ["/w/toy.pth", "/w/toy.pth", "/uc", "/download"]
    assert {h.accept_encoding for h in server.hits} == {"identity"}


def test_server_that_gzips_unasked_is_refused_in_plain_words(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "gzip")
    with pytest.raises(ModelUnavailable, match="gzip-encoded data although asked for the plain file"):
        hub.fetch(record(url))
    assert cache_files(tmp_path) == []


# ---------------------------------------------------------------- trust on first use


def test_unpinned_records_digest_and_verifies_later_downloads(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    rec = record(url, sha256=None)
    path = hub.fetch(rec, check=loads_anything)
    entry = hub.cache_entry(rec)
    assert entry.sha256 == DIGEST and entry.pinned is False

    path.unlink()
    server.files["/w/toy.pth"] = b"changed upstream"
    with pytest.raises(ModelUnavailable, match=f"first download recorded {DIGEST}"):
        hub.fetch(rec, check=loads_anything)
    assert not path.exists()

    assert hub.remove(rec)  # forgetting the digest accepts the new file
    assert hub.fetch(rec, check=loads_anything).read_bytes() == b"changed upstream"


def refuse_unless_payload(path: Path) -> None:
    """A stand-in for the loader: only PAYLOAD is a checkpoint of the architecture."""
    if path.read_bytes() != PAYLOAD:
        raise ModelUnavailable(f"{path} is not a PyTorch checkpoint that can be read (invalid load key); is the file complete?")


def test_unpinned_login_page_is_not_recorded_and_the_error_says_what_came_back(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "login")  # 28 bytes of HTML, served as text/plain
    rec = record(url, sha256=None)
    with pytest.raises(ModelUnavailable) as info:
        hub.fetch(rec, check=refuse_unless_payload)
    message = str(info.value)
    assert "\n" not in message and ".incomplete" not in message
    assert "got 28 bytes (Content-Type text/plain), which is not a Toy checkpoint" in message
    assert "the file is not a PyTorch checkpoint that can be read" in message
    assert cache_files(tmp_path) == [] and hub.cache_entry(rec) is None
    assert hub.verify(rec).status == "missing"

    assert hub.fetch(rec, check=refuse_unless_payload).read_bytes() == PAYLOAD  # the real file is accepted


def test_unpinned_local_file_that_is_no_checkpoint_is_not_recorded(tmp_path):
    passwd = Path("/etc/passwd")
    rec = record(f"file://{passwd}", sha256=None)
    with pytest.raises(ModelUnavailable, match=rf"got {passwd.stat().st_size} bytes, which is not a Toy checkpoint"):
        hub.fetch(rec, check=refuse_unless_payload)
    assert cache_files(tmp_path) == [] and hub.verify(rec).status == "missing"


def test_unpinned_truncated_body_is_not_recorded(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "truncate")  # half the file, no Content-Length, a clean close
    with pytest.raises(ModelUnavailable, match=rf"got {len(PAYLOAD) // 2} bytes \(Content-Type application/octet-stream\)"):
        hub.fetch(record(url, sha256=None), check=refuse_unless_payload)
    assert cache_files(tmp_path) == []


def test_unpinned_download_is_checked_under_its_own_extension_before_it_is_committed(server, tmp_path):
    url = server.add("/w/toy.safetensors", PAYLOAD)
    rec = record(url, sha256=None, filename="toy.safetensors")
    seen: list[tuple[Path, bool]] = []

    def check(path: Path) -> None:
        seen.append((path, hub.target_path(rec).exists()))

    path = hub.fetch(rec, check=check)
    ((checked, committed),) = seen
    assert checked.suffix == ".safetensors" and checked != path and not committed
    assert hub.cache_entry(rec).sha256 == DIGEST


def test_unpinned_record_without_a_check_is_refused_before_any_request(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    with pytest.raises(ModelUnavailable, match="no load check was given"):
        hub.fetch(record(url, sha256=None))
    assert server.hits == [] and cache_files(tmp_path) == []


def test_pinned_download_is_not_load_checked(server):
    url = server.add("/w/toy.pth", PAYLOAD)
    hub.fetch(record(url), check=lambda path: pytest.fail("a pinned file needs no load check"))


def test_verify_reports_and_deletes_corrupt_file(server):
    url = server.add("/w/toy.pth", PAYLOAD)
    rec = record(url)
    path = hub.fetch(rec)
    assert hub.verify(rec).status == "ok"
    st = path.stat()
    with open(path, "r+b") as fh:  # bit rot: same size, same mtime
        fh.seek(1000)
        fh.write(b"\x00")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = hub.verify(rec)
    assert (result.status, result.expected) == ("corrupt", DIGEST)
    assert result.actual != DIGEST and not path.exists()
    assert hub.verify(rec).status == "missing"


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_git_blob_pin_checks_downloads_and_imports(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    rec = record(url, sha256=None, git_blob_sha1=git_blob(PAYLOAD))
    assert hub.fetch(rec).read_bytes() == PAYLOAD
    assert hub.cache_entry(rec).pinned is True and hub.pinned(rec)

    other = record(url, sha256=None, name="other", git_blob_sha1=git_blob(b"x"))
    with pytest.raises(ModelUnavailable, match=f"git blob sha1 mismatch: got {git_blob(PAYLOAD)}"):
        hub.fetch(other)
    local = tmp_path / "toy.pth"
    local.write_bytes(PAYLOAD)
    with pytest.raises(ModelUnavailable, match="nothing was imported"):
        hub.import_file(other, local, check_loads=lambda p: None)
    assert hub.cached_path(other) is None


# ---------------------------------------------------------------- offline, mirror, local, manual


def test_offline_never_touches_the_network(server, tmp_path, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    monkeypatch.setenv("DERESTORE_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as info:
        hub.fetch(record(url))
    message = str(info.value)
    assert "DERESTORE_OFFLINE=1" in message and "derestore weights import toy FILE" in message
    assert server.hits == [] and cache_files(tmp_path) == []

    monkeypatch.delenv("DERESTORE_OFFLINE")
    path = hub.fetch(record(url))
    monkeypatch.setenv("DERESTORE_OFFLINE", "1")
    assert hub.fetch(record(url)) == path  # cached checkpoints still work offline
    assert len(server.hits) == 1


def test_offline_still_copies_local_sources(tmp_path, monkeypatch):
    local = tmp_path / "share" / "toy.pth"
    local.parent.mkdir()
    local.write_bytes(PAYLOAD)
    monkeypatch.setenv("DERESTORE_OFFLINE", "1")
    assert hub.fetch(record(f"file://{local}")).read_bytes() == PAYLOAD


def test_mirror_is_tried_first(server, monkeypatch):
    server.add("/internal/toy.pth", PAYLOAD)
    official = server.add("/w/toy.pth", PAYLOAD)
    monkeypatch.setenv("DERESTORE_MIRROR", server.url("/internal/"))
    hub.fetch(record(official))
    assert [h.path for h in server.hits] == ["/internal/toy.pth"]


def test_missing_mirror_falls_back_to_sources(server, monkeypatch):
    official = server.add("/w/toy.pth", PAYLOAD)
    monkeypatch.setenv("DERESTORE_MIRROR", server.url("/internal"))
    hub.fetch(record(official))
    assert [h.path for h in server.hits] == ["/internal/toy.pth", "/w/toy.pth"]


def test_local_path_relative_to_registry_file(tmp_path):
    (tmp_path / "toy.pth").write_bytes(PAYLOAD)
    rec = record("toy.pth", origin=str(tmp_path / "my.toml"))
    assert hub.fetch(rec).read_bytes() == PAYLOAD


def test_manual_only_record_explains_share_code_and_import():
    rec = record(
        sha256=None, name="derestormer-x", manual_url="https://pan.baidu.com/s/abc?pwd=t6w4", manual_code="t6w4"
    )
    with pytest.raises(ModelUnavailable) as info:
        hub.fetch(rec)
    message = str(info.value)
    assert "\n" not in message
    for part in ("https://pan.baidu.com/s/abc?pwd=t6w4", "t6w4", "`derestore weights import derestormer-x FILE`"):
        assert part in message


def test_failed_sources_also_point_to_manual_download(server):
    rec = record(server.url("/gone.pth"), name="drs", manual_url="https://pan.baidu.com/s/x", manual_code="ab12")
    with pytest.raises(ModelUnavailable, match=r"HTTP 404.*https://pan.baidu.com/s/x \(extraction code ab12\)"):
        hub.fetch(rec)


def test_bad_model_name_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot name a cache folder"):
        hub.target_path(record(name="../evil"))


# ---------------------------------------------------------------- Google Drive


def test_drive_confirmation_flow(server, monkeypatch):
    server.add_drive("1AbC", PAYLOAD)
    monkeypatch.setenv("DERESTORE_GDRIVE_URL", server.url("/uc"))
    path = hub.fetch(record("gdrive:1AbC"))
    assert path.read_bytes() == PAYLOAD
    first, second = server.hits
    assert first.path == "/uc" and "id=1AbC" in first.query
    assert second.path == "/download" and "confirm=t" in second.query and "uuid=" in second.query


def test_drive_quota_page_is_reported(server, monkeypatch):
    server.add_drive("1AbC", PAYLOAD)
    server.drive_quota_exceeded = True
    monkeypatch.setenv("DERESTORE_GDRIVE_URL", server.url("/uc"))
    with pytest.raises(ModelUnavailable, match="Too many users have viewed or downloaded"):
        hub.fetch(record("gdrive:1AbC"))


# ---------------------------------------------------------------- import


def test_import_pinned_file(tmp_path):
    good = tmp_path / "whatever-name.bin"
    good.write_bytes(PAYLOAD)
    rec = record()
    path = hub.import_file(rec, good, check_loads=lambda p: pytest.fail("pinned files need no load check"))
    assert path.read_bytes() == PAYLOAD and hub.cached_path(rec) == path
    assert hub.cache_entry(rec).source == f"import:{good.resolve()}"


def test_import_pinned_mismatch_imports_nothing(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not it")
    with pytest.raises(ModelUnavailable, match=DIGEST):
        hub.import_file(record(), bad)
    assert cache_files(tmp_path) == []


def test_import_unpinned_checks_that_the_file_loads(tmp_path):
    candidate = tmp_path / "share-file.pth"
    candidate.write_bytes(PAYLOAD)
    rec = record(sha256=None)
    seen: list[Path] = []

    def refuse(path: Path) -> None:
        seen.append(path)
        raise ModelUnavailable(f"{path} does not load as Toy")

    with pytest.raises(ModelUnavailable, match="does not load as Toy"):
        hub.import_file(rec, candidate, check_loads=refuse)
    assert seen == [candidate] and cache_files(tmp_path) == []

    path = hub.import_file(rec, candidate, check_loads=seen.append)
    assert hub.cache_entry(rec).sha256 == DIGEST and hub.cached_path(rec) == path


def test_import_over_a_bundled_model_is_refused(tmp_path):
    candidate = tmp_path / "mine.pth"
    candidate.write_bytes(PAYLOAD)
    rec = record(sha256=None, name="lite-toy", bundled="lite/toy.pth")
    with pytest.raises(UsageError, match="lite-toy ships with derestore"):
        hub.import_file(rec, candidate, check_loads=loads_anything)
    assert cache_files(tmp_path) == []


def test_import_unpinned_without_a_check_is_refused(tmp_path):
    candidate = tmp_path / "mine.pth"
    candidate.write_bytes(PAYLOAD)
    with pytest.raises(ModelUnavailable, match="no load check was given"):
        hub.import_file(record(sha256=None), candidate)
    assert cache_files(tmp_path) == []


def test_import_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        hub.import_file(record(), tmp_path / "nope.pth")


# ---------------------------------------------------------------- partial downloads of other writers


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leave_partial(tmp_path: Path, url: str, *, tag: str, pid: int, age: float = 0.0) -> Path:
    """A partial download of the first 1000 bytes as another writer leaves it, with its sidecar."""
    folder = tmp_path / "cache" / "checkpoints" / "toy"
    folder.mkdir(parents=True)
    part = folder / f".toy.pth.{hub.parse_source(url).key}.{'0' * 12}.incomplete.pth"
    part.write_bytes(PAYLOAD[:1000])
    sidecar = {"source": url, "url": url, "total": len(PAYLOAD), "validator": None, "tag": tag, "pid": pid}
    part.with_name(part.name + ".json").write_text(json.dumps(sidecar))
    if age:
        os.utime(part, (time.time() - age, time.time() - age))
    return part


def test_partial_sidecar_records_the_host_tag_and_pid(server, tmp_path, monkeypatch):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.fault("/w/toy.pth", "drop")
    monkeypatch.setenv("DERESTORE_RETRIES", "0")
    with pytest.raises(ModelUnavailable):
        hub.fetch(record(url))
    (sidecar,) = (tmp_path / "cache" / "checkpoints" / "toy").glob(".*.incomplete.pth.json")
    info = json.loads(sidecar.read_text())
    assert (info["tag"], info["pid"]) == (atomic.host_tag(), os.getpid())


def test_fresh_partial_from_another_pid_namespace_is_neither_taken_nor_deleted(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    part = leave_partial(tmp_path, url, tag="0badc0de", pid=dead_pid())  # its PID means nothing here
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert server.hits_for("/w/toy.pth")[0].range is None
    assert part.read_bytes() == PAYLOAD[:1000]


def test_partial_of_a_dead_writer_of_this_host_is_resumed(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    leave_partial(tmp_path, url, tag=atomic.host_tag(), pid=dead_pid())
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert [h.range for h in server.hits_for("/w/toy.pth")] == ["bytes=1000-"]
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]


def test_stale_partial_from_another_host_is_resumed(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    leave_partial(tmp_path, url, tag="0badc0de", pid=1, age=hub.STALE_SECONDS + 5)
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    assert [h.range for h in server.hits_for("/w/toy.pth")] == ["bytes=1000-"]


# ---------------------------------------------------------------- concurrency

WORKER = """
import sys, time
from pathlib import Path
from derestore import hub
from derestore.registry import ModelRecord
if sys.argv[3] == "nolock":
    import contextlib
    hub._lock = lambda record: contextlib.nullcontext()
go = Path(sys.argv[2])
Path(str(go) + "." + sys.argv[4]).touch()
while not go.exists():
    time.sleep(0.01)
rec = ModelRecord(name="toy", task="derain", arch="Toy", sources=(sys.argv[1],), filename="toy.pth")
print(hub.fetch(rec, check=lambda path: None))
"""


def run_workers(server, tmp_path, mode: str, n: int = 4) -> list[subprocess.CompletedProcess]:
    url = server.add("/w/toy.pth", PAYLOAD)
    server.throttle = 0.05  # ~0.8 s per transfer: every worker asks while the first is busy
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(go), mode, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_four_processes_one_download(server, tmp_path):
    results = run_workers(server, tmp_path, "lock")
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    paths = {r.stdout.strip() for r in results}
    assert paths == {str(tmp_path / "cache" / "checkpoints" / "toy" / "toy.pth")}
    assert server.full_transfers("/w/toy.pth") == 1
    assert len(server.hits_for("/w/toy.pth")) == 1
    assert hashlib.sha256(Path(paths.pop()).read_bytes()).hexdigest() == DIGEST
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]


def test_without_a_working_lock_duplicates_but_never_corrupts(server, tmp_path):
    results = run_workers(server, tmp_path, "nolock")
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    assert server.full_transfers("/w/toy.pth") >= 2  # the lock really was off
    path = tmp_path / "cache" / "checkpoints" / "toy" / "toy.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DIGEST
    assert hub.cache_entry(record(sha256=None)).sha256 == DIGEST
    assert hub.cached_path(record(sha256=None)) == path
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]


def test_killed_download_is_resumed_by_the_next_process(server, tmp_path):
    url = server.add("/w/toy.pth", PAYLOAD)
    server.throttle = 0.05
    go = tmp_path / "go"
    go.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(go), "lock", "0"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = tmp_path / "cache" / "checkpoints" / "toy"
    deadline = time.monotonic() + 30
    while not any(p.stat().st_size >= 4 << 16 for p in folder.glob(".*.incomplete.pth")):
        assert time.monotonic() < deadline and proc.poll() is None, "worker never got going"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    kept = sum(p.stat().st_size for p in folder.glob(".*.incomplete.pth"))

    server.throttle = 0
    assert hub.fetch(record(url)).read_bytes() == PAYLOAD
    resumed = server.hits_for("/w/toy.pth")[-1]
    assert resumed.range == f"bytes={kept}-" and resumed.status == 206
    assert cache_files(tmp_path) == ["toy/toy.pth", "toy/toy.pth.meta.json"]
