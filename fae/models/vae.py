"""The VAE baseline (Kingma and Welling 2014) on the paper's nets.

Gaussian encoder q_phi(z|x) = N(mu(x), diag sigma(x)^2), reparameterised z = mu + sigma * eps,
prior N(0, I), decoder likelihood Bernoulli (MNIST default) or Gaussian N(mu_theta(z), s^2 I).
Per-sample negative ELBO, one z sample per data point:

    L(x) = -log p_theta(x|z) + KL(q_phi(z|x) || N(0, I))
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from fae.errors import UserError
from fae.models.gaussian import GaussianAutoEncoder
from fae.nets.contract import DecoderFactory, EncoderFactory
from fae.objectives import dequantise, kl_to_standard_normal


class VAE(GaussianAutoEncoder):
    """Variational auto-encoder; logs loss (negative ELBO), nll and kl, and on validation the
    reconstruction error and the posterior Fisher divergence."""

    terms = ("loss", "nll", "kl")

    def __init__(
        self,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        decoder_scale: float = 1.0,
        learn_decoder_scale: bool = False,
        decoder_scale_floor: float | None = None,
        input_noise: float = 0.0,
        **kwargs,
    ) -> None:
        """
        Args:
            encoder, decoder: the nets, as fae.models.base.AutoEncoder builds them (a Gaussian encoder:
                two heads, mean and log-variance).
            likelihood: the decoder family p_theta(x|z).
            decoder_scale: s of a Gaussian decoder (its initial value when learned).
            learn_decoder_scale: learn log s with the other parameters.
            decoder_scale_floor: keep a learned s at or above this (None: no floor).
            input_noise: tau: train on x + tau * N(0, I) (a Gaussian decoder only; validation and tests see
                the clean x).
            **kwargs: the arguments every family takes (fae.models.base.AutoEncoder).
        """
        super().__init__(encoder, decoder, prior="standard_normal", prior_degree=2, **kwargs)
        self.save_config()
        self.build_likelihood(likelihood, decoder_scale, learn_decoder_scale, decoder_scale_floor)
        if input_noise < 0 or (input_noise > 0 and likelihood != "gaussian"):
            raise UserError(f"input_noise {input_noise}: give tau >= 0, and a Gaussian decoder (--model.likelihood "
                            "gaussian) for tau > 0: a Bernoulli likelihood takes targets in [0, 1]")  # fmt: skip
        self.input_noise = input_noise

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        x = dequantise(x, self.input_noise, self.training)
        mu, log_sigma = self.encode_gaussian(x)  # (B, d_z) each
        z, _ = self.reparameterise(mu, log_sigma)  # (B, d_z)
        out = self.decoder(z)  # (B, C, H, W)
        nll = self.likelihood.nll(out, x)  # (B,)
        kl = kl_to_standard_normal(mu, 2.0 * log_sigma)  # (B,)
        terms = {"loss": nll + kl, "nll": nll, "kl": kl}
        return {**terms, **self.diagnostics(x, self.likelihood.mean(out), mu, log_sigma.exp())}
