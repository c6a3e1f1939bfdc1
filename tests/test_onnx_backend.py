"""The ONNX Runtime backend: chosen where exact and faster, measured once per checkpoint and machine, a clean
fallback to PyTorch elsewhere; and `derestore export`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

pytest.importorskip("onnxruntime")

import derestore  # noqa: E402
from derestore import onnx_backend, stats_choice  # noqa: E402
from derestore.engine import Engine  # noqa: E402
from derestore.errors import ModelUnavailable, UsageError  # noqa: E402
from derestore.hub import sha256_file  # noqa: E402
from derestore.loading import load_model  # noqa: E402

from .conftest import nafnet_state, save_checkpoint, smooth_image, timings, to_uint  # noqa: E402
from .test_cli_restore import invoke, read_any  # noqa: E402

# Measured: ONNX Runtime reproduces PyTorch to 1e-7–4e-7 on these networks; outputs are compared at 1e-5.
MATCH = 1e-5


# Every test here: its own cache, and NAFNet's published (global) statistics — local ones stay on
# PyTorch (see tests/test_local_stats.py).
pytestmark = pytest.mark.usefixtures("onnx_cache", "published_statistics")


@pytest.fixture
def naf(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "naf.pth", nafnet_state(), "params")


@pytest.fixture
def exports(monkeypatch) -> list[str]:
    """Every export made, by architecture."""
    made: list[str] = []
    real = onnx_backend.export

    def counting(descriptor):
        made.append(descriptor.architecture.id)
        return real(descriptor)

    monkeypatch.setattr(onnx_backend, "export", counting)
    return made


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return smooth_image(h, w, seed=seed).transpose(2, 0, 1).astype(np.float32)


def test_auto_runs_onnxruntime_where_faster_and_matches_pytorch(naf, onnx_faster, caplog):
    caplog.set_level("INFO", logger="derestore")
    fast = derestore.load(weights=naf, device="cpu")
    reference = derestore.load(weights=naf, device="cpu", backend="torch")
    assert fast.engine.backend == "onnxruntime" and reference.engine.backend == "torch"
    img = image(52, 76)
    out, _ = fast.restore_array(img, tile=0)
    expected, _ = reference.restore_array(img, tile=0)
    assert out.shape == img.shape
    assert np.abs(out - expected).max() <= MATCH
    assert np.abs(out - img).mean() > 1e-3  # the network does change the image
    verdict = fast.engine.backend_verdict
    assert verdict.exact and verdict.max_abs_diff <= 1e-6
    assert any("backend: onnxruntime for NAFNet" in r.getMessage() and "2.00× faster" in r.getMessage()
               for r in caplog.records)


def test_second_load_reads_the_cache_and_exports_nothing(naf, onnx_cache, exports, onnx_faster, monkeypatch):
    first = derestore.load(weights=naf, device="cpu")
    assert exports == ["NAFNet"]
    onnx_files, verdicts = list(onnx_cache.glob("*.onnx")), list(onnx_cache.glob("*.ort-*.json"))
    assert len(onnx_files) == 1 and len(verdicts) == 1
    sha = sha256_file(naf)
    assert onnx_files[0].name.startswith(sha[:32]) and ".opset18." in onnx_files[0].name
    record = json.loads(verdicts[0].read_text())
    assert record["sha256"] == sha and record["opset"] == 18
    assert record["onnxruntime"] == onnx_backend.onnxruntime().__version__

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached checkpoint is timed again")

    monkeypatch.setattr(onnx_backend, "time_candidates", no_timing)
    second = derestore.load(weights=naf, device="cpu")
    assert exports == ["NAFNet"]
    assert second.engine.backend == first.engine.backend
    assert second.engine.backend_verdict == first.engine.backend_verdict


def test_a_lost_export_is_made_again_when_onnxruntime_was_chosen(naf, onnx_cache, exports, onnx_faster):
    derestore.load(weights=naf, device="cpu")
    (onnx_file,) = onnx_cache.glob("*.onnx")
    onnx_file.write_bytes(b"truncated")
    again = derestore.load(weights=naf, device="cpu")
    assert exports == ["NAFNet", "NAFNet"] and again.engine.backend == "onnxruntime"
    out, _ = again.restore_array(image(32, 40), tile=0)
    assert np.isfinite(out).all()


def test_timing_keeps_each_candidates_best_and_repeats_short_calls():
    import time

    calls = {"fast": 0, "slow": 0}

    def sleeper(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return run

    best = onnx_backend.time_candidates({"fast": sleeper("fast", 0.01), "slow": sleeper("slow", 0.03)},
                                        min_seconds=0.05)
    assert 0.01 <= best["fast"] < 0.025 and 0.03 <= best["slow"] < 0.06
    assert calls["fast"] >= 1 + 3  # a warm-up, then rounds until 0.05 s were spent on each
    calls.update(fast=0, slow=0)
    onnx_backend.time_candidates({"fast": sleeper("fast", 0.12), "slow": sleeper("slow", 0.3)})
    assert calls == {"fast": 2, "slow": 2}  # a warm-up and one round: a clear winner at calls long enough
    calls.update(fast=0, slow=0)
    best = onnx_backend.time_candidates({"fast": sleeper("fast", 0.06), "slow": sleeper("slow", 0.08)},
                                        long_call=0.05)
    assert calls == {"fast": 1, "slow": 1} and best["fast"] < best["slow"]  # long calls: the warm-up is the sample


def test_auto_keeps_pytorch_where_onnxruntime_is_not_faster_and_says_why(naf, monkeypatch, caplog):
    caplog.set_level("INFO", logger="derestore")
    monkeypatch.setattr(onnx_backend, "time_candidates", timings(contiguous=1.0, channels_last=1.2, onnxruntime=0.99))
    model = derestore.load(weights=naf, device="cpu")
    assert model.engine.backend == "torch" and not model.engine.channels_last
    assert any("backend: torch for NAFNet" in r.getMessage() and "not faster than PyTorch" in r.getMessage()
               for r in caplog.records)


def test_layout_auto_takes_the_layout_measured_faster_here(naf, onnx_cache, monkeypatch):
    monkeypatch.setattr(onnx_backend, "time_candidates", timings(contiguous=1.0, channels_last=0.5))
    assert derestore.load(weights=naf, device="cpu", backend="torch").engine.channels_last
    for path in onnx_cache.iterdir():
        path.unlink()
    monkeypatch.setattr(onnx_backend, "time_candidates", timings(contiguous=0.5, channels_last=1.0))
    model = derestore.load(weights=naf, device="cpu", backend="torch")
    assert not model.engine.channels_last
    assert next(model.engine.descriptor.model.parameters()).is_contiguous()


def test_backend_torch_with_a_fixed_layout_measures_and_exports_nothing(naf, onnx_cache, exports):
    model = derestore.load(weights=naf, device="cpu", backend="torch", layout="contiguous")
    assert model.engine.backend == "torch" and model.engine.backend_verdict is None
    assert exports == [] and not onnx_cache.exists()


def test_explicit_onnxruntime_runs_even_where_not_faster(naf, monkeypatch):
    monkeypatch.setattr(onnx_backend, "time_candidates", timings(contiguous=0.1, channels_last=0.1, onnxruntime=1.0))
    assert derestore.load(weights=naf, device="cpu", backend="onnxruntime").engine.backend == "onnxruntime"


def tiny_derestormer(path: Path) -> Path:
    from .test_arch_derestormer import TINY, tiny_state_dict

    return save_checkpoint(path, tiny_state_dict(**TINY), "params")


def test_derestormer_does_not_export_and_runs_on_pytorch_unchanged(tmp_path, onnx_faster, caplog):
    caplog.set_level("INFO", logger="derestore")
    ckpt = tiny_derestormer(tmp_path / "derestormer.pth")
    auto = derestore.load(weights=ckpt, device="cpu")
    torch_only = derestore.load(weights=ckpt, device="cpu", backend="torch")
    assert auto.engine.backend == "torch"
    assert "does not export to ONNX" in auto.engine.backend_verdict.export_error
    assert "fft_rfft2" in auto.engine.backend_verdict.export_error
    assert any("backend: torch for DeRestormer" in r.getMessage() for r in caplog.records)
    img = image(48, 48)
    np.testing.assert_allclose(auto.restore_array(img, tile=0)[0], torch_only.restore_array(img, tile=0)[0],
                               atol=1e-6)
    with pytest.raises(ModelUnavailable, match="does not export to ONNX"):
        derestore.load(weights=ckpt, device="cpu", backend="onnxruntime")


class FrozenWidth(torch.nn.Module):
    """Splits the image at half its width with a Python int: tracing freezes the split at the traced width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        half = int(y.shape[-1]) // 2
        return torch.cat([y[..., :half], 0.5 * y[..., half:]], dim=-1)


