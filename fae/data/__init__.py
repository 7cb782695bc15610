"""Data modules (MNIST, embedded digits) and test-time corruptions."""

from fae.data.base import Batch, InMemoryImageDataModule
from fae.data.digits import DigitsDataModule
from fae.data.mnist import MNISTDataModule
from fae.data.noise import BinaryMask, Corruption, GaussianNoise

__all__ = [
    "Batch",
    "BinaryMask",
    "Corruption",
    "DigitsDataModule",
    "GaussianNoise",
    "InMemoryImageDataModule",
    "MNISTDataModule",
]
