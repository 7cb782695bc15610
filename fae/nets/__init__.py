"""The paper's networks, per data set, each with a width parameter."""

from fae.nets.mnist import MNISTDecoder, MNISTEncoder

__all__ = ["MNISTDecoder", "MNISTEncoder"]
