"""Training-step time of the Fisher AE against the VAE on the paper's MNIST nets, side by side.

One step = forward, backward and Adam update on a batch of 64 real digits (the embedded set), with
the nets of supplement Table 1 at the paper's width (64; `--width` to change). The variants are timed
interleaved, the median of `--steps` steps each after warm-up, and printed with their ratio to the
VAE. Target (issue 3): the Fisher step at most 1.5x the VAE step at batch 64 on a 2-core CPU.

"fisher" is the default (per_sample BatchNorm: an extra pass records the batch statistics, and the
weights' gradient flows back through it); "fisher-batchbn" is ordinary BatchNorm (not per sample) and
"fisher-running" the running-statistics mode (per sample, trains poorly): their difference to
"fisher" is the price of exact per-sample derivatives with the paper's BatchNorm nets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fae.data import DigitsDataModule
from fae.models import VAE, FisherAE
from fae.nets import MNISTDecoder, MNISTEncoder


def make(kind: str, width: int):
    nets = dict(encoder=MNISTEncoder, decoder=MNISTDecoder, latent_dim=8, width=width)
    if kind == "vae":
        return VAE(**nets, grid_images=0)
    if kind == "vae-gaussian":
        return VAE(**nets, likelihood="gaussian", grid_images=0)
    stability = "total" if kind == "fisher-total" else "fixed_z"
    batchnorm = {"fisher-batchbn": "batch", "fisher-running": "running"}.get(kind, "per_sample")
    return FisherAE(**nets, stability=stability, batchnorm=batchnorm, grid_images=0)


def step_seconds(model, optimizer, x) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model.model_step(x)["loss"].mean().backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.setup()
    x = dm.to_float(dm.splits["train"][: args.batch])
    kinds = ["vae", "vae-gaussian", "fisher", "fisher-running", "fisher-total", "fisher-batchbn"]
    models = {k: make(k, args.width).train() for k in kinds}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.steps + 2):
        for k in kinds:
            seconds = step_seconds(models[k], optimizers[k], x)
            if i >= 2:  # warm-up
                times[k].append(seconds)
    base = statistics.median(times["vae"])
    print(f"training step, MNIST nets width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads:")
    for k in kinds:
        t = statistics.median(times[k])
        print(f"  {k:15s} {t * 1e3:8.1f} ms   {t / base:5.2f}x the VAE")
    print(f"ratio fisher / vae: {statistics.median(times['fisher']) / base:.2f}")


if __name__ == "__main__":
    main()
