"""Data modules (MNIST, Fashion-MNIST, embedded digits, CelebA, any folder of images) and test-time corruptions."""

from fae.data.base import Batch, InMemoryImageDataModule
from fae.data.celeba import CelebADataModule
from fae.data.digits import DigitsDataModule
from fae.data.folder import ImageFolderDataModule
from fae.data.mnist import FashionMNISTDataModule, MNISTDataModule
from fae.data.noise import BinaryMask, Corruption, GaussianNoise

__all__ = [
    "Batch",
    "BinaryMask",
    "CelebADataModule",
    "Corruption",
    "DigitsDataModule",
    "GaussianNoise",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
]
