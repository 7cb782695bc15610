"""What every fae data module shares: images held in memory as uint8, batches (x, index, target).

A data set is loaded once into three uint8 tensors (train, val, test), each (N, C, H, W). Loaders
fetch whole batches by fancy indexing (no per-sample PIL work, no per-sample collation); the
conversion to float happens on the batch, after it reaches the device. Each sample carries its
index within its split, the key of its test-time noise (fae.data.noise).

A batch reaching a model is a `Batch(x, index, target)`: `x` is what the model sees, `target` is
the clean image its reconstruction is scored against. They are the same tensor unless a
`corruption` is set, which corrupts `x` of test and predict batches only: models are trained on
clean data and corrupted only at test time, as in the paper's experiments.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fae.data.noise import Corruption
from fae.errors import UserError


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


class EpochShuffle(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) only: the same order in a resumed run as in an
    uninterrupted one. Lightning calls `set_epoch` at the start of every epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch: its state is the number of batches of the
    current epoch already trained on (`batches_done`, read from the trainer when a checkpoint is
    saved); after loading it, the next iteration skips that many batches. With `EpochShuffle` the
    remaining batches are exactly those the interrupted run would have seen."""

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self.batches_done()) if self.batches_done else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        done = state.get("batches_done", 0)
        self._skip = done if done < len(self) else 0  # a checkpoint at an epoch's end starts a new epoch

    def __iter__(self):
        skip, self._skip = self._skip, 0
        # lazily: the sampler must not start before Lightning has set the epoch; skipping in-memory
        # batches costs an indexing op each
        return itertools.islice(super().__iter__(), skip, None)


class InMemoryImageDataModule(L.LightningDataModule):
    """Base for fae's data modules: subclasses implement `load_splits` and `to_float`, and declare their
    pixels' range and the reconstruction error a model is scored by on them (the model reads both)."""

    pixel_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    recon_metric: ClassVar[str] = "bce"  # fae.objectives.RECONSTRUCTION_ERRORS: BCE for [0, 1] pixels

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
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise UserError(f"batch_size and eval_batch_size must be >= 1, got {batch_size} and {eval_batch_size}")
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (0: load in the main process), got {num_workers}")
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
        """(C, H, W) of the images, which the CLI passes to the model for its nets; a data set that
        knows it without loading declares it (MNIST's (1, 28, 28)), others load their splits here."""
        self.setup()
        return tuple(self.splits["train"].shape[1:])

    def _loader(self, split: str, **kwargs: Any) -> DataLoader:
        self.setup()
        loader = ResumableDataLoader if split == "train" else DataLoader
        return loader(
            IndexedImages(self.splits[split]),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_batch,
            # its own generator: starting an iteration does not draw from the global random stream,
            # so a resumed run's stream continues exactly where the checkpoint left it
            generator=torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0))),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch) with the seed of seed_everything, resumable mid-epoch."""
        self.setup()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._loader(
            "train", sampler=EpochShuffle(len(self.splits["train"]), seed), batches_done=self._train_batches_done
        )

    def _train_batches_done(self) -> int:
        """Batches of the current epoch trained on (what a resumed run must skip)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> Batch:
        images, index = batch
        x = self.to_float(images)  # (B, C, H, W)
        trainer = self.trainer
        evaluating = trainer is not None and (trainer.testing or trainer.predicting)
        if self.corruption is not None and evaluating:
            return Batch(self.corruption(x, index), index, x)
        return Batch(x, index, x)
