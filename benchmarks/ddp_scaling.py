"""Training throughput with 1 and 2 DDP processes (gloo, CPU) on the same global batch, per family.

Each run is `fae fit --config configs/quickstart/digits_<family>.yaml --model.width W` (64, the paper's)
with the global batch of 64 split over the processes (`--data.batch_size 64/N`), every process given
one thread (OMP_NUM_THREADS=1): 1 process uses one core, 2 processes two, so the ratio is the scaling
of adding a device (compute split in two, gradients all-reduced by gloo every step). A callback
appended with `--trainer.callbacks+=` times the steps after `--warmup`; rank 0 reports samples per
second. Prints `ratio ddp 2/1 <family>:` (2.0 is perfect scaling) and `ratio ddp efficiency
<family>:`, that / 2. On GPUs with NCCL the all-reduce overlaps the backward and runs over
NVLink/PCIe: efficiency there is typically higher for nets this small in parameters (an estimate, not
measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FAMILIES = ("vae", "fisher", "wae_gan")
OUT_ENV = "FAE_BENCH_OUT"


class Throughput(L.Callback):
    """Samples per second over the steps after `warmup`, written by rank 0 to $FAE_BENCH_OUT."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self.start
        steps = trainer.global_step - self.warmup
        batch = trainer.datamodule.batch_size * trainer.world_size
        if trainer.is_global_zero:
            Path(os.environ[OUT_ENV]).write_text(json.dumps({"samples_per_second": steps * batch / seconds}))


def child(family: str, devices: int, width: int, steps: int, warmup: int, folder: str) -> None:
    from fae.cli import main

    strategy = {1: "auto"}.get(devices, "ddp_find_unused_parameters_true" if family == "wae_gan" else "ddp")
    main(["fit", "--config", str(CONFIGS / f"digits_{family}.yaml"), "--model.width", str(width),
          "--data.batch_size", str(64 // devices), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
          "--trainer.strategy", strategy, "--trainer.max_steps", str(warmup + steps), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
          "--trainer.limit_val_batches", "0", "--trainer.callbacks+=__main__.Throughput",
          f"--trainer.callbacks.init_args.warmup={warmup}", "--run_dir", folder])  # fmt: skip


def measure(family: str, devices: int, args, tmp: Path) -> float:
    out = tmp / f"{family}-{devices}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", OUT_ENV: str(out)}
    folder = tmp / f"run-{family}-{devices}"
    command = [sys.executable, __file__, "--child", family, "--devices", str(devices), "--width", str(args.width),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--folder", str(folder)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
    if done.returncode != 0:
        raise SystemExit(f"{family} on {devices} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--child", choices=FAMILIES)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.devices, args.width, args.steps, args.warmup, args.folder)
    print(f"fae fit throughput, MNIST nets width {args.width}, global batch 64, one thread per process:")
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            one, two = (measure(family, devices, args, Path(folder)) for devices in (1, 2))
            print(f"  {family:8s} 1 process {one:6.1f} samples/s, 2 processes {two:6.1f} samples/s")
            print(f"ratio ddp 2/1 {family}: {two / one:.2f}")
            print(f"ratio ddp efficiency {family}: {two / one / 2:.2f}")


if __name__ == "__main__":
    main()
