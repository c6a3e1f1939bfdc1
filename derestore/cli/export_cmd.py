"""`derestore export`: a checkpoint as an ONNX file for deployment, verified against PyTorch first."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import emit_json, exit_on_error, say


def register(app: typer.Typer) -> None:
    app.command(name="export")(export_command)


def export_command(
    name: Optional[str] = typer.Argument(None, help="Registry model name (see `derestore models`).",
                                         show_default=False),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Export this checkpoint file instead.",
                                           show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="The .onnx file to write (a folder: NAME.onnx in it).",
                                show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print what was written as one JSON object on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only errors."),
) -> None:
    """Write a model as ONNX (opset 18; batch, height and width dynamic; output clamped to [0, 1]; global statistics, as published).

    The file is written only after ONNX Runtime reproduced PyTorch on natural photo tiles (max abs difference <= 1e-4); its metadata says how to feed it (RGB or grayscale in [0, 1], the size multiple).

    Example: derestore export lite-derain -o lite-derain.onnx
    """
    from .common import show_library_logs

    show_library_logs(quiet)
    with exit_on_error():
        report = _export(name, weights, output)
    if json_out:
        emit_json({"output": str(report.path), "bytes": report.size, "sha256": report.sha256,
                   "arch": report.architecture, "opset": report.opset, "max_abs_diff": report.max_abs_diff,
                   "probe": report.probe, "multiple_of": report.multiple_of})
    if not quiet:
        say(None, f"wrote {report.path} ({report.size / 1e6:.1f} MB, {report.architecture}, opset {report.opset}): "
                  f"matches PyTorch to {report.max_abs_diff:.1e} on {report.probe}; input 'image' float32 "
                  f"(batch, channels, height, width) in [0, 1], height and width multiples of {report.multiple_of}")


def _export(name: str | None, weights: Path | None, output: Path):  # noqa: ANN202 - an ExportReport
    from ..errors import UsageError

    if (name is None) == (weights is None):
        raise UsageError("name a registry model or give weights=FILE (one of them)")
    from .. import api
    from ..engine import set_cpu_threads
    from ..tiled_engine import cpu_threads
    from ..onnx_backend import export_target, write_export

    target = export_target(output, name or weights.stem, given=[weights] if weights else [])  # type: ignore[union-attr]
    set_cpu_threads(cpu_threads())  # the application's choice, as for the task commands
    # Global statistics: local ones pick their windows by the input's size, which the graph would freeze.
    model = api.load(model=name, weights=weights, device="cpu", precision="fp32", layout="contiguous",
                     backend="torch", stats="global")
    return write_export(model.engine.descriptor, target)
