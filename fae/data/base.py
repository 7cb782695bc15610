"""What every fae data module shares: images held in memory as uint8, batches (x, index, target).

A data set is loaded once into three uint8 tensors (train, val, test), each (N, C, H, W). Loaders
fetch whole batches by fancy indexing (no per-sample PIL work, no per-sample collation); the
conversion to float happens on the batch, after it reaches the device. Each sample carries its
index within its split, the key of its test-time noise (fae.data.noise).

A batch reaching a model is a `Batch(x, index, target)`: `x` is what the model sees, `target` is
the clean image its reconstruction is scored against. They are the same tensor unless a
`corruption` is set, which corrupts `x` of test and predict batches only: models are trained on
clean data and corrupted only at test time (DESIGN.md section 3).
"""

from __future__ import annotations

from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fae.data.noise import Corruption


class Batch(NamedTuple):
    x: Tensor  # (B, C, H, W) float, what the model sees
    index: Tensor  # (B,) int64, index of each sample within its split
    target: Tensor  # (B, C, H, W) float, the clean image


class IndexedImages(Dataset):
    """uint8 images (N, C, H, W) served as (image, index); batched fetches are one indexing op."""

    def __init__(self, images: Tensor) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], torch.tensor(i)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[index], index


def collate_batch(fetched: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """`IndexedImages.__getitems__` already returns a stacked batch: nothing left to collate."""
    return fetched


class InMemoryImageDataModule(L.LightningDataModule):
    """Base for fae's data modules: subclasses implement `load_splits` and `to_float`."""

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        corruption: Corruption | None = None,
    ) -> None:
        """
        Args:
            batch_size: training batch size (per device).
            eval_batch_size: batch size for validation, test and predict (default: batch_size).
            num_workers: DataLoader worker processes (0 loads in the main process; the data is in
                memory, so workers rarely help).
            corruption: a test-time corruption (fae.data.noise.GaussianNoise or BinaryMask) applied
                to the images of test and predict batches; reconstructions are still scored
                against the clean image.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.corruption = corruption
        self.splits: dict[str, Tensor] = {}

    # --- what a subclass provides -------------------------------------------------------------
    def load_splits(self) -> dict[str, Tensor]:
        """Return {"train", "val", "test"}: uint8 tensors (N, C, H, W)."""
        raise NotImplementedError

    def check_available(self) -> None:
        """Raise fae.errors.UserError, saying how to supply the data, when it cannot be loaded."""

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 -> the float range the decoder produces ([0, 1] by default)."""
        return images.float() / 255.0

    # --- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.load_splits()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        self.setup()
        return tuple(self.splits["train"].shape[1:])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            IndexedImages(self.splits[split]),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> Batch:
        images, index = batch
        x = self.to_float(images)  # (B, C, H, W)
        trainer = self.trainer
        evaluating = trainer is not None and (trainer.testing or trainer.predicting)
        if self.corruption is not None and evaluating:
            return Batch(self.corruption(x, index), index, x)
        return Batch(x, index, x)
