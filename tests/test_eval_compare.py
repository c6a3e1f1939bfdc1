"""`derestore eval` with several --pred: values equal to single runs, the bootstrap, JSON/CSV/report/terminal."""

from __future__ import annotations

import base64
import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import derestore
from derestore import evaluate
from derestore.cli import eval_cmd
from derestore.errors import UsageError
from derestore.evaluate import Comparison, Summary, bootstrap_interval, parse_prediction
from derestore.metrics import Score

from .test_eval_cli import _json_lines, run

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
NAMES = sorted(p.stem for p in (FIXTURES / "pairs" / "gt").iterdir())
TEN_LOG_4 = 10 * math.log10(4)  # the PSNR gain of halving a constant error




def _write(path: Path, pixels: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), pixels if pixels.ndim == 2 else pixels[:, :, ::-1])
    return path


def _noisy(src: Path, dst: Path, sigma: float, seed: int) -> None:
    a = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    noise = np.random.default_rng(seed).normal(0, sigma * (257 if a.dtype == np.uint16 else 1), a.shape)
    cv2.imwrite(str(dst), np.clip(a + noise, 0, np.iinfo(a.dtype).max).astype(a.dtype))


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """gt/ and three prediction folders: A (the fixture's), B (noisier, one image missing, one extra),
    C (another noise, one image the wrong size, one identical to its ground truth)."""
    gt, a, b, c = (tmp_path / n for n in ("gt", "A", "B", "C"))
    shutil.copytree(FIXTURES / "pairs" / "gt", gt)
    shutil.copytree(FIXTURES / "pairs" / "pred", a)
    b.mkdir(), c.mkdir()
    for i, name in enumerate(NAMES):
        _noisy(gt / f"{name}.png", b / f"{name}.png", 3, i)
        _noisy(gt / f"{name}.png", c / f"{name}.png", 8, 100 + i)
    (b / "v03_rgb_101x77_noise40.png").unlink()
    shutil.copy(b / "v01_rgb_97x131_noise5.png", b / "extra.png")
    shrunk = cv2.imread(str(c / "v02_rgb_128x160_noise15.png"), cv2.IMREAD_UNCHANGED)[:-2]
    cv2.imwrite(str(c / "v02_rgb_128x160_noise15.png"), shrunk)
    shutil.copy(gt / "v08_rgb_389x517_blurnoise.png", c / "v08_rgb_389x517_blurnoise.png")
    return gt, a, b, c


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("protocol", ["restormer", "rcdnet", "gopro", "rgb"])
def test_per_image_values_and_summaries_equal_single_runs_exactly(
    models: tuple[Path, Path, Path, Path], protocol: str
) -> None:
    gt, *preds = models
    both = run("--gt", gt, *(x for p in preds for x in ("--pred", p)), "--protocol", protocol, "--json")
    assert both.exit_code == 1, both.stderr  # B lacks a file and has an extra one; C has a failed pair
    records = _json_lines(both.stdout)
    for folder in preds:
        alone = run("--gt", gt, "--pred", folder, "--protocol", protocol, "--json")
        single = _json_lines(alone.stdout)
        mine = [r for r in records if r.get("model") == folder.name]
        assert [{k: v for k, v in r.items() if k != "model"} for r in mine] == single  # ==, not approx
        assert len(mine) == len(single) and all(next(iter(r)) == "model" for r in mine)


