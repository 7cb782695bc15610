"""The robustness sweep's cost: `fae test` with the default sweep against one clean test pass (sweep off).

A VAE of the quickstart config (width `--width`, 64 by default) is trained for 2 steps (the weights do
not change the cost), then tested on the 500 embedded test digits `--repeats` times each way,
interleaved: `fae test ... --sweep.enabled false` is one pass computing the test metrics; with the sweep,
every batch is also corrupted and reconstructed at each of the sweep's levels (10 noise levels and 10
masking rates by default: 20 levels) and the grids and files are written. The test loop's time is
taken by a callback (`--trainer.callbacks+=`). Prints `ratio sweep/clean test:`; about 1 + (levels x a reconstruction's
share of a test step) is expected, and the same on a GPU.

A third way scores sample quality too (FID/KID through fae's MNIST classifier, fae.evaluation.quality:
the classifier's features of the clean images, of a sample and of the reconstruction at every level;
random classifier weights here, the cost is the same): `ratio sweep with FID/KID/sweep:`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from fae.cli import main as fae
from fae.evaluation.features import CLASSIFIER_FORMAT
from fae.nets.classifier import MNISTClassifier

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "digits_vae.yaml"
TIMES: list[float] = []


class TestTimer(L.Callback):
    """The test loop's seconds, into TIMES."""

    def on_test_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_test_end(self, trainer, pl_module) -> None:
        TIMES.append(time.perf_counter() - self.start)


def quiet(args: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fae(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    common = ["--config", str(CONFIG), "--model.width", str(args.width), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    seconds: dict[str, list[float]] = {"clean": [], "sweep": [], "quality": []}
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        run = ["--run_dir", str(Path(folder) / "run")]
        classifier = Path(folder) / "classifier.pt"
        torch.save({"format": CLASSIFIER_FORMAT, "state_dict": MNISTClassifier().state_dict()}, classifier)
        ways = {
            "clean": ["--sweep.enabled", "false"],
            "sweep": ["--sweep.quality", "off"],
            "quality": ["--sweep.features", str(classifier)],
        }
        quiet(["fit", *common, *run, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])
        for _ in range(args.repeats):
            for name, flags in ways.items():
                TIMES.clear()
                quiet(["test", *common, *run, "--ckpt_path", "last", *flags, "--trainer.callbacks+=__main__.TestTimer"])
                seconds[name] += TIMES
    clean, sweep, quality = (statistics.median(seconds[name]) for name in ways)
    print(
        f"fae test of 500 digits, VAE width {args.width}: clean pass {clean:.2f} s, with the sweep {sweep:.2f} s, "
        f"with the sweep and FID/KID {quality:.2f} s"
    )
    print(f"ratio sweep/clean test: {sweep / clean:.2f}")
    print(f"ratio sweep with FID/KID/sweep: {quality / sweep:.2f}")


if __name__ == "__main__":
    main()
