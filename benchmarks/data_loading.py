"""Batch loading: fae's in-memory uint8 batches vs torchvision's per-sample PIL pipeline, side by side.

Both read the same 4000 training digits (the embedded quickstart set, so no download) in batches of
64 and produce float tensors in [0, 1]:
  fae:         IndexedImages.__getitems__ (one fancy-indexing op per batch), then x.float() / 255
  per-sample:  PIL.Image.fromarray + transforms.ToTensor per image, then default_collate
Prints the time per epoch of each and their ratio (the median of 5 epochs each, interleaved).
"""

from __future__ import annotations

import statistics
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fae.data import DigitsDataModule


class PerSamplePIL(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.to_tensor(Image.fromarray(self.images[i, 0].numpy(), mode="L")), i


def epoch_seconds(loader: DataLoader, convert) -> float:
    start = time.perf_counter()
    for images, _index in loader:
        x = convert(images)
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0
    return time.perf_counter() - start


def main() -> None:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    fae_loader = dm.train_dataloader()
    pil_loader = DataLoader(PerSamplePIL(dm.splits["train"]), batch_size=64, shuffle=True)
    fae_times, pil_times = [], []
    for _ in range(5):
        fae_times.append(epoch_seconds(fae_loader, dm.to_float))
        pil_times.append(epoch_seconds(pil_loader, lambda x: x))
    fae_s, pil_s = statistics.median(fae_times), statistics.median(pil_times)
    print(f"epoch of 4000 digits, batch 64: fae in-memory {fae_s * 1e3:.1f} ms, per-sample PIL {pil_s * 1e3:.1f} ms")
    print(f"ratio per-sample PIL / fae: {pil_s / fae_s:.1f}")


if __name__ == "__main__":
    main()