def test_each_ground_truth_is_decoded_once_for_all_models(
    models: tuple[Path, Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gt, *preds = models
    reads: list[Path] = []
    real = evaluate.read_pixels

    def counting(path: Path) -> np.ndarray:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(evaluate, "read_pixels", counting)
    comparison = derestore.api.evaluate(gt, preds, workers=2)
    assert isinstance(comparison, Comparison)
    gt_reads = sorted(p.name for p in reads if p.parent == gt)
    assert gt_reads == sorted(f"{n}.png" for n in NAMES)  # each once, not once per model
    assert len(reads) - len(gt_reads) == sum(len(s.pairing.pairs) for s in comparison.summaries)


# ------------------------------------------------------------------ JSON


def test_json_is_pairs_then_a_summary_per_model_then_the_comparison(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, b, c = models
    result = run("--gt", gt, "--pred", a, "--pred", f"noisy={b}", "--pred", c, "--json")
    records = _json_lines(result.stdout)
    pairs, summaries, final = records[:-4], records[-4:-1], records[-1]
    assert len(pairs) == 8 + 7 + 8
    # Image by image, the models in the order given.
    assert [(r["name"], r["model"]) for r in pairs[:3]] == [("v01_rgb_97x131_noise5", m) for m in ("A", "noisy", "C")]
    assert [s["model"] for s in summaries] == ["A", "noisy", "C"]
    assert [s["count"] for s in summaries] == [8, 7, 7] and [s["failed"] for s in summaries] == [0, 0, 1]
    assert summaries[1]["unmatched_gt"] == [str(gt / "v03_rgb_101x77_noise40.png")]
    assert summaries[1]["unmatched_pred"] == [str(b / "extra.png")]
    comparison = final["comparison"]
    assert comparison["baseline"] == "A"
    # 8 images: v03 is not in B, v02 failed in C; the other 6 are compared.
    assert (comparison["images"], comparison["not_in_all"], comparison["failed_in_some"]) == (6, 1, 1)
    assert comparison["bootstrap"] == {"method": "percentile", "confidence": 0.95, "resamples": 10000, "seed": 0}
    assert comparison["tie_tolerance"] == {"psnr": 0.005, "ssim": 0.00005}
    assert list(comparison["models"]) == ["noisy", "C"] and list(comparison["mean"]) == ["A", "noisy", "C"]
    for model in comparison["models"].values():
        assert model["images"] == 6
        for metric in ("psnr", "ssim"):
            m = model[metric]
            assert m["ci95"][0] <= m["mean_difference"] <= m["ci95"][1]
            assert m["in_mean"] + m["left_out"] == 6
            assert len(m["largest_gains"]) <= 3 and len(m["largest_losses"]) <= 3
        assert model["psnr"]["wins"] + model["psnr"]["ties"] + model["psnr"]["losses"] == 6
    # v06 is identical to its GT in A (infinite PSNR): a loss for B, out of the ΔPSNR mean.
    noisy = comparison["models"]["noisy"]["psnr"]
    assert noisy["left_out"] == 1 and noisy["in_mean"] == 5
    # C's v08 is identical to its GT: another image out of C's ΔPSNR mean, and a win for C.
    assert comparison["models"]["C"]["psnr"]["left_out"] == 2


def test_mean_difference_is_the_difference_of_means_over_the_compared_images(
    models: tuple[Path, Path, Path, Path],
) -> None:
    gt, a, b, _ = models
    comparison = derestore.api.evaluate(gt, {"base": a, "new": b})
    scores = [(row.results["base"].score, row.results["new"].score) for row in comparison.compared]
    finite = [(x.psnr, y.psnr) for x, y in scores if math.isfinite(x.psnr) and math.isfinite(y.psnr)]
    assert len(scores) == 7 and len(finite) == 6  # A's v06 is identical to its ground truth
    mean_base, mean_new = (sum(v) / len(finite) for v in zip(*finite))
    assert comparison.models[0].psnr.mean == pytest.approx(mean_new - mean_base, abs=1e-12)
    expected = sum(y.ssim for _, y in scores) / 7 - sum(x.ssim for x, _ in scores) / 7
    assert comparison.models[0].ssim.mean == pytest.approx(expected, abs=1e-14)


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_of_a_hand_checked_case() -> None:
    # Means of 4 draws from [0, 0, 0, 3] are 3k/4 with k ~ Binomial(4, 1/4): P(k = 0) = 31.6% puts the
    # 2.5th percentile at 0; P(k >= 3) = 5.1% and P(k = 4) = 0.4% put the 97.5th at 9/4.
    assert bootstrap_interval([0, 0, 0, 3]) == (0.0, 2.25)
    assert bootstrap_interval([1.5, 1.5, 1.5]) == (1.5, 1.5)
    assert bootstrap_interval([]) is None
    assert bootstrap_interval([2.0]) == (2.0, 2.0)


def test_bootstrap_is_seeded_and_depends_only_on_the_values_seed_and_count() -> None:
    values = list(np.random.default_rng(5).normal(0.2, 1.0, 300))
    first = bootstrap_interval(values, seed=7, resamples=5000)
    assert bootstrap_interval(values, seed=7, resamples=5000) == first
    assert bootstrap_interval(values, seed=8, resamples=5000) != first
    # The interval of the mean of 300 N(0.2, 1) values: about mean ± 1.96/sqrt(300) = ± 0.113.
    low, high = first
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(300), rel=0.1)
    assert low < float(np.mean(values)) < high


def _gray_constant_error_set(tmp_path: Path, a_errors: list[int], b_errors: list[int]) -> tuple[Path, Path, Path]:
    """Gray 32x32 images whose predictions are off by a constant: PSNR = 10 log10(255² / error²) exactly."""
    gt, a, b = tmp_path / "gt", tmp_path / "A", tmp_path / "B"
    for folder in (gt, a, b):
        folder.mkdir()
    base = np.random.default_rng(0).integers(20, 200, (32, 32), dtype=np.uint8)
    for i, (ea, eb) in enumerate(zip(a_errors, b_errors)):
        _write(gt / f"img{i}.png", base)
        _write(a / f"img{i}.png", base + np.uint8(ea))
        _write(b / f"img{i}.png", base + np.uint8(eb))
    return gt, a, b


def test_cli_comparison_of_a_hand_checked_set(tmp_path: Path) -> None:
    # B halves A's error on the last of four images: ΔPSNR = [0, 0, 0, 10 log10 4] dB.
    gt, a, b = _gray_constant_error_set(tmp_path, [2, 2, 2, 2], [2, 2, 2, 1])
    result = run("--gt", gt, "--pred", a, "--pred", b, "--json", "--protocol", "rgb")
    assert result.exit_code == 0, result.stderr
    psnr = _json_lines(result.stdout)[-1]["comparison"]["models"]["B"]["psnr"]
    assert psnr["mean_difference"] == pytest.approx(TEN_LOG_4 / 4, abs=1e-12)
    assert psnr["ci95"] == pytest.approx([0.0, 0.75 * TEN_LOG_4], abs=1e-12)  # as [0, 0, 0, 3] above, scaled
    assert (psnr["wins"], psnr["ties"], psnr["losses"]) == (1, 3, 0)
    assert psnr["largest_gains"] == [{"name": "img3", "difference": pytest.approx(TEN_LOG_4, abs=1e-12)}]
    assert psnr["largest_losses"] == []


def test_interval_is_the_same_in_a_separate_process_and_follows_the_seed(
    models: tuple[Path, Path, Path, Path],
) -> None:
    gt, a, b, c = models
    args = ["eval", "--gt", str(gt), "--pred", str(a), "--pred", str(b), "--pred", str(c), "--json"]
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-m", "derestore", *args], capture_output=True, text=True, env=env,
                           check=False)
    here = run(*args[1:])
    assert other.returncode == here.exit_code == 1  # B and C have missing or failed images
    assert _json_lines(other.stdout)[-1] == _json_lines(here.stdout)[-1]
    # --seed reaches the bootstrap (with 4-5 images its distribution is too coarse for the seed to show:
    # the library's own test, on 300 values, checks that it moves).
    reseeded = _json_lines(run(*args[1:], "--seed", "1", "--resamples", "2000").stdout)[-1]["comparison"]
    assert reseeded["bootstrap"]["seed"] == 1 and reseeded["bootstrap"]["resamples"] == 2000
    library = derestore.api.evaluate(gt, [a, b, c], seed=1, resamples=2000)
    for model in library.models:
        assert reseeded["models"][model.model]["psnr"]["ci95"] == list(model.psnr.ci)
        assert reseeded["models"][model.model]["ssim"]["ci95"] == list(model.ssim.ci)


def test_an_added_model_leaves_the_others_intervals_alone(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, b, c = models
    (c / "v02_rgb_128x160_noise15.png").unlink()
    shutil.copy(b / "v02_rgb_128x160_noise15.png", c)  # C now fails nothing, so the compared set is B's
    two = derestore.api.evaluate(gt, [a, b])
    three = derestore.api.evaluate(gt, [a, b, c])
    assert [r.name for r in two.compared] == [r.name for r in three.compared]
    assert three.models[0].psnr.ci == two.models[0].psnr.ci and three.models[0].ssim.ci == two.models[0].ssim.ci


def _score(psnr: float, ssim: float = 0.9) -> Score:
    return Score(psnr=psnr, ssim=ssim, identical=math.isinf(psnr))


def test_ties_are_differences_under_the_documented_tolerance() -> None:
    pairs = [("a", _score(30.0), _score(30.004)), ("b", _score(30.0), _score(30.006)),
             ("c", _score(30.0), _score(29.9951)), ("d", _score(30.0), _score(29.9))]
    psnr = evaluate._difference("psnr", pairs, seed=0, resamples=1000)
    assert (psnr.wins, psnr.ties, psnr.losses) == (1, 2, 1)  # |ΔPSNR| < 0.005 dB is a tie
    assert psnr.largest_gains() == [("b", pytest.approx(0.006, abs=1e-12))]
    assert [n for n, _ in psnr.largest_losses()] == ["d"]  # c's tie is no loss
    ssim_pairs = [("a", _score(30, 0.90000), _score(30, 0.90004)), ("b", _score(30, 0.9), _score(30, 0.90006))]
    ssim = evaluate._difference("ssim", ssim_pairs, seed=0, resamples=1000)
    assert (ssim.wins, ssim.ties, ssim.losses) == (1, 1, 0)


def test_identical_images_count_as_wins_and_stay_out_of_the_psnr_mean() -> None:
    inf = math.inf
    pairs = [("both", _score(inf, 1.0), _score(inf, 1.0)), ("base", _score(inf, 1.0), _score(40.0)),
             ("model", _score(35.0), _score(inf, 1.0)), ("x", _score(30.0), _score(31.0)),
             ("small", _score(30.0, math.nan), _score(32.0, math.nan))]
    psnr = evaluate._difference("psnr", pairs, seed=0, resamples=1000)
    assert (psnr.wins, psnr.ties, psnr.losses, psnr.left_out) == (3, 1, 1, 3)
    assert psnr.values == [("x", 1.0), ("small", 2.0)] and psnr.mean == 1.5
    ssim = evaluate._difference("ssim", pairs, seed=0, resamples=1000)
    assert ssim.left_out == 1 and [n for n, _ in ssim.values] == ["both", "base", "model", "x"]  # no SSIM: out


# ------------------------------------------------------------------ failures and missing files


def test_missing_and_failed_images_are_listed_and_left_out_of_the_comparison(
    models: tuple[Path, Path, Path, Path],
) -> None:
    gt, a, b, c = models
    result = run("--gt", gt, "--pred", a, "--pred", b, "--pred", c)
    assert result.exit_code == 1
    assert f"unmatched: B: no prediction for {gt / 'v03_rgb_101x77_noise40.png'}" in result.stderr
    assert f"unmatched: B: no ground truth for {b / 'extra.png'}" in result.stderr
    assert "failed:" in result.stderr and "size mismatch" in result.stderr
    assert "on 6 images in all 3 folders (left out: 1 missing from some folder, 1 failed for some model)" in (
        result.stderr)


def test_an_unreadable_ground_truth_fails_every_model_once_on_the_terminal(
    models: tuple[Path, Path, Path, Path],
) -> None:
    gt, a, b, _ = models
    (gt / "v04_rgb_97x131_offset7.png").write_bytes(b"not a png")
    result = run("--gt", gt, "--pred", a, "--pred", b, "--json")
    assert result.exit_code == 1
    failed = [r for r in _json_lines(result.stdout) if "error" in r]
    assert [r["model"] for r in failed] == ["A", "B"] and failed[0]["error"] == failed[1]["error"]
    assert result.stderr.count("failed:") == 1
    assert _json_lines(result.stdout)[-1]["comparison"]["failed_in_some"] == 1


def test_all_folders_complete_exit_0(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, _, _ = models
    twin = a.parent / "twin"
    shutil.copytree(a, twin)
    result = run("--gt", gt, "--pred", a, "--pred", twin, "--json")
    assert result.exit_code == 0, result.stderr
    psnr = _json_lines(result.stdout)[-1]["comparison"]["models"]["twin"]["psnr"]
    assert psnr["mean_difference"] == 0.0 and psnr["ci95"] == [0.0, 0.0] and psnr["ties"] == 8


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("out/", (None, "out/")),
        ("restormer=out/", ("restormer", "out/")),
        ("a b=runs/x=y", ("a b", "runs/x=y")),  # the first = splits
        ("./a=b/", (None, "./a=b/")),  # a separator before = : a path
        ("runs/a=b", (None, "runs/a=b")),
        ("=out", (None, "=out")),  # no name before =
        ("name=", ("name", "")),  # refused later: names no folder
    ],
)
def test_parse_prediction_rule(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_prediction(text) == expected


def test_an_existing_folder_whose_name_holds_an_equals_sign_is_a_path(
    models: tuple[Path, Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a, b, _ = models
    monkeypatch.chdir(a.parent)
    b.rename("x=B")
    assert parse_prediction("x=B") == (None, "x=B")  # exists: the whole argument is the folder
    result = run("--gt", "gt", "--pred", "A", "--pred", "x=B", "--pred", "label=./x=B", "--json")
    summaries = [r for r in _json_lines(result.stdout) if "mean" in r]
    assert [s["model"] for s in summaries] == ["A", "x=B", "label"]
    assert summaries[1]["count"] == summaries[2]["count"] == 7


@pytest.mark.parametrize("how", ["same name", "same folder name", "folder name and a label"])
def test_duplicate_names_are_a_usage_error(models: tuple[Path, Path, Path, Path], how: str) -> None:
    gt, a, b, c = models
    other = a.parent / "elsewhere" / "A"
    shutil.copytree(a, other)
    preds = {"same name": [f"x={a}", f"x={b}"], "same folder name": [a, other],
             "folder name and a label": [c, f"C={b}"]}[how]
    result = run("--gt", gt, *(x for p in preds for x in ("--pred", p)))
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is already given to --pred" in result.stderr and "own name (NAME=DIR)" in result.stderr


def test_a_name_without_a_folder_is_a_usage_error(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, _, _ = models
    result = run("--gt", gt, "--pred", a, "--pred", "b=")
    assert result.exit_code == 2 and "names no folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [(["--resamples", "999"], "999: must be at least 1000"),
                                               (["--seed", "-1"], "-1: must not be negative")])
def test_bootstrap_options_are_checked(models: tuple[Path, Path, Path, Path], args: list[str], message: str) -> None:
    gt, a, b, _ = models
    result = run("--gt", gt, "--pred", a, "--pred", b, *args)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_cli_defaults_agree_with_the_library() -> None:
    assert (eval_cmd.DEFAULT_SEED, eval_cmd.DEFAULT_RESAMPLES) == (evaluate.BOOTSTRAP_SEED, evaluate.BOOTSTRAP_RESAMPLES)


# ------------------------------------------------------------------ one --pred


def test_one_unnamed_pred_is_todays_single_evaluation(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, _, _ = models
    records = _json_lines(run("--gt", gt, "--pred", a, "--json").stdout)
    assert len(records) == 9 and not any("model" in r or "comparison" in r for r in records)
    assert isinstance(derestore.api.evaluate(gt, a), Summary)


def test_one_named_pred_tags_its_records_and_compares_nothing(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, _, _ = models
    result = run("--gt", gt, "--pred", f"mine={a}", "--json")
    assert result.exit_code == 0
    records = _json_lines(result.stdout)
    assert all(r["model"] == "mine" for r in records[:-1])
    assert records[-1]["comparison"]["baseline"] == "mine" and records[-1]["comparison"]["models"] == {}


def test_library_takes_a_mapping_a_list_or_labelled_tuples(models: tuple[Path, Path, Path, Path]) -> None:
    gt, a, b, c = models
    by_mapping = derestore.api.evaluate(str(gt), {"first": a, "second": str(b)})
    by_tuples = derestore.api.evaluate(gt, [("first", a), (None, b)])
    assert by_mapping.labels == ["first", "second"] and by_tuples.labels == ["first", "B"]
    assert derestore.api.evaluate(gt, (a, c)).labels == ["A", "C"]  # a tuple of paths is two models
    assert by_mapping.models[0].psnr == by_tuples.models[0].psnr
    with pytest.raises(UsageError, match="at least one prediction"):
        derestore.api.evaluate(gt, [])


def test_one_ground_truth_image_against_prediction_files_of_other_names(tmp_path: Path) -> None:
    gt, a, b = _gray_constant_error_set(tmp_path, [2], [1])
    a_file, b_file = (a / "img0.png").rename(a / "ours.png"), (b / "img0.png").rename(b / "theirs.png")
    comparison = derestore.api.evaluate(gt / "img0.png", [a_file, b_file], protocol="rgb")
    assert [r.name for r in comparison.compared] == ["img0"]
    assert comparison.models[0].psnr.mean == pytest.approx(TEN_LOG_4, abs=1e-12)


# ------------------------------------------------------------------ CSV, terminal


def test_csv_has_one_row_per_image_with_every_models_columns(
    models: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    gt, a, b, c = models
    out = tmp_path / "cmp.csv"
    result = run("--gt", gt, "--pred", a, "--pred", b, "--pred", c, "--csv", out, "--json")
    records = _json_lines(result.stdout)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["name", "gt", "compared"] + [f"{m}:{f}" for m in "ABC"
                                                          for f in ("pred", "psnr", "ssim", "identical", "error")]
    assert [r["name"] for r in rows] == NAMES
    by_name = {r["name"]: r for r in rows}
    assert by_name["v03_rgb_101x77_noise40"]["B:pred"] == "" and by_name["v03_rgb_101x77_noise40"]["compared"] == "false"
    assert "size mismatch" in by_name["v02_rgb_128x160_noise15"]["C:error"]
    assert by_name["v06_rgb_64x80_identical"]["A:psnr"] == "inf"
    for r in records[:-4]:
        if r["psnr"] is not None:  # the CSV's repr round-trips the JSON value exactly
            assert float(by_name[r["name"]][f"{r['model']}:psnr"]) == r["psnr"]


def test_terminal_shows_a_column_pair_per_model_and_the_comparison_block(
    models: tuple[Path, Path, Path, Path],
) -> None:
    gt, a, b, _ = models
    result = run("--gt", gt, "--pred", a, "--pred", f"[bold]new={b}", "--per-image")
    err = result.stderr
    for heading in ("A PSNR", "A SSIM", "[bold]new PSNR", "[bold]new SSIM", "mean of 7 in all"):
        assert heading in err  # user strings escaped: shown as typed, never as markup
    for name in NAMES:
        assert name in err  # whole names, never cut to the terminal's width
    assert "against A (baseline), on 7 images in all 2 folders" in err
    assert re.search(r"\[bold\]new\s*│\s*[+-]\d+\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]\s*│\s*\d+/\d+/\d+", err)
    assert "10000 resamples, seed 0" in err and "|ΔPSNR| < 0.005 dB" in err
    assert "[bold]new: largest PSNR gains:" in err


# ------------------------------------------------------------------ report


def _awkward_dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Names that break unescaped HTML: a file `a<b>&"c'.png` (labels are given by the tests)."""
    gt, a, b = tmp_path / "gt", tmp_path / "A", tmp_path / "B"
    for folder in (gt, a, b):
        folder.mkdir()
    rng = np.random.default_rng(9)
    for i, name in enumerate(["a<b>&\"c'", "plain", "third"]):
        img = cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), (200, 150), interpolation=cv2.INTER_CUBIC)
        _write(gt / f"{name}.png", img)
        _noisy(gt / f"{name}.png", a / f"{name}.png", 4, i)
        worse = cv2.imread(str(a / f"{name}.png"))
        worse[40:70, 100:130] = 255 - worse[40:70, 100:130]  # where B disagrees most with A
        cv2.imwrite(str(b / f"{name}.png"), worse if i != 1 else cv2.imread(str(gt / f"{name}.png")))
    return gt, a, b


def test_report_has_the_comparison_and_escapes_every_user_string(tmp_path: Path) -> None:
    gt, a, b = _awkward_dataset(tmp_path)
    out = tmp_path / "cmp.html"
    result = run("--gt", gt, "--pred", f"<script>alert(1)={a}", "--pred", f"\"q\" & 'r'={b}", "--report", out)
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script>alert" not in page and "a<b>" not in page and "&quot;q&quot; &amp; &#x27;r&#x27;" in page
    assert "a&lt;b&gt;&amp;&quot;c&#x27;" in page and "&lt;script&gt;alert(1)" in page
    assert "percentile-bootstrap interval (10000 resamples of the images, seed 0)" in page
    assert page.count("<circle") == 2  # the scatter: images with a finite PSNR on both sides (plain is identical in B)
    assert 'aria-label="histogram of PSNR differences"' in page
    # Two losses for B, each GT | A | B thumbnails and the three zoomed crops.
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 * 6
    crop = cv2.imdecode(np.frombuffer(base64.b64decode(images[3]), np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape[:2] == (192, 192)  # the 64-px window where A and B differ most, enlarged x3
    assert "crop: 64×64 px at x=" in page
    assert page.count("<tr><td>") == 3 + 1 + 2  # per image; one compared model; the means table's two rows
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "@import" not in page and "url(" not in page


def test_crop_window_is_where_the_two_predictions_differ_most() -> None:
    from derestore.report import _most_different_window

    a = np.zeros((150, 200, 3), np.uint8)
    b = a.copy()
    b[40:70, 100:130] = 255
    b[0:3, 0:3] = 255  # a smaller difference elsewhere
    top, left, side = _most_different_window(a, b, 64)
    assert side == 64 and top <= 40 and top + 64 >= 70 and left <= 100 and left + 64 >= 130


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (not installed in CI)")
def test_report_renders_in_a_headless_browser_without_script_errors(tmp_path: Path) -> None:
    gt, a, b = _awkward_dataset(tmp_path)
    out = tmp_path / "cmp.html"
    assert run("--gt", gt, "--pred", f"<script>alert(1)={a}", "--pred", f"\"q\" & 'r'={b}", "--report", out).exit_code == 0
    # Click every header of the sortable table too, so its script runs.
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace(
        "</body>", '<script>document.querySelectorAll("th").forEach(function(th){th.click();th.click();});'
                   'console.log("sorted " + document.querySelectorAll("table.sortable tbody tr").length);</script></body>'))
    browser = subprocess.run(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert console and all('"sorted 3"' in line for line in console), console
    assert "Where" in browser.stdout and browser.stdout.count("<svg") == 2
