"""The paper's networks, per data set, each with a width parameter."""

from fae.nets.celeba import CelebADecoder, CelebAEncoder
from fae.nets.mnist import MNISTDecoder, MNISTEncoder

__all__ = ["CelebADecoder", "CelebAEncoder", "MNISTDecoder", "MNISTEncoder"]
