"""Peak memory of a training step: the Fisher AE's (its double backward keeps graphs alive) against the VAE's.

Each measurement runs in a fresh process: the model (paper's MNIST nets, width 64; `--width`), Adam and a
batch of 64 embedded digits are built and one warm-up step is taken (Adam's state exists), the
process's resident-set peak is reset (Linux: /proc/self/clear_refs) and its resident size read, one
more step is taken, and the peak read again. The step's peak is the difference: activations, graphs
and gradients, without the weights and optimizer state that exist either way (glibc is told to map
and unmap large blocks, so that the resident size follows the live tensors). The median of `--repeats`
processes per family. Prints `ratio memory fisher/vae:` (and the WAE-GAN's). On a GPU the same tensors
are allocated; torch.cuda.max_memory_allocated would show a similar ratio (an estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FAMILIES = ("vae", "fisher", "wae_gan")
# glibc: every block above 64 KiB its own mapping, returned to the system when freed, so that the
# resident size follows the live tensors (by default freed memory is kept and would hide the step's peak)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(family: str, width: int) -> None:
    import torch

    from fae.data import DigitsDataModule
    from fae.models import VAE, WAEGAN, FisherAE
    from fae.nets import MNISTDecoder, MNISTEncoder

    torch.manual_seed(0)
    cls = {"vae": VAE, "fisher": FisherAE, "wae_gan": WAEGAN}[family]
    model = cls(MNISTEncoder, MNISTDecoder, latent_dim=8, width=width, grid_images=0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dm = DigitsDataModule()
    dm.setup()
    x = dm.to_float(dm.splits["train"][:64])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.model_step(x)["loss"].mean().backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current one
    before = status_kib("VmRSS")
    step()
    print(json.dumps({"step_peak_mib": (status_kib("VmHWM") - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=FAMILIES)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.width)
    peaks: dict[str, list[float]] = {family: [] for family in FAMILIES}
    for _ in range(args.repeats):
        for family in FAMILIES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", family, "--width", str(args.width)],
                capture_output=True, text=True, check=True, env={**os.environ, **MALLOC},
            )  # fmt: skip
            peaks[family].append(json.loads(out.stdout.strip().splitlines()[-1])["step_peak_mib"])
    median = {family: statistics.median(values) for family, values in peaks.items()}
    print(f"peak memory of one training step, MNIST nets width {args.width}, batch 64 (median of {args.repeats}):")
    print("  " + ", ".join(f"{family} {mib:.0f} MiB" for family, mib in median.items()))
    print(f"ratio memory fisher/vae: {median['fisher'] / median['vae']:.2f}")
    print(f"ratio memory wae_gan/vae: {median['wae_gan'] / median['vae']:.2f}")


if __name__ == "__main__":
    main()
