"""The nets' normalisation layer, chosen by name: the paper's BatchNorm, or a per-sample alternative.

- "batch": BatchNorm2d, as in the supplement's tables. In training mode it couples the samples of a
  batch; the Fisher AE makes it per sample with fae.nets.batchnorm (its `batchnorm` option).
- "group": GroupNorm with up to 8 groups (statistics over each sample's own channels and pixels), per
  sample in training and at test time alike, with no running statistics; not in the paper.
- "none": no normalisation; not in the paper.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from fae.errors import UserError

Norm = Literal["batch", "group", "none"]
GROUPS = 8


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A normalisation layer for `channels` feature maps."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUPS, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"unknown norm {kind!r}: use 'batch' (the paper's), 'group' or 'none'")
