"""MNIST (LeCun et al.) and Fashion-MNIST (Xiao, Rasul and Vollgraf 2017) from their four IDX files, read by
torchvision, held in memory as uint8.

Both: 60,000 training images, of which `val_size` are carved off for validation by a fixed permutation
(`split_seed`); the 10,000 test images for testing. Values in [0, 1], shape (1, 28, 28). Fashion-MNIST
has MNIST's format and layout (DATA_DIR/FashionMNIST/raw/), so it is MNIST's module with another
reader, name and FID classifier file.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import MNIST, FashionMNIST

from fae.data.base import InMemoryImageDataModule
from fae.data.noise import Corruption
from fae.errors import UserError, short_reason

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


CLASSIFIER_FILE = "fae_mnist_classifier.pt"  # `fae classifier` caches its feature network here, beside MNIST/


def split_permutation(n: int, seed: int) -> Tensor:
    """A fixed permutation of range(n): the same for every run, model and device given the seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class MNISTDataModule(InMemoryImageDataModule):
    """MNIST digits, (1, 28, 28) in [0, 1]; batches are fae.data.base.Batch."""

    image_shape = (1, 28, 28)
    name = "MNIST"
    reader = MNIST  # torchvision's reader of the IDX files, in DATA_DIR/<its class name>/raw/
    classifier_file = CLASSIFIER_FILE

    def __init__(
        self,
        data_dir: str = "./data",
        download: bool = False,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        corruption: Corruption | None = None,
    ) -> None:
        """
        Args:
            data_dir: folder holding MNIST/raw/ (FashionMNIST/raw/ for Fashion-MNIST) with the four
                uncompressed IDX files (the layout torchvision's MNIST and FashionMNIST read).
            download: fetch the files into data_dir when they are missing.
            val_size: training images held out for validation.
            split_seed: seed of the fixed train/validation permutation.
        """
        super().__init__(batch_size, eval_batch_size, num_workers, corruption)
        if not 0 < val_size < 60000:
            raise UserError(f"val_size must be in (0, 60000), got {val_size}")
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_size = val_size
        self.split_seed = split_seed

    @property
    def feature_network(self) -> Path:
        """Where `fae classifier --data_dir DATA_DIR` caches the network of FID/KID (fae.evaluation.features)."""
        return self.data_dir / self.classifier_file

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.reader.__name__ / "raw"

    def _missing(self) -> list[str]:
        return [name for name in RAW_FILES if not (self.raw_dir / name).is_file()]

    def prepare_data(self) -> None:
        if self._missing() and self.download:
            self._download()

    def _download(self) -> None:
        """Download into a temporary folder beside data_dir and move it in only when complete."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.data_dir, prefix=".mnist-download-") as tmp:
            try:
                self.reader(tmp, train=True, download=True)
                self.reader(tmp, train=False, download=True)
            except Exception as err:  # torchvision raises RuntimeError or URLError per mirror
                raise UserError(
                    f"{self.name} download failed ({short_reason(err)}); nothing was written to {self.data_dir}. "
                    f"Put the four IDX files ({', '.join(RAW_FILES)}) in {self.raw_dir} and run "
                    "again with --data.download false."
                ) from err
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            for name in RAW_FILES:
                shutil.move(str(Path(tmp) / self.reader.__name__ / "raw" / name), self.raw_dir / name)

    def check_available(self) -> None:
        if not self.download:  # else prepare_data fetches what is missing
            self._raise_if_missing()

    def _raise_if_missing(self) -> None:
        missing = self._missing()
        if missing:
            raise UserError(
                f"{self.name} not found: {self.raw_dir} lacks {', '.join(missing)}. Point --data.data_dir "
                f"at a folder holding {self.reader.__name__}/raw/ with the four uncompressed IDX files, or pass "
                "--data.download true where the network allows it."
            )

    def load_splits(self) -> dict[str, Tensor]:
        train = self.read(train=True)  # (60000, 1, 28, 28)
        test = self.read(train=False)  # (10000, 1, 28, 28)
        perm = split_permutation(len(train), self.split_seed)
        return {
            "train": train[perm[self.val_size :]],
            "val": train[perm[: self.val_size]],
            "test": test,
        }

    def read(self, train: bool, labels: bool = False, full: bool = True) -> Tensor | tuple[Tensor, Tensor]:
        """The training (60000) or test (10000) images, (N, 1, 28, 28) uint8, and with `labels` their
        classes (N,); a missing, truncated or corrupt file as one line. `full=False` accepts any number
        of images in MNIST's format (a subset, or another digit set in its layout)."""
        self._raise_if_missing()
        try:
            dataset = self.reader(str(self.data_dir), train=train, download=False)
            images, targets = dataset.data, dataset.targets
        except Exception as err:
            raise UserError(
                f"cannot read {self.name} from {self.raw_dir} ({type(err).__name__}: {err}); the files "
                "may be truncated or corrupt: replace them with the original IDX files."
            ) from err
        expected = (60000 if train else 10000, 28, 28) if full else (len(images), 28, 28)
        if tuple(images.shape) != expected or images.dtype != torch.uint8 or len(targets) != len(images):
            raise UserError(
                f"{self.name} in {self.raw_dir} has images of shape {tuple(images.shape)} ({images.dtype}) and "
                f"{len(targets)} labels, expected {expected} uint8 and as many labels: replace the files with the "
                "original IDX files."
            )
        return (images.unsqueeze(1), targets) if labels else images.unsqueeze(1)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST's clothing images (10 classes), (1, 28, 28) in [0, 1]: MNIST's module, format and
    splits, read from DATA_DIR/FashionMNIST/raw/; its FID classifier is cached as
    DATA_DIR/fae_fashion_mnist_classifier.pt (`fae classifier --dataset fashion_mnist`)."""

    name = "Fashion-MNIST"
    reader = FashionMNIST
    classifier_file = "fae_fashion_mnist_classifier.pt"
