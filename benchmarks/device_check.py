"""The device check: every family's fit, test and sample on one accelerator, and the numbers that are
specified to be device-independent compared with the CPU's.

Runs in this process, as a user runs them (`fae.cli.main`), on `--accelerator` (cuda by default when
there is one):
  runs:    per family and per precision (`--precisions`: 32-true and bf16-mixed), `fae fit` of the
           quickstart config at `--width` (64, the paper's) for `--steps` steps, `fae test` of its
           last.ckpt with a 4-level sweep, `fae sample` of 64 images on the same device; prints the
           milliseconds a step took (fit's wall time / steps, start-up included) and the error at
           sigma 0.1
  parity:  the corruptions (fae.data.noise: a counter-based hash, so the same noise on any device) of
           the same test images drawn on the CPU and on the device, and `fae test` of the same float32
           checkpoint on both: the largest differences of the noise, the masks and the sweep's rows
Prints `device check <what>: ok|FAILED ...` per part and exits 1 when one failed. Without CUDA it says
so and checks nothing unless `--accelerator cpu` is given (then the parity is the CPU against itself:
what that tests is the script). benchmarks/gpu_check.sh runs it where a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fae.cli import main
from fae.data import BinaryMask, DigitsDataModule, GaussianNoise

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FAMILIES = ("vae", "fisher", "wae_gan")
SWEEP = ["--sweep.sigmas", "[0.1, 0.5]", "--sweep.nus", "[0.1, 0.5]"]
FAILED: list[str] = []


def fae(*args: str) -> str:
    """`fae ARGS` in this process; its output, or an entry in FAILED with its last lines."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(list(args))
    except SystemExit as stop:
        if stop.code not in (0, None):
            FAILED.append(f"fae {args[0]}")
            print(f"  fae {' '.join(args)}\n  failed ({stop.code}): {out.getvalue().strip()[-1500:]}")
            return ""
    return out.getvalue()


def rows(run: Path) -> dict[tuple[str, float, str], float]:
    """(kind, level, metric) -> mean of the newest robustness.json of a run."""
    (newest,) = sorted(run.glob("test-*/robustness.json"))[-1:]
    return {(r["kind"], r["level"], r["metric"]): r["mean"] for r in json.loads(newest.read_text())}


def config(family: str, width: int, accelerator: str, precision: str, test_batches: int) -> list[str]:
    return ["--config", str(CONFIGS / f"digits_{family}.yaml"), "--model.width", str(width),
            "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.precision", precision,
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "4", "--trainer.limit_test_batches", str(test_batches)]  # fmt: skip


def check_runs(args, folder: Path) -> None:
    device = "cuda" if args.accelerator == "cuda" else "cpu"
    for family in args.families:
        for precision in args.precisions:
            run = folder / f"{family}-{precision}"
            settings = config(family, args.width, args.accelerator, precision, args.test_batches)
            start = time.perf_counter()
            fae("fit", *settings, "--trainer.max_steps", str(args.steps), "--run_dir", str(run))
            seconds = time.perf_counter() - start
            last = run / "checkpoints" / "last.ckpt"
            if not last.is_file():
                print(f"device check runs {family} {precision}: FAILED (no last.ckpt)")
                continue
            fae("test", *settings, *SWEEP, "--run_dir", str(run), "--ckpt_path", str(last))
            sample = run / "sample.png"
            fae("sample", str(last), "--n", "64", "--device", device, "--out", str(sample))
            results = rows(run) if any(run.glob("test-*/robustness.json")) else {}
            low = next((mean for (kind, level, _), mean in results.items() if (kind, level) == ("gaussian", 0.1)), None)
            swept = [key for key in results if key[0] != "mean_image"]  # 4 levels, beside the mean image's row
            ok = len(swept) == 4 and all(map(math.isfinite, results.values())) and sample.is_file()
            print(f"device check runs {family} {precision}: {'ok' if ok else 'FAILED'}; fit {args.steps} steps in "
                  f"{seconds:.1f} s ({seconds / args.steps * 1e3:.1f} ms a step, start-up included), "
                  f"test error at sigma 0.1 {low if low is None else f'{low:.4f}'}, sample written")  # fmt: skip
            if not ok:
                FAILED.append(f"runs {family} {precision}")


def check_parity(args, folder: Path) -> None:
    device = torch.device("cuda" if args.accelerator == "cuda" else "cpu")
    data = DigitsDataModule()
    data.setup()
    x = data.to_float(data.splits["test"][:256])
    index = torch.arange(256)
    for corruption in (GaussianNoise(0.5, seed=3), BinaryMask(0.3, seed=3)):
        here = corruption(x, index)
        there = corruption(x.to(device), index.to(device)).cpu()
        gap = (here - there).abs().max().item()
        tolerance = 1e-5 if corruption.kind == "gaussian" else 0.0  # log and cos may differ in the last ulps
        print(f"device check parity {corruption.kind}: {'ok' if gap <= tolerance else 'FAILED'}; largest "
              f"difference CPU/{device.type} {gap:.2e} (at most {tolerance:g})")  # fmt: skip
        if gap > tolerance:
            FAILED.append(f"parity {corruption.kind}")
    for family in args.families:
        run = folder / f"{family}-32-true"
        last = run / "checkpoints" / "last.ckpt"
        if not last.is_file():
            continue
        on_cpu = folder / f"{family}-cpu-test"
        fae("test", *config(family, args.width, "cpu", "32-true", args.test_batches), *SWEEP, "--run_dir",
            str(on_cpu), "--ckpt_path", str(last))  # fmt: skip
        if not any(on_cpu.glob("test-*/robustness.json")):
            continue
        here, there = rows(on_cpu), rows(run)
        gaps = [abs(here[key] - there[key]) / max(abs(here[key]), 1e-12) for key in here if key in there]
        same = here.keys() == there.keys() and max(gaps) <= 1e-3
        print(f"device check parity sweep {family}: {'ok' if same else 'FAILED'}; {len(gaps)} rows, largest "
              f"relative difference CPU/{device.type} {max(gaps, default=0):.2e} (at most 1e-3: convolutions "
              "differ in summation order)")  # fmt: skip
        if not same:
            FAILED.append(f"parity sweep {family}")


def main_check() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--test_batches", type=int, default=8)
    args = parser.parse_args()
    if args.accelerator is None:
        if not torch.cuda.is_available():
            print("device check: no CUDA device here; nothing checked (benchmarks/gpu_check.sh runs it on a GPU, "
                  "`--accelerator cpu` checks the script on this CPU)")  # fmt: skip
            return
        args.accelerator = "cuda"
    if args.accelerator == "cuda":
        print(f"device check on {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    os.environ.setdefault("WANDB_MODE", "offline")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # their lines go to the real stderr
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        check_runs(args, Path(tmp))
        check_parity(args, Path(tmp))
    if FAILED:
        print(f"device check: FAILED: {', '.join(FAILED)}")
        sys.exit(1)
    print("device check: ok")


if __name__ == "__main__":
    main_check()
