"""A corruption kind defined outside fae, as a user would add one: one class, then a config line
(`--sweep.corruptions+=tests.corruptions.Speckle --sweep.corruptions.level 0.5`)."""

from __future__ import annotations

from torch import Tensor

from fae.data.noise import Corruption, standard_normal


class Speckle(Corruption):
    """Multiplicative noise x (1 + level N(0, I)), keyed like every corruption."""

    kind = "speckle"
    label = "speckle noise level"

    def __init__(self, level: float, seed: int = 0) -> None:
        self.level, self.seed = float(level), int(seed)

    def __call__(self, x: Tensor, index: Tensor) -> Tensor:
        return x * (1 + self.level * standard_normal(self.key, index.to(x.device), tuple(x.shape[1:])).to(x.dtype))
