"""Registry files as users write them, typos included: one-line errors naming file, record and field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from derestore.errors import UsageError
from derestore.registry import Paper, load_registry

REPO = Path(__file__).resolve().parents[1]
HEAD = '[models.foo]\ntask = "derain"\narch = "Restormer"\n'


def registry_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = registry_file(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_registry([str(path)])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"registry file {path}")
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models = 5", "'models' must be a table of [models.NAME] records, got an integer (5)"),
        ('tasks = "x"', "'tasks' must be a table of [tasks.NAME] records, got a string ('x')"),
        ("[models]\nfoo = 5", "[models.foo] must be a table"),
        (HEAD + 'size = "big"', "[models.foo] size must be a positive integer, got a string ('big')"),
        (HEAD + "size = true", "[models.foo] size must be a positive integer, got a boolean (true)"),
        (HEAD + "size = 0", "[models.foo] size must be a positive integer, got an integer (0)"),
        (HEAD + "tile = true", "[models.foo] tile must be an integer ≥ 0, got a boolean (true)"),
        (HEAD + "overlap = -1", "[models.foo] overlap must be an integer ≥ 0, got an integer (-1)"),
        (HEAD + 'square = "yes"', "[models.foo] square must be true or false, got a string ('yes')"),
        (HEAD + 'sources = "http://example.org/x.pth"', "[models.foo] sources must be an array of strings"),
        (HEAD + "sources = [1]", "[models.foo] sources must be an array of strings"),
        (HEAD + "license = 3", "[models.foo] license must be a string, got an integer (3)"),
        (HEAD + "manual_url = false", "[models.foo] manual_url must be a string, got a boolean (false)"),
        (HEAD + "sha256 = 5", "[models.foo] sha256 must be a string, got an integer (5)"),
        (HEAD + 'sha256 = "abc"', "[models.foo] sha256 must be 64 hex digits, got a string ('abc')"),
        (HEAD + "paper = 5", "[models.foo] paper must be a table like { psnr = 33.69, ssim = 0.94 }"),
        (HEAD + "paper = {psnr = 30, foo = 1}", "[models.foo.paper] has unknown key 'foo'; known keys: psnr, ssim"),
        (HEAD + 'paper = {psnr = "30"}', "[models.foo] paper.psnr must be a number, got a string ('30')"),
        (HEAD + "paper = {ssim = true}", "[models.foo] paper.ssim must be a number, got a boolean (true)"),
        (HEAD + "notes = 1979-05-27", "[models.foo] notes must be a string, got a date"),
        ('[models.foo]\ntask = "derain"', "[models.foo] lacks 'arch'"),
        ('[models.foo]\ntask = 3\narch = "X"', "[models.foo] task must be a string, got an integer (3)"),
        ('[tasks.derain]\ndefault = 5', "[tasks.derain] default must be a string, got an integer (5)"),
        ("[tasks.derain]\nsummary = []", "[tasks.derain] summary must be a string, got an array"),
        ("[tasks.new]\nsummary = 'x'", "[tasks.new] lacks 'default'"),
    ],
)
def test_mistyped_field_is_one_line_naming_file_record_field_and_type(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


def test_misspelt_key_is_refused_with_the_likely_key(tmp_path):
    message = load_error(tmp_path, HEAD + 'sha265 = "' + "0" * 64 + '"')
    assert message.endswith("[models.foo] has unknown key 'sha265'; did you mean 'sha256'?")
    assert load_error(tmp_path, '[tasks.derain]\ndefualt = "lite-derain"').endswith("did you mean 'default'?")


def test_unknown_key_without_a_likely_one_lists_the_known_keys(tmp_path):
    message = load_error(tmp_path, HEAD + "colour = 1")
    assert "[models.foo] has unknown key 'colour'; known keys: task, arch," in message


def test_misspelt_top_level_table_is_refused(tmp_path):
    message = load_error(tmp_path, '[model.foo]\ntask = "derain"\narch = "X"')
    assert message.endswith("unknown top-level key 'model'; did you mean [models.NAME]?")


def test_model_name_that_cannot_name_a_cache_folder_is_refused(tmp_path):
    assert "model name 'a [b]' is not usable" in load_error(tmp_path, '[models."a [b]"]\ntask = "derain"\narch = "X"')


def test_odd_record_names_are_quoted_in_one_line(tmp_path):
    message = load_error(tmp_path, '[tasks."two\\nlines"]\ndefault = 5')
    assert '[tasks."two\\nlines"] default must be a string' in message


def test_task_default_naming_an_unknown_model_suggests_close_names(tmp_path):
    message = load_error(tmp_path, '[tasks.derain]\ndefault = "restormer-deran"')
    assert "[tasks.derain] default names unknown model 'restormer-deran'; did you mean 'restormer-derain'" in message


@pytest.mark.parametrize(("content", "expected"), [(b"\xff\xfe", "is not valid TOML"), (b"a = ", "is not valid TOML")])
def test_unreadable_toml_is_a_usage_error(tmp_path, content, expected):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=expected):
        load_registry([str(path)])


def test_registry_path_that_is_a_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=f"cannot read registry file {tmp_path}"):
        load_registry([str(tmp_path)])


def test_well_typed_record_loads_with_every_field(tmp_path):
    path = registry_file(
        tmp_path,
        HEAD
        + 'dataset = "Rain13K"\nsources = ["https://example.org/foo.pth"]\nfilename = "foo.pth"\n'
        + f'sha256 = "{"AB" * 32}"\nsize = 10\nlicense = "MIT"\nmanual = "ask"\nmanual_url = "https://x"\n'
        + 'manual_code = "t6w4"\ncontainer = "params"\ntile = 0\noverlap = 32\nsquare = true\n'
        + 'paper = { psnr = 33, ssim = 0.9 }\nnotes = "n"\n',
    )
    record = load_registry([str(path)]).model("foo")
    assert record.sha256 == "ab" * 32 and record.size == 10 and record.tile == 0 and record.square is True
    assert record.paper == Paper(psnr=33.0, ssim=0.9) and record.sources == ("https://example.org/foo.pth",)
    assert record.origin == str(path)


def test_builtin_registry_loads():
    registry = load_registry([])
    assert len(registry.models) > 40 and registry.default_for("derain").name == "restormer-derain"


def test_unknown_model_shows_the_closest_names_not_the_whole_list():
    with pytest.raises(UsageError) as info:
        load_registry([]).model("restormer-deran")
    message = str(info.value)
    assert message.startswith("unknown model 'restormer-deran'; did you mean 'restormer-derain'")
    assert message.endswith("`derestore models` lists them all") and len(message) < 200


def test_unknown_model_with_nothing_close_lists_nothing():
    with pytest.raises(UsageError) as info:
        load_registry([]).model("xyzzy")
    assert str(info.value) == "unknown model 'xyzzy'; `derestore models` lists them all"


def test_unknown_task_lists_the_tasks():
    with pytest.raises(UsageError, match=r"unknown task 'dera'; known tasks: deblur, defocus, dehaze, denoise, derain"):
        load_registry([]).default_for("dera")


def test_help_still_works_and_commands_fail_in_one_line_with_a_broken_registry_file(tmp_path):
    path = registry_file(tmp_path, "[models.foo]\npaper = {psnr = 30, foo = 1}\n")
    env = {**os.environ, "DERESTORE_REGISTRY": str(path), "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "derestore"]
    helped = subprocess.run([*run, "--help"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert helped.returncode == 0 and "derain" in helped.stdout and "Traceback" not in helped.stderr
    listed = subprocess.run([*run, "models"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 2 and "Traceback" not in listed.stderr
    assert listed.stderr.count("\n") == 1 and f"registry file {path}: [models.foo.paper] has unknown key 'foo'" in listed.stderr
