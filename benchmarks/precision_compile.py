"""Step time of each family in bf16 mixed precision and with compiled nets, against float32 eager, side by side.

One step = the family's objective (`model_step`), backward and Adam on a batch of 64 embedded digits,
with the paper's MNIST nets (width 64; `--width`); the WAE-GAN's discriminator update is included as fae
makes it. Variants, timed interleaved (median of `--steps` steps after warm-up):
  fp32      float32, eager (the default)
  bf16      under torch.autocast("cpu", bfloat16), which is what --trainer.precision bf16-mixed wraps
            each training step in on a CPU (torch.autocast("cuda", ...) on a GPU)
  compiled  the nets compiled in place, as --model.compile_nets true does (the first steps compile:
            the warm-up excludes them, their seconds are printed); the Fisher AE cannot be compiled
            (its objective differentiates the nets twice), and says so
Prints `ratio bf16/fp32 <family>:` and `ratio compiled/fp32 <family>:`. On a CPU without bf16 matrix
units bf16 is usually slower, not faster; on an A100/H100 class GPU bf16 convolutions typically run
~2x faster than float32: an estimate until `--device cuda` measures it (benchmarks/gpu_check.sh).
Adam is fused, as fae builds it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from fae.data import DigitsDataModule
from fae.models import VAE, WAEGAN, FisherAE
from fae.nets import MNISTDecoder, MNISTEncoder

FAMILIES = {"vae": VAE, "fisher": FisherAE, "wae_gan": WAEGAN}


class Stepper:
    """One family's model and optimizers, stepping in one precision, eager or compiled."""

    def __init__(self, family: str, width: int, precision: str, compiled: bool, device: torch.device) -> None:
        torch.manual_seed(0)
        self.family, self.device = family, device
        model = FAMILIES[family](MNISTEncoder, MNISTDecoder, latent_dim=8, width=width, grid_images=0)
        self.model = model.train().to(device)
        self.model.compile_nets = compiled
        self.compiled = compiled and self.model.compile_refusal is None
        if self.compiled:
            self.model.maybe_compile_nets()
        self.precision = precision
        if family == "wae_gan":
            self.optimizer = torch.optim.Adam(self.model.autoencoder_parameters(), lr=1e-4, fused=True)
            self.discriminator_optimizer = torch.optim.Adam(self.model.discriminator.parameters(), lr=1e-4, fused=True)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, fused=True)

    def context(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def wait(self) -> None:
        """On a GPU, the queued kernels finished, so that the clock reads the step's own time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, x: torch.Tensor) -> float:
        self.wait()
        start = time.perf_counter()
        with self.context():
            codes = self.model.encode(x) if self.family == "wae_gan" else None  # one encoding, as the family's step
        if codes is not None:
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            with self.context():
                disc = self.model.discriminator_terms(codes.detach())["disc_loss"].mean()
            disc.backward()
            self.discriminator_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            loss = (self.model.objective(x, codes) if codes is not None else self.model.model_step(x))["loss"].mean()
        loss.backward()
        self.optimizer.step()
        self.wait()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dm = DigitsDataModule()
    dm.setup()
    x = dm.to_float(dm.splits["train"][:64]).to(device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"training step, MNIST nets width {args.width}, batch 64, {where}:")
    for family in FAMILIES:
        steppers = {
            "fp32": Stepper(family, args.width, "fp32", compiled=False, device=device),
            "bf16": Stepper(family, args.width, "bf16", compiled=False, device=device),
            "compiled": Stepper(family, args.width, "fp32", compiled=True, device=device),
        }
        if not steppers["compiled"].compiled:
            print(f"  {family}: not compiled: {steppers['compiled'].model.compile_refusal}")
            del steppers["compiled"]
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for i in range(args.warmup + args.steps):
            for name, stepper in steppers.items():
                seconds = stepper.step(x)
                if i == 0 and name == "compiled":
                    print(f"  {family}: the first compiled step (compiling) took {seconds:.0f} s")
                if i >= args.warmup:
                    times[name].append(seconds)
        median = {name: statistics.median(values) for name, values in times.items()}
        print("  " + ", ".join(f"{family} {name} {seconds * 1e3:.0f} ms" for name, seconds in median.items()))
        print(f"ratio bf16/fp32 {family}: {median['bf16'] / median['fp32']:.2f}")
        if "compiled" in median:
            print(f"ratio compiled/fp32 {family}: {median['compiled'] / median['fp32']:.2f}")


if __name__ == "__main__":
    main()
