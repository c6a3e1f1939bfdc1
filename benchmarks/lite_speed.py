"""CPU time of the bundled lite models on a 1024×768 photo (not a test).

    python benchmarks/lite_speed.py [--repeat 3]

Per model: `Model.restore_array` on one 1024×768 image (median of --repeat runs,
after one warm-up), then the whole command `derestore TASK image.png -m lite-TASK`
timed end to end (interpreter start, torch import, load, decode, restore, encode).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rain.png"
TASKS = ("derain", "desnow", "dehaze", "deblur", "denoise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stats", default="auto", help="auto (each model's own) | local | global")
    args = ap.parse_args()
    import derestore

    bgr = cv2.resize(cv2.imread(str(EXAMPLE), cv2.IMREAD_COLOR), (1024, 768), interpolation=cv2.INTER_CUBIC)
    image = np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "photo.png"
        cv2.imwrite(str(png), bgr)
        for task in TASKS:
            model = derestore.load(model=f"lite-{task}", device="cpu", stats=args.stats)
            model.restore_array(image, tile=0)
            runs = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                model.restore_array(image, tile=0)
                runs.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "derestore", task, str(png), "-m", f"lite-{task}",
                            "-o", str(Path(tmp) / task), "--stats", args.stats, "-q"], check=True)
            command = time.perf_counter() - t0
            print(f"lite-{task} ({model.stats} statistics, {model.engine.backend}): restore {statistics.median(runs):.2f} s (median of {args.repeat}), "
                  f"whole command {command:.2f} s", flush=True)


if __name__ == "__main__":
    main()
