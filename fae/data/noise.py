"""Test-time corruptions of images, drawn from a counter-based generator keyed per sample.

The paper's experiments corrupt clean test images in two ways (Elkhalil et al. 2021):

    Gaussian noise:  x_noisy = x + sigma * N(0, I)            (no clipping)
    binary masking:  each pixel (all channels together) set to zero with probability nu

A corruption kind is one subclass of `Corruption` (its `kind`, the axis `label` of its level, and
`__call__`); the robustness sweep takes any list of them (`--sweep.corruptions`).

Every model must see the SAME corrupted images. A stateful generator (torch.Generator) cannot
promise that: what a sample receives would depend on the batch it falls in, the worker that loads
it, the device and the number of devices. Here the noise of element e of sample i is a pure
function of (seed, kind, level, i, e): a 32-bit integer hash (Wellons' "lowbias32") of that
counter, evaluated with exact int64 tensor arithmetic, turned into uniforms on a grid of
step 2^-23 (exact in float32) and into normals by Box-Muller. It is therefore identical whatever
the batch size, worker count, number of devices or device type, and costs a few elementwise ops.
"""

from __future__ import annotations

import copy
import hashlib
import math
import struct
from typing import ClassVar

import torch
from torch import Tensor

from fae.errors import UserError

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), without int64 overflow (split in 16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons): a bijective 32-bit avalanche hash, on int64 tensors in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, kind: str, level: float) -> int:
    """A 32-bit key naming one noise stream: (seed, kind, level). Stable across runs and machines."""
    payload = f"{int(seed)}|{kind}|".encode() + struct.pack("<d", float(level))
    return int.from_bytes(hashlib.blake2b(payload, digest_size=4).digest(), "little")


def uniform(key: int, index: Tensor, shape: tuple[int, ...], stream: int = 0) -> Tensor:
    """Uniforms in (0, 1), one tensor of `shape` per sample: returns (B, *shape), float32.

    Element e of sample i is a function of (key, i, stream, e) only. `stream` separates several
    independent draws for the same sample (Box-Muller needs two).
    """
    index = index.to(torch.int64).reshape(-1, *([1] * len(shape)))  # (B, 1, ...)
    numel = math.prod(shape)
    counter = torch.arange(numel, device=index.device, dtype=torch.int64).reshape(shape)
    counter = counter * 2 + stream  # (*shape)
    sample_key = _mix32((index + ((key * 0x9E3779B9) & _MASK32)) & _MASK32)  # (B, 1, ...)
    bits = _mix32(_mix32(counter ^ sample_key) ^ _mix32(sample_key ^ 0x5BD1E995))  # (B, *shape)
    return ((bits >> 9) * 2 + 1).to(torch.float32) / float(1 << 24)  # odd / 2^24: exact in float32


def standard_normal(key: int, index: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Standard normals (B, *shape), float32, by Box-Muller on two uniform streams (|z| < 5.8)."""
    u1 = uniform(key, index, shape, stream=0)
    u2 = uniform(key, index, shape, stream=1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


class Corruption:
    """A corruption maps a batch of clean images (B, C, H, W) and their sample indices (B,) to
    corrupted images of the same shape, deterministically in (seed, kind, level, index). A subclass
    names its `kind`, the `label` of its level (a figure's axis) and the level's short `level_name` (the
    x of its W&B curves), sets `level` and `seed`, and draws its noise from `uniform`/`standard_normal`
    keyed by `self.key`."""

    kinds: ClassVar[dict[str, type[Corruption]]] = {}  # every kind defined, by name
    kind: ClassVar[str]
    label: ClassVar[str]
    level_name: ClassVar[str] = "level"
    level: float
    seed: int

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # a kind of its own (not an intermediate base)
            Corruption.kinds[cls.kind] = cls

    @property
    def key(self) -> int:
        return stream_key(self.seed, self.kind, self.level)

    def seeded(self, seed: int) -> Corruption:
        """A copy drawing its noise from `seed` (the sweep's: every model sees the same images)."""
        other = copy.copy(self)
        other.seed = int(seed)
        return other

    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level}, seed={self.seed})"


def corruption_label(kind: str) -> str:
    """The axis label of a corruption kind's level (the kind itself for one not defined here)."""
    return getattr(Corruption.kinds.get(kind), "label", kind)


def corruption_level_name(kind: str) -> str:
    """The short name of a corruption kind's level: sigma, nu ("level" for a kind not defined here)."""
    return getattr(Corruption.kinds.get(kind), "level_name", "level")


class GaussianNoise(Corruption):
    """x_noisy = x + sigma * N(0, I), the noise keyed by (seed, "gaussian", sigma, sample index)."""

    kind = "gaussian"
    label = "Gaussian noise sigma"
    level_name = "sigma"

    def __init__(self, sigma: float, seed: int = 0) -> None:
        if not sigma >= 0:
            raise UserError(f"GaussianNoise: sigma must be >= 0, got {sigma}")
        self.level = float(sigma)
        self.seed = int(seed)

    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        eps = standard_normal(self.key, index.to(x.device), tuple(x.shape[1:]))  # (B, C, H, W)
        return x + self.level * eps.to(x.dtype)


class BinaryMask(Corruption):
    """Each pixel, all channels together, set to zero with probability nu; keyed like GaussianNoise."""

    kind = "mask"
    label = "masking probability nu"
    level_name = "nu"

    def __init__(self, nu: float, seed: int = 0) -> None:
        if not 0.0 <= nu <= 1.0:
            raise UserError(f"BinaryMask: nu must be a probability in [0, 1], got {nu}")
        self.level = float(nu)
        self.seed = int(seed)

    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        u = uniform(self.key, index.to(x.device), (1, *x.shape[2:]))  # (B, 1, H, W): one draw per pixel
        return x * (u >= self.level).to(x.dtype)
