"""CelebA batches: decoding JPEGs every epoch vs fae's one-time conversion to a memory-mapped uint8 array.

No CelebA exists on these machines, so the script writes synthetic 178 x 218 "faces" (smooth colour
gradients with a blurred texture, JPEG quality 90: about 8 KB a file, the official zip averages 7 KB)
in the official layout, and times, side by side, for batches of 64 at 64x64:
  decode:   fae.data.folder.ImageFiles (read, decode, centre crop 140, antialiased resize), one process
  memmap:   what fae trains from: a random batch of the converted array (fancy indexing)
Both give the same uint8 batch (3, 64, 64 per image); the conversion to [-1, 1] follows on the device either way.
  step:     one training step of the VAE on the paper's CelebA nets (`--width`, 64 = Table 3)
It prints the medians and the ratios decode / memmap and decode / step: decoding in the training process
adds the former to every step, which on a GPU (where a step of these nets takes tens of milliseconds)
would leave the GPU waiting.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from fae.data import CelebADataModule
from fae.data.celeba import IMAGES, PARTITION
from fae.data.folder import ImageFiles
from fae.models import VAE
from fae.nets import CelebADecoder, CelebAEncoder


def write_faces(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    (root / IMAGES).mkdir(parents=True)
    yy, xx = np.mgrid[0:218, 0:178] / 218.0
    files = []
    for i in range(1, n + 1):
        gradient = yy[..., None] * rng.uniform(-60, 60, 3) + xx[..., None] * rng.uniform(-60, 60, 3)
        noise = Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8))
        texture = 0.6 * (np.asarray(noise.filter(ImageFilter.GaussianBlur(1.5)), dtype=float) - 128)
        image = (rng.uniform(40, 215, 3) + gradient + texture).clip(0, 255).astype(np.uint8)
        files.append(root / IMAGES / f"{i:06d}.jpg")
        Image.fromarray(image).save(files[-1], quality=90)
    codes = [0] * (n - 2 * (n // 10)) + [1] * (n // 10) + [2] * (n // 10)
    (root / PARTITION).write_text("".join(f"{f.name} {c}\n" for f, c in zip(files, codes, strict=True)))
    return files


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_faces(Path(tmp), args.images)
        kb = np.mean([f.stat().st_size for f in files]) / 1024
        faces = ImageFiles(files, 3, 140, 64)
        dm = CelebADataModule(data_dir=tmp, batch_size=64)
        start = time.perf_counter()
        dm.setup()  # the one-time conversion
        convert_s = time.perf_counter() - start
        train = dm.splits["train"]
        batches = [torch.randperm(len(train))[:64] for _ in range(10)]
        decode = median_ms(lambda: faces.__getitems__(batches[0].tolist()), 5)
        cycle = itertools.cycle(batches)
        median_ms(lambda: train[next(cycle)], 10)  # warm-up: every batch once
        memmap = median_ms(lambda: train[next(cycle)], 200)
        model = VAE(
            CelebAEncoder,
            CelebADecoder,
            latent_dim=64,
            width=args.width,
            image_shape=dm.image_shape,
            likelihood="gaussian",
            grid_images=0,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = dm.to_float(train[batches[0]])

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model.model_step(x)["loss"].mean().backward()
            optimizer.step()

        step()  # warm-up
        step_ms = median_ms(step, args.steps)
    print(f"CelebA batches of 64 at 64x64, {torch.get_num_threads()} threads, synthetic JPEGs of {kb:.1f} KB:")
    print(f"  decode JPEGs (one process)  {decode:8.1f} ms   {64e3 / decode:6.0f} images/s")
    print(f"  memory-mapped uint8 array   {memmap:8.2f} ms   {64e3 / memmap:6.0f} images/s")
    print(f"  VAE training step, width {args.width:<3d} {step_ms:8.1f} ms")
    rate = len(files) / convert_s
    print(f"one-time conversion: {rate:.0f} images/s, all 202,599 CelebA images in about {202599 / rate:.0f} s")
    print(f"ratio decode / memmap: {decode / memmap:.0f}")
    print(f"ratio decode / training step: {decode / step_ms:.3f}")


if __name__ == "__main__":
    main()
