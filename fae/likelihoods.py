"""Decoder families p_theta(x|z): the map from the decoder net's output to an image mean and an NLL.

The decoder net returns a pre-activation `out` (B, C, H, W); its `output_activation` (sigmoid for
images in [0, 1], tanh for [-1, 1]) gives the image mean mu_theta(z).

Both take `out` in float32 whatever the nets computed in: under bf16 mixed precision the nets run in
bfloat16 (8 bits of mantissa, ~0.4% per value), and the objective on top of them stays float32, since
the Gaussian's score (x - mu) / s^2 and the Hyvarinen terms built from it difference and rescale the
mean (fae.models.base keeps the encoder's heads in float32 for the same reason).
"""

from __future__ import annotations

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
    """N(mu_theta(z), s^2 I); s fixed, or learned as a parameter log s when `learn_scale`."""

    def __init__(self, output_activation: str, scale: float = 1.0, learn_scale: bool = False) -> None:
        super().__init__(output_activation)
        if not 1e-6 <= scale <= 1e6:  # s^2 and 1/s^2 stay far inside float32 (it overflows near 3e38)
            raise UserError(f"decoder_scale must be in [1e-6, 1e6], got {scale}")
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def nll(self, out: Tensor, x: Tensor) -> Tensor:
        return gaussian_nll(self.mean(out), x, self.log_scale)


def make_likelihood(name: str, output_activation: str, scale: float, learn_scale: bool) -> Likelihood:
    if name == "bernoulli":
        return Bernoulli(output_activation)
    if name == "gaussian":
        return Gaussian(output_activation, scale, learn_scale)
    raise UserError(f"unknown likelihood {name!r}: use 'bernoulli' or 'gaussian'")
