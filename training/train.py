"""Resumable, seeded training of one compact NAFNet per task.

    python -m training.train --task derain --steps 4000 --minutes 15

Runs until `--steps` or `--minutes` (whichever first), checkpointing every `--every` steps to
`<run>/last.pt`; running the same command again resumes from it (model, optimiser, step, RNG).
fp32 on CPU, bf16 autocast on CUDA.

`--init OTHER/last.pt` starts a new run from another run's weights, possibly of a smaller shape:
a NAFNet block's output scales (beta, gamma) start at zero, so blocks the smaller network lacks
start as identities and the grown network computes exactly what the smaller one did.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from spandrel.architectures.NAFNet import NAFNet

from training.data import load_photos, make_batch
from training.degrade import TASKS

RUNS = Path(__file__).parent / "runs"


@dataclass(frozen=True)
class Shape:
    width: int = 16
    enc: tuple[int, ...] = (1, 1, 1, 1)
    middle: int = 1
    dec: tuple[int, ...] = (1, 1, 1, 1)


def build(shape: Shape) -> NAFNet:
    return NAFNet(img_channel=3, width=shape.width, middle_blk_num=shape.middle,
                  enc_blk_nums=list(shape.enc), dec_blk_nums=list(shape.dec))


def grow(model: NAFNet, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Loads a smaller NAFNet's weights; the blocks it lacks keep their identity initialisation."""
    fix = "--init needs a network of the same width with no more blocks per level"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # tensors of another size: another width
        raise SystemExit(f"{source} does not fit inside this shape ({str(exc).splitlines()[1].strip()}): {fix}") from None
    if unexpected or any(not k.startswith(("encoders.", "middle_blks.", "decoders.")) for k in missing):
        raise SystemExit(f"{source} does not fit inside this shape (unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}): {fix}")


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(path: Path, model: NAFNet, opt: torch.optim.Optimizer, step: int, rng: np.random.Generator,
         config: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "config": config}, tmp)
    tmp.replace(path)  # a kill mid-save never leaves a broken checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--run", type=Path, help="run folder (default training/runs/<task>)")
    p.add_argument("--steps", type=int, default=4000, help="length of the learning-rate schedule")
    p.add_argument("--minutes", type=float, default=1e9, help="stop (resumably) after this much wall time")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--enc", default="1,1,1,1")
    p.add_argument("--middle", type=int, default=1)
    p.add_argument("--dec", default="1,1,1,1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--every", type=int, default=100, help="checkpoint interval in steps")
    p.add_argument("--init", type=Path, help="start a new run from this checkpoint's weights (see above)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    run = args.run or RUNS / args.task
    run.mkdir(parents=True, exist_ok=True)
    shape = Shape(args.width, tuple(map(int, args.enc.split(","))), args.middle, tuple(map(int, args.dec.split(","))))
    config = {"task": args.task, "shape": asdict(shape), "batch": args.batch, "patch": args.patch,
              "lr": args.lr, "steps": args.steps, "seed": args.seed}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = build(shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.9))
    rng = np.random.default_rng(args.seed)
    step = 0
    ckpt = run / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["config"]["shape"] != config["shape"]:
            raise SystemExit(f"{ckpt} was trained with shape {state['config']['shape']}, not {config['shape']}: "
                             "use another --run folder or the same --width/--enc/--middle/--dec")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {ckpt} at step {step}", flush=True)
    elif args.init:
        grow(model, torch.load(args.init, map_location=device, weights_only=False)["model"], args.init)
        print(f"initialised from {args.init}", flush=True)
    (run / "config.json").write_text(json.dumps(config, indent=1))
    photos = load_photos("train")
    log = (run / "log.tsv").open("a")
    start = time.monotonic()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    running = 0.0
    while step < args.steps and (time.monotonic() - start) < args.minutes * 60:
        batch = make_batch(args.task, photos, args.batch, args.patch, rng)
        bad = torch.from_numpy(batch.degraded).to(device)
        clean = torch.from_numpy(batch.clean).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        with amp:
            out = model(bad)
        loss = torch.nn.functional.l1_loss(out.float(), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        step += 1
        running += loss.item()
        if step % args.every == 0 or step == args.steps:
            save(ckpt, model, opt, step, rng, config)
            log.write(f"{step}\t{running / args.every:.5f}\t{time.monotonic() - start:.0f}\n")
            log.flush()
            print(f"step {step} loss {running / args.every:.5f} {time.monotonic() - start:.0f}s", flush=True)
            running = 0.0
    save(ckpt, model, opt, step, rng, config)
    print(f"stopped at step {step}", flush=True)


if __name__ == "__main__":
    main()
