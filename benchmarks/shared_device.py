"""K small runs sharing one device against one run alone: total training throughput, for the experiment
runner's default of runs per GPU (today one per GPU: fae.experiment.launch.default_jobs).

Each run is `fae fit --config configs/quickstart/digits_<family>.yaml --model.width W` in its own process
on `--accelerator` (cuda when there is one, else cpu), K of them started together, with the throughput
callback of benchmarks/ddp_scaling.py timing the steps after `--warmup`. A GPU step of these nets is a few
milliseconds, mostly kernel launches and Python, so one run leaves the GPU idle much of the time and K
runs can fill it. Prints `ratio shared device K/1 <family>:` (the samples per second of all K runs
together over one run's; K means perfect sharing) for each K of `--runs`. On a CPU (as `make bench` runs
it here) the K runs share the machine's cores, one thread each, at width 8 unless `--width` says
otherwise: with 2 cores, 2 runs should give up to 2. benchmarks/gpu_check.sh runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FAMILIES = ("vae", "fisher", "wae_gan")
OUT_ENV = "FAE_BENCH_OUT"  # where ddp_scaling.Throughput writes


def child(family: str, accelerator: str, width: int, steps: int, warmup: int, folder: str) -> None:
    from fae.cli import main

    main(["fit", "--config", str(CONFIGS / f"digits_{family}.yaml"), "--model.width", str(width),
          "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.max_steps", str(warmup + steps),
          "--trainer.max_epochs", "-1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
          "--trainer.callbacks+=ddp_scaling.Throughput", f"--trainer.callbacks.init_args.warmup={warmup}",
          "--run_dir", folder])  # fmt: skip


def together(family: str, k: int, args, tmp: Path) -> float:
    """Samples per second of k runs started at once, summed."""
    processes, outs = [], []
    for i in range(k):
        out = tmp / f"{family}-{k}-{i}.json"
        env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": str(Path(__file__).parent)}
        if args.accelerator == "cpu":
            env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, __file__, "--child", family, "--accelerator", args.accelerator, "--width",
                   str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--folder", str(tmp / f"run-{family}-{k}-{i}")]  # fmt: skip
        processes.append(subprocess.Popen(command, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        outs.append(out)
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{family}, {k} runs together: a run failed:\n{err.decode()[-3000:]}")
    return sum(json.loads(out.read_text())["samples_per_second"] for out in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--runs", type=int, nargs="+", default=None, help="2 4 on a GPU, 2 on a CPU")
    parser.add_argument("--width", type=int, default=None, help="64 on a GPU, 8 on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="200 on a GPU, 40 on a CPU")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--child", choices=FAMILIES)
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.accelerator, args.width, args.steps, args.warmup, args.folder)
    args.accelerator = args.accelerator or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.accelerator == "cuda"
    args.width = args.width or (64 if gpu else 8)
    args.steps = args.steps or (200 if gpu else 40)
    args.runs = args.runs or ([2, 4] if gpu else [2])
    print(f"K runs of width {args.width} sharing one {args.accelerator} device, {args.steps} steps timed each:")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            alone = together(family, 1, args, Path(tmp))
            print(f"  {family:8s} 1 run: {alone:8.0f} samples/s")
            for k in args.runs:
                shared = together(family, k, args, Path(tmp))
                print(f"  {family:8s} {k} runs: {shared:8.0f} samples/s in all")
                print(f"ratio shared device {k}/1 {family}: {shared / alone:.2f}")


if __name__ == "__main__":
    main()
