"""Export a trained run as the package's lite model: `derestore/lite/lite-<task>.safetensors`.

    python -m training.export --task derain

Only the network's weights, in safetensors (no pickle), stored as fp16 to halve the size (the
package budget is 5 MB a model; spandrel loads them into an fp32 network, and fp16 rounding of the
weights moves outputs by far less than one 8-bit level); prints the sha256 and size for the
weights.toml record.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from training.degrade import TASKS
from training.train import RUNS

LITE = Path(__file__).resolve().parent.parent / "derestore" / "lite"


def export(task: str, run: Path | None = None, out_dir: Path = LITE) -> Path:
    ckpt = (run or RUNS / task) / "last.pt"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt} does not exist: train first with `python -m training.train --task {task}`")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"lite-{task}.safetensors"
    tmp = dest.with_suffix(".tmp")
    save_file({k: v.half().contiguous() for k, v in state["model"].items()}, str(tmp),
              metadata={"task": task, "steps": str(state["step"]), "config": str(state["config"])})
    tmp.replace(dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    print(f"{dest}  step {state['step']}  {dest.stat().st_size} bytes  sha256 {digest}")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, action="append", help="repeatable; default: every task")
    p.add_argument("--run", type=Path, help="run folder (default training/runs/<task>)")
    args = p.parse_args(argv)
    for task in args.task or TASKS:
        export(task, args.run)


if __name__ == "__main__":
    main()
