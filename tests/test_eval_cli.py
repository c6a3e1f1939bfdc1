"""`derestore eval`: pairing, unmatched files, failures, outputs and exit codes."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from derestore import metrics
from derestore.cli import eval_cmd
from derestore.errors import InputError
from derestore.evaluate import RunningMeans, pair_paths, score_output

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
GOPRO = REFERENCE["protocols"]["gopro"]
NAMES = sorted(REFERENCE["pairs"])


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test host for the eval command."""

    eval_cmd.register(app)
    return app


def run(*args: str | Path):
    return CliRunner().invoke(_app(), ["eval", *map(str, args)])


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    shutil.copytree(FIXTURES / "pairs" / "gt", gt)
    shutil.copytree(FIXTURES / "pairs" / "pred", pred)
    return gt, pred


def _write(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), rgb if rgb.ndim == 2 else rgb[:, :, ::-1])
    return path


@pytest.mark.parametrize("protocol", ["restormer", "rcdnet"])
def test_json_values_match_the_reference_for_y_protocols(dataset: tuple[Path, Path], protocol: str) -> None:
    gt, pred = dataset
    result = run("--gt", gt, "--pred", pred, "--protocol", protocol, "--json")
    assert result.exit_code == 0, result.stderr
    records = _json_lines(result.stdout)
    reference = REFERENCE["protocols"][protocol]["per_image"]
    for r in records[:-1]:
        expected, kind = reference[r["name"]], REFERENCE["pairs"][r["name"]]["kind"]
        if "error" in expected or (protocol, kind) == ("restormer", "rgb16"):
            assert r["warnings"]  # derestore's documented deviations say so
        elif expected["psnr"] == "inf":
            assert r["psnr"] is None and r["identical"] is True and r["ssim"] == 1.0
        else:
            assert abs(r["psnr"] - expected["psnr"]) <= 1e-4 and abs(r["ssim"] - expected["ssim"]) <= 1e-5
    finite = [r["psnr"] for r in records[:-1] if r["psnr"] is not None]
    assert records[-1]["mean"]["psnr"] == pytest.approx(sum(finite) / len(finite), abs=1e-9)
    assert records[-1]["count"] == 8 and records[-1]["protocol"] == protocol


