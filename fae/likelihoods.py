"""Decoder families p_theta(x|z): the map from the decoder net's output to an image mean and an NLL.

The decoder net returns a pre-activation `out` (B, C, H, W); its `output_activation` (sigmoid for
images in [0, 1], tanh for [-1, 1]) gives the image mean mu_theta(z).

Both take `out` in float32 whatever the nets computed in: under bf16 mixed precision the nets run in
bfloat16 (8 bits of mantissa, ~0.4% per value), and the objective on top of them stays float32, since
the Gaussian's score (x - mu) / s^2 and the Hyvarinen terms built from it difference and rescale the
mean (fae.models.base keeps the encoder's heads in float32 for the same reason).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fae.errors import UserError
from fae.objectives import bernoulli_nll, gaussian_nll

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda t: t}


class Likelihood(nn.Module):
    """Base: `mean(out)` is mu_theta(z), `nll(out, x)` is -log p_theta(x|z) per sample, (B,)."""

    def __init__(self, output_activation: str) -> None:
        super().__init__()
        if output_activation not in ACTIVATIONS:
            raise UserError(f"unknown decoder output_activation {output_activation!r}: use one of {list(ACTIVATIONS)}")
        self.output_activation = output_activation

    def mean(self, out: Tensor) -> Tensor:
        return ACTIVATIONS[self.output_activation](out.float())

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def project(self) -> None:
        """Keep the learned parameters in their admissible set after an optimizer step (none by default)."""


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with mean sigmoid(out); needs a sigmoid decoder and x in [0, 1]."""

    def __init__(self, output_activation: str = "sigmoid") -> None:
        super().__init__(output_activation)
        if output_activation != "sigmoid":
            raise UserError(
                f"a Bernoulli likelihood needs a decoder with sigmoid output, this one has {output_activation}: "
                "use --model.likelihood gaussian"
            )

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return bernoulli_nll(out.float(), x)


class Gaussian(Likelihood):
    """N(mu_theta(z), s^2 I); s fixed, or learned as a parameter log s when `learn_scale`, then kept at or
    above `floor` (when given) by projecting log s onto [log floor, inf) after every optimizer step: a
    learned s makes the Gaussian losses unbounded below as the residual shrinks (the NLL falls as log s,
    the Hyvarinen score as -d / s^2), on data such as raw MNIST whose pixels are mostly exactly 0."""

    def __init__(
        self, output_activation: str, scale: float = 1.0, learn_scale: bool = False, floor: float | None = None
    ) -> None:
        super().__init__(output_activation)
        if not 1e-6 <= scale <= 1e6:  # s^2 and 1/s^2 stay far inside float32 (it overflows near 3e38)
            raise UserError(f"decoder_scale must be in [1e-6, 1e6], got {scale}")
        if floor is not None and not (learn_scale and 1e-6 <= floor <= scale):
            raise UserError(
                f"decoder_scale_floor {floor} needs a learned scale (learn_decoder_scale true) starting at or above "
                f"it (decoder_scale {scale}), and at least 1e-6"
            )
        self.log_floor = math.log(floor) if floor is not None else None
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return gaussian_nll(self.mean(out), x, self.log_scale)

    def project(self) -> None:
        if self.log_floor is not None:
            with torch.no_grad():
                self.log_scale.clamp_(min=self.log_floor)


def make_likelihood(
    name: str, output_activation: str, scale: float, learn_scale: bool, floor: float | None = None
) -> Likelihood:
    if name == "bernoulli":
        if floor is not None:
            raise UserError("decoder_scale_floor is a Gaussian decoder's: use --model.likelihood gaussian")
        return Bernoulli(output_activation)
    if name == "gaussian":
        return Gaussian(output_activation, scale, learn_scale, floor)
    raise UserError(f"unknown likelihood {name!r}: use 'bernoulli' or 'gaussian'")