class Unexportable(torch.nn.Module):
    """An operation the ONNX exporter has no translation for (as DeRestormer's FFT)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(x), s=x.shape[-2:]) * 0.9


def descriptor_of(module: torch.nn.Module):
    from spandrel import ImageModelDescriptor, MAIN_REGISTRY

    arch = MAIN_REGISTRY.get("DnCNN").architecture
    return ImageModelDescriptor(module.eval(), module.state_dict(), architecture=arch, purpose="Restoration", tags=[],
                                supports_half=True, supports_bfloat16=True, scale=1, input_channels=3,
                                output_channels=3)


@pytest.mark.parametrize("module, words", [(FrozenWidth, "differs from PyTorch"),
                                           (Unexportable, "does not export to ONNX")])
def test_a_graph_that_is_not_exact_or_does_not_export_leaves_pytorch_running(module, words, caplog):
    caplog.set_level("INFO", logger="derestore")
    torch.manual_seed(0)
    engine = Engine.create(descriptor_of(module()), device="cpu", checkpoint_sha256="ab" * 32)
    assert engine.backend == "torch"
    assert any(words in r.getMessage() for r in caplog.records)
    img = image(40, 56)
    with torch.inference_mode():
        expected = module.forward(engine.descriptor.model, torch.from_numpy(img)[None]).clamp(0, 1)[0].numpy()
    np.testing.assert_allclose(engine.restore(img), expected, atol=1e-6)


def test_frozen_width_is_caught_at_a_shape_the_export_did_not_see():
    torch.manual_seed(0)
    descriptor = descriptor_of(FrozenWidth())
    network = onnx_backend.OnnxNetwork(onnx_backend.export(descriptor),
                                       onnx_backend.provider_for(torch.device("cpu"), []), descriptor)
    shapes = onnx_backend.ProbeShapes.of(onnx_backend.NetworkFacts.of(descriptor))
    assert onnx_backend.verify(descriptor, network, (2, 3, 64, 64)) <= 1e-6  # the traced width: exact
    assert shapes.verify[0] != shapes.export[0] and shapes.verify[3] not in shapes.export[2:]
    assert onnx_backend.verify(descriptor, network) > 1e-2


def restormer_state() -> dict[str, torch.Tensor]:
    from spandrel_extra_arches.architectures.Restormer import Restormer

    torch.manual_seed(0)
    return Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1]).state_dict()


# NAFNet pads odd sizes inside its graph; Restormer needs multiples of 8, to which the engine pads.
@pytest.mark.parametrize("state, multiple", [(nafnet_state, 1), (restormer_state, 8)])
def test_batched_odd_sized_tiles_match_pytorch(tmp_path, onnx_faster, state, multiple):
    ckpt = save_checkpoint(tmp_path / "net.pth", state())
    fast = Engine.create(load_model(ckpt).descriptor, device="cpu", batch_size=3, checkpoint_sha256="cd" * 32)
    slow = Engine.create(load_model(ckpt).descriptor, device="cpu", batch_size=3, backend="torch")
    assert fast.backend == "onnxruntime" and fast.descriptor.size_requirements.multiple_of == multiple
    img = image(37, 53, seed=3)
    for tile in (0, 24):
        out = fast.restore(img, tile=tile, overlap=4)
        assert out.shape == img.shape
        np.testing.assert_allclose(out, slow.restore(img, tile=tile, overlap=4), atol=MATCH)


def test_grayscale_network_restores_each_plane_on_onnxruntime(tmp_path, onnx_faster):
    from spandrel.architectures.DnCNN import DnCNN

    torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path / "gray.pth", DnCNN(in_nc=1, out_nc=1, nc=8, nb=4).state_dict())
    fast = derestore.load(weights=ckpt, device="cpu")
    slow = derestore.load(weights=ckpt, device="cpu", backend="torch")
    assert fast.engine.descriptor.input_channels == 1 and fast.engine.backend == "onnxruntime"
    img = image(30, 44, seed=2)
    np.testing.assert_allclose(fast.restore_array(img, tile=0)[0], slow.restore_array(img, tile=0)[0], atol=MATCH)


def test_session_threads_follow_torch_and_the_library_leaves_them_alone(naf, onnx_faster):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = derestore.load(weights=naf, device="cpu").engine
        assert torch.get_num_threads() == 1
        assert engine.onnx.session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_without_onnxruntime_auto_runs_pytorch_and_onnxruntime_is_refused(naf, monkeypatch, caplog):
    caplog.set_level("INFO", logger="derestore")
    monkeypatch.setattr(onnx_backend, "onnxruntime", lambda: None)
    assert derestore.load(weights=naf, device="cpu").engine.backend == "torch"
    assert any("onnxruntime or onnx is not installed" in r.getMessage() for r in caplog.records)
    with pytest.raises(UsageError, match="onnxruntime or onnx is not installed"):
        derestore.load(weights=naf, device="cpu", backend="onnxruntime")


def test_gpu_providers_are_used_only_where_the_build_has_them():
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert onnx_backend.provider_for(torch.device("cuda", 1), cpu_only) is None
    assert onnx_backend.provider_for(torch.device("mps"), cpu_only) is None
    cuda = onnx_backend.provider_for(torch.device("cuda", 1), ["CUDAExecutionProvider", *cpu_only])
    assert (cuda.name, cuda.options) == ("CUDAExecutionProvider", {"device_id": 1})
    assert cuda.device == torch.device("cuda", 1)
    coreml = onnx_backend.provider_for(torch.device("mps"), ["CoreMLExecutionProvider", *cpu_only])
    assert coreml.name == "CoreMLExecutionProvider" and coreml.device == torch.device("cpu")


@pytest.mark.parametrize("options, words", [
    ({"backend": "tensorrt"}, "backend='tensorrt' is not one of auto, torch, onnxruntime"),
    ({"backend": "onnxruntime", "precision": "fp16"}, "runs fp32 only"),
    ({"backend": "onnxruntime", "compile": True}, "torch.compile"),
])
def test_bad_backend_options_are_refused_before_loading(naf, exports, options, words):
    with pytest.raises(UsageError, match=words):
        derestore.load(weights=naf, device="cpu", **options)
    assert exports == []


@pytest.fixture
def folder(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(to_uint(smooth_image(44, 60, seed=7))).save(src / "a.png")
    return src


def test_cli_backends_give_the_same_image_and_the_run_record_says_which(tmp_path, folder, naf, onnx_faster):
    outs = {}
    for backend in ("torch", "onnxruntime", "auto"):
        res = invoke("denoise", folder, "-o", tmp_path / backend, "--weights", naf, "--backend", backend)
        assert res.exit_code == 0, res.output
        outs[backend] = read_any(tmp_path / backend / "a.png").astype(int)
        record = json.loads((tmp_path / backend / "derestore-run.json").read_text())
        assert record["options"]["backend"] == backend
    assert np.abs(outs["torch"] - outs["onnxruntime"]).max() <= 1
    assert np.array_equal(outs["onnxruntime"], outs["auto"])


def test_cli_bad_backend_exits_2_before_any_output(tmp_path, folder, naf):
    res = invoke("denoise", folder, "-o", tmp_path / "o", "--weights", naf, "--backend", "gpu")
    assert res.exit_code == 2 and "backend" in res.stderr and "auto, torch, onnxruntime" in res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_onnxruntime_for_an_unexportable_model_exits_3_in_one_line(tmp_path, folder, onnx_faster):
    ckpt = tiny_derestormer(tmp_path / "derestormer.pth")
    res = invoke("desnow", folder, "-o", tmp_path / "o", "--weights", ckpt, "--backend", "onnxruntime", "-q")
    assert res.exit_code == 3
    assert "does not export to ONNX" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_export_writes_a_verified_file_that_reproduces_pytorch(tmp_path, naf):
    import onnxruntime

    target = tmp_path / "deploy" / "naf.onnx"
    res = invoke("export", "--weights", naf, "-o", target, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["output"] == str(target) and info["bytes"] == target.stat().st_size
    assert info["arch"] == "NAFNet" and info["opset"] == 18 and info["max_abs_diff"] <= 1e-6
    assert "matches PyTorch" in res.stderr
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["derestore.multiple_of"] == "1" and meta["derestore.architecture"] == "NAFNet"
    x = torch.from_numpy(np.stack([image(36, 60, seed=1), image(36, 60, seed=2)]))  # a batch at a new size
    (out,) = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        expected = load_model(naf).descriptor(x).numpy()
    assert out.shape == expected.shape and np.abs(out - expected).max() <= MATCH


def test_export_into_a_folder_names_the_file_after_the_model(tmp_path, naf):
    (tmp_path / "out").mkdir()
    assert invoke("export", "--weights", naf, "-o", tmp_path / "out", "-q").exit_code == 0
    assert (tmp_path / "out" / "naf.onnx").stat().st_size > 10_000


def test_export_of_an_unexportable_model_exits_3_and_writes_nothing(tmp_path):
    ckpt = tiny_derestormer(tmp_path / "derestormer.pth")
    res = invoke("export", "--weights", ckpt, "-o", tmp_path / "d.onnx")
    assert res.exit_code == 3
    assert "does not export to ONNX" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.glob("*.onnx")) == [] and list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize("args, words", [
    ([], "name a registry model"),
    (["lite-derain", "--weights", "{naf}"], "one of them"),
    (["--weights", "{naf}", "-o", "{naf}"], "never overwritten"),
    (["no-such-model"], "unknown model"),
])
def test_export_usage_errors_exit_2(tmp_path, naf, args, words):
    args = [str(naf) if a == "{naf}" else a for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "x.onnx")]
    before = naf.read_bytes()
    res = invoke("export", *args)
    assert res.exit_code == 2 and words in res.stderr, res.output
    assert naf.read_bytes() == before and not (tmp_path / "x.onnx").exists()


def test_local_statistics_keep_auto_on_pytorch_and_say_why(naf, onnx_faster, exports, caplog):
    caplog.set_level("INFO", logger="derestore")
    model = derestore.load(weights=naf, device="cpu", stats="local")
    assert model.engine.backend == "torch" and exports == []
    assert any("backend: torch (local statistics pick their windows by the input's size" in r.getMessage()
               for r in caplog.records)


def test_export_writes_the_published_network_whatever_the_records_statistics(tmp_path, monkeypatch):
    monkeypatch.setitem(stats_choice.DEFAULT_STATS, "NAFNet", "local")
    target = tmp_path / "lite.onnx"
    res = invoke("export", "lite-derain", "-o", target, "-q")
    assert res.exit_code == 0, res.output
    ort = onnx_backend.onnxruntime()
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    x = image(640, 640, seed=2)[None]  # larger than lite-derain's 576 px local window
    published = derestore.load(model="lite-derain", device="cpu", backend="torch", stats="global")
    expected, _ = published.restore_array(x[0], tile=0)
    out = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    assert np.abs(out - expected).max() <= MATCH


@pytest.mark.parametrize("first,typical,probes", [
    (0.1, 0, ["1×3×256×256", "1×3×768×1024"]),  # quick: timed again as a whole photo
    (0.1, 384, ["1×3×256×256", "1×3×384×384"]),  # quick: timed again at the tile runs will use
    (0.9, 0, ["1×3×256×256"]),  # slow at 256²: that measurement stands
])
def test_quick_networks_are_timed_again_at_their_working_size(naf, onnx_cache, monkeypatch, first, typical, probes):
    shapes = []
    real = onnx_backend.probe_batch

    def recording(shape, device):
        shapes.append("×".join(map(str, shape)))
        return real(shape, device)

    calls = []

    def fake(candidates, **_):
        calls.append(len(calls))
        slow = first if len(calls) == 1 else 1.0
        return {"contiguous": slow, "channels_last": slow, "onnxruntime": slow / 2}

    monkeypatch.setattr(onnx_backend, "probe_batch", recording)
    monkeypatch.setattr(onnx_backend, "time_candidates", fake)
    model = derestore.load(weights=naf, device="cpu", typical_tile=typical)
    timed = [s for s in shapes if s.startswith("1×") and int(s.split("×")[2]) >= 256]  # not the export's
    assert timed == probes and model.engine.backend_verdict.probe == probes[-1]
    shapes.clear()
    again = derestore.load(weights=naf, device="cpu", typical_tile=typical)  # the cached verdict suffices
    assert shapes == [] and again.engine.backend == "onnxruntime"


@pytest.mark.parametrize("state, norm, fused", [
    (nafnet_state, "LayerNorm2d", True),
    (restormer_state, "LayerNorm", True),
    (lambda: restormer_bias_free_state(), "LayerNorm", False),
])
def test_layer_norms_export_as_one_node_and_the_network_is_left_as_it_was(tmp_path, state, norm, fused):
    import onnx

    descriptor = load_model(save_checkpoint(tmp_path / "net.pth", state())).descriptor
    norms = [m for m in descriptor.model.modules() if type(m).__name__ == norm]
    assert norms
    graph = onnx.load_from_string(onnx_backend.export(descriptor)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("LayerNormalization") == (len(norms) if fused else 0)
    assert all("forward" not in vars(m) for m in norms)  # the trace's forms are gone again
    assert onnx_backend.verify(descriptor, onnx_backend.OnnxNetwork(
        onnx_backend.export(descriptor), onnx_backend.provider_for(torch.device("cpu"), []), descriptor)) <= 1e-5


def restormer_bias_free_state() -> dict[str, torch.Tensor]:
    from spandrel_extra_arches.architectures.Restormer import Restormer

    torch.manual_seed(0)
    return Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1],
                     LayerNorm_type="BiasFree").state_dict()