def test_json_values_match_the_reference_and_schema(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    result = run("--gt", gt, "--pred", pred, "--protocol", "gopro", "--json")
    assert result.exit_code == 0, result.stderr
    records = _json_lines(result.stdout)
    pairs, final = records[:-1], records[-1]
    assert [r["name"] for r in pairs] == NAMES
    for r in pairs:
        assert {"name", "gt", "pred", "psnr", "ssim", "identical"} <= r.keys()
        assert Path(r["gt"]).parent == gt and Path(r["pred"]).parent == pred
        expected = GOPRO["per_image"][r["name"]]
        if expected["psnr"] == "inf":
            assert r["psnr"] is None and r["identical"] is True
        else:
            assert abs(r["psnr"] - expected["psnr"]) <= 1e-4 and r["identical"] is False
        assert abs(r["ssim"] - expected["ssim"]) <= 1e-5
    assert final["protocol"] == "gopro" and final["count"] == 8 and final["identical"] == 1
    finite = [v["psnr"] for v in GOPRO["per_image"].values() if v["psnr"] != "inf"]
    assert abs(final["mean"]["psnr"] - sum(finite) / len(finite)) <= 1e-4
    assert abs(final["mean"]["ssim"] - GOPRO["mean_all_pairs"]["ssim"]) <= 1e-5
    assert "identical" in result.stderr and "left out of the PSNR mean" in result.stderr


def test_default_output_is_a_table_of_means(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    result = run("--gt", gt, "--pred", pred, "--protocol", "rcdnet", "--per-image")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # no data asked for
    for name in NAMES:
        assert name in result.stderr
    # rcdnet's gray pair is scored with gray as Y, and says so.
    assert "used the gray values as Y" in result.stderr
    assert "mean of 8" in result.stderr


def test_unmatched_files_are_listed_and_exit_1(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    (pred / "v03_rgb_101x77_noise40.png").unlink()
    shutil.copy(pred / "v01_rgb_97x131_noise5.png", pred / "extra.png")
    result = run("--gt", gt, "--pred", pred, "--json")
    assert result.exit_code == 1
    assert "no prediction for" in result.stderr and "v03_rgb_101x77_noise40.png" in result.stderr
    assert "no ground truth for" in result.stderr and "extra.png" in result.stderr
    records = _json_lines(result.stdout)
    assert len(records) == 8 and records[-1]["count"] == 7  # the matched pairs are still scored
    assert records[-1]["unmatched_gt"] == [str(gt / "v03_rgb_101x77_noise40.png")]
    assert records[-1]["unmatched_pred"] == [str(pred / "extra.png")]


def test_pairing_is_by_stem_case_sensitive_any_extension(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    img = rng.integers(0, 250, (40, 50, 3), dtype=np.uint8)
    _write(tmp_path / "gt" / "img2.png", img)
    _write(tmp_path / "pred" / "img2.bmp", img + 3)  # lossless, other extension
    _write(tmp_path / "gt" / "img10.png", img)
    _write(tmp_path / "pred" / "img10.tif", img)
    _write(tmp_path / "gt" / "Rain.png", img)
    _write(tmp_path / "pred" / "rain.png", img)
    pairing = pair_paths(tmp_path / "gt", tmp_path / "pred")
    assert [(p.name, p.gt.name, p.pred.name) for p in pairing.pairs] == [
        ("img2", "img2.png", "img2.bmp"),
        ("img10", "img10.png", "img10.tif"),
    ]
    assert [p.name for p in pairing.unmatched_gt] == ["Rain.png"]
    assert [p.name for p in pairing.unmatched_pred] == ["rain.png"]
    result = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--json", "--protocol", "rgb")
    assert result.exit_code == 1
    first, second = _json_lines(result.stdout)[:2]
    assert first["name"] == "img2" and first["psnr"] == pytest.approx(10 * math.log10(255**2 / 9), abs=1e-9)
    assert second["name"] == "img10" and second["identical"] is True


def test_match_maps_prediction_names_to_gt_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    for i in (1, 2, 3):
        img = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
        _write(tmp_path / "gt" / f"norain-{i}.png", img)
        _write(tmp_path / "pred" / f"norain-{i}x2.png", img ^ 1)
    plain = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--json")
    assert plain.exit_code == 1 and _json_lines(plain.stdout)[-1]["count"] == 0
    for pattern in (r"(norain-\d+)", r"(norain-\d+)x2", r"(?P<key>\d+)"):
        result = run("--gt", tmp_path / "gt", "--pred", tmp_path / "pred", "--json", "--match", pattern)
        assert result.exit_code == 0, (pattern, result.stderr)
        records = _json_lines(result.stdout)
        assert [Path(r["pred"]).name for r in records[:-1]] == ["norain-1x2.png", "norain-2x2.png", "norain-3x2.png"]
        assert [Path(r["gt"]).name for r in records[:-1]] == ["norain-1.png", "norain-2.png", "norain-3.png"]
        assert records[-1]["count"] == 3


def test_match_group_that_took_no_part_keeps_the_stem(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    img = np.zeros((20, 20, 3), np.uint8)
    for side in ("gt", "pred"):
        _write(tmp_path / side / "norain-1.png", img)
    pairing = pair_paths(tmp_path / "gt", tmp_path / "pred", match=r"(x)?norain")
    assert [p.name for p in pairing.pairs] == ["norain-1"] and pairing.complete


def test_two_names_for_one_key_are_not_guessed(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    shutil.copy(pred / "v01_rgb_97x131_noise5.png", pred / "v01_rgb_97x131_noise5.bmp")
    result = run("--gt", gt, "--pred", pred, "--json")
    assert result.exit_code == 1
    assert "2 files pair as 'v01_rgb_97x131_noise5'" in result.stderr
    assert _json_lines(result.stdout)[-1]["count"] == 7


def test_size_mismatch_fails_that_pair_only(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    name = "v02_rgb_128x160_noise15.png"
    img = cv2.imread(str(pred / name), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(pred / name), img[:-2])
    (pred / "v04_rgb_97x131_offset7.png").write_bytes(b"not a png")
    result = run("--gt", gt, "--pred", pred, "--json", "--protocol", "gopro")
    assert result.exit_code == 1
    records = _json_lines(result.stdout)
    failed = {r["name"]: r for r in records[:-1] if "error" in r}
    assert set(failed) == {"v02_rgb_128x160_noise15", "v04_rgb_97x131_offset7"}
    assert "size mismatch" in failed["v02_rgb_128x160_noise15"]["error"]
    assert failed["v02_rgb_128x160_noise15"]["psnr"] is None
    assert str(pred / "v04_rgb_97x131_offset7.png") in failed["v04_rgb_97x131_offset7"]["error"]
    assert records[-1]["count"] == 6 and records[-1]["failed"] == 2
    assert "size mismatch" in result.stderr


def test_two_single_files(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    name = "v08_rgb_389x517_blurnoise"
    renamed = shutil.copy(pred / f"{name}.png", pred.parent / "restored.png")
    result = run("--gt", gt / f"{name}.png", "--pred", renamed, "--json", "--protocol", "restormer")
    assert result.exit_code == 0, result.stderr
    record, final = _json_lines(result.stdout)
    expected = REFERENCE["protocols"]["restormer"]["per_image"][name]
    assert abs(record["psnr"] - expected["psnr"]) <= 1e-4 and abs(record["ssim"] - expected["ssim"]) <= 1e-5
    assert final["count"] == 1 and final["mean"]["psnr"] == record["psnr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "matlab"], "restormer, rcdnet, gopro, rgb"),
        (["--match", "(unclosed"], "not a valid regular expression"),
        (["--csv", "missing-dir/out.csv"], "does not exist"),
        (["--report", "missing-dir/out.html"], "does not exist"),
        (["--crop-border", "-1"], "--crop-border -1: must not be negative"),
        (["--workers", "-2"], "--workers -2: must be 0 (one per CPU core) or more"),
        (["--csv", "."], "is a folder"),
        (["--report", "."], "is a folder"),
    ],
)
def test_usage_errors_exit_2_with_one_line(dataset: tuple[Path, Path], args: list[str], message: str) -> None:
    gt, pred = dataset
    result = run("--gt", gt, "--pred", pred, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_one_file_against_a_folder_and_clashing_outputs_exit_2(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt, pred = dataset
    result = run("--gt", gt / "v01_rgb_97x131_noise5.png", "--pred", pred)
    assert result.exit_code == 2 and "is one image but --pred" in result.stderr
    same = tmp_path / "out.html"
    result = run("--gt", gt, "--pred", pred, "--csv", same, "--report", same)
    assert result.exit_code == 2 and "both name" in result.stderr and not same.exists()


def test_one_prediction_against_a_gt_folder(dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    result = run("--gt", gt, "--pred", pred / "v03_rgb_101x77_noise40.png", "--json", "--protocol", "rcdnet")
    assert result.exit_code == 0, result.stderr  # the folder's other images are not missing anything
    record, final = _json_lines(result.stdout)
    expected = REFERENCE["protocols"]["rcdnet"]["per_image"]["v03_rgb_101x77_noise40"]
    assert abs(record["psnr"] - expected["psnr"]) <= 1e-4 and final["count"] == 1


def test_missing_or_empty_folders_exit_2(tmp_path: Path, dataset: tuple[Path, Path]) -> None:
    gt, pred = dataset
    missing = run("--gt", tmp_path / "nope", "--pred", pred)
    assert missing.exit_code == 2 and "no such file or folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run("--gt", gt, "--pred", tmp_path / "empty")
    assert empty.exit_code == 2 and "no images" in empty.stderr


def test_csv_has_one_row_per_pair(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt, pred = dataset
    out = tmp_path / "scores.csv"
    umask = os.umask(0o022)
    try:
        result = run("--gt", gt, "--pred", pred, "--protocol", "gopro", "--csv", out)
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o644  # the usual permissions, not a temp file's 0600
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == NAMES
    by_name = {r["name"]: r for r in rows}
    assert by_name["v06_rgb_64x80_identical"]["psnr"] == "inf"
    assert by_name["v06_rgb_64x80_identical"]["identical"] == "true"
    v01 = GOPRO["per_image"]["v01_rgb_97x131_noise5"]
    assert abs(float(by_name["v01_rgb_97x131_noise5"]["psnr"]) - v01["psnr"]) <= 1e-4
    assert not list(tmp_path.glob(".scores.csv.*"))  # no temp file left behind


def test_a_failed_write_leaves_nothing_and_says_so(
    dataset: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gt, pred = dataset

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    result = run("--gt", gt, "--pred", pred, "--report", tmp_path / "eval.html")
    assert result.exit_code == 1
    assert "--report" in result.stderr and "cannot write: No space left on device" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]  # no report, no temp file


def test_html_report_is_self_contained(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    gt, pred = dataset
    out = tmp_path / "eval.html"
    result = run("--gt", gt, "--pred", pred, "--protocol", "gopro", "--report", out)
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Means, the sortable table with one row per pair, the histogram, the worst pairs.
    mean_ssim = GOPRO["mean_all_pairs"]["ssim"]
    assert f"{mean_ssim:.4f}" in page
    assert 'class="sortable"' in page and "addEventListener" in page
    assert page.count("<tr><td>") == 8
    for name in NAMES:
        assert name in page
    assert "<svg" in page and page.count("<rect") == 20
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 * 6  # GT | prediction | difference for the 6 worst of 7 finite pairs
    worst = min((v["psnr"], n) for n, v in GOPRO["per_image"].items() if v["psnr"] != "inf")[1]
    assert page.index(worst) < page.index("Per image")  # lowest PSNR shown first
    decoded = cv2.imdecode(np.frombuffer(__import__("base64").b64decode(images[0]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and max(decoded.shape[:2]) <= 320
    # No external resources of any kind.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "@import" not in page and "url(" not in page


def test_protocol_names_in_help_match_the_metrics_module() -> None:
    assert eval_cmd.PROTOCOL_NAMES == tuple(metrics.PROTOCOLS)
    result = CliRunner().invoke(_app(), ["eval", "--help"])
    assert result.exit_code == 0
    for name in metrics.PROTOCOLS:
        assert name in result.stdout


def test_score_output_and_running_means() -> None:
    name = "v01_rgb_97x131_noise5"
    pred = cv2.imread(str(FIXTURES / "pairs" / "pred" / f"{name}.png"))[:, :, ::-1]
    value = score_output(pred, FIXTURES / "pairs" / "gt" / f"{name}.png", protocol="restormer", crop_border=0)
    expected = REFERENCE["protocols"]["restormer"]["per_image"][name]
    assert abs(value.psnr - expected["psnr"]) <= 1e-4 and abs(value.ssim - expected["ssim"]) <= 1e-5
    with pytest.raises(InputError, match=f"{name}.png: size mismatch"):
        score_output(pred[1:], FIXTURES / "pairs" / "gt" / f"{name}.png", protocol="restormer", crop_border=0)
    means = RunningMeans()
    means.add(value)
    means.add(metrics.Score(psnr=math.inf, ssim=1.0, identical=True))
    assert means.psnr == value.psnr and means.ssim == pytest.approx((value.ssim + 1) / 2)
    record = means.record("restormer")
    assert record == {"mean": {"psnr": value.psnr, "ssim": means.ssim}, "count": 2, "identical": 1, "protocol": "restormer"}
