"""The VAE baseline (Kingma and Welling 2014) on the paper's nets.

Gaussian encoder q_phi(z|x) = N(mu(x), diag sigma(x)^2), reparameterised z = mu + sigma * eps,
prior N(0, I), decoder likelihood Bernoulli (MNIST default) or Gaussian N(mu_theta(z), s^2 I).
Per-sample negative ELBO, one z sample per data point:

    L(x) = -log p_theta(x|z) + KL(q_phi(z|x) || N(0, I))
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from fae.models.base import GaussianAutoEncoder
from fae.nets.contract import DecoderFactory, EncoderFactory, ImageShape
from fae.objectives import kl_to_standard_normal


class VAE(GaussianAutoEncoder):
    """Variational auto-encoder; logs loss (negative ELBO), nll and kl, and on validation the
    reconstruction error and the posterior Fisher divergence."""

    terms = ("loss", "nll", "kl")

    def __init__(
        self,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        latent_dim: int = 8,
        width: int = 64,
        image_shape: ImageShape = (1, 28, 28),
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        decoder_scale: float = 1.0,
        learn_decoder_scale: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        recon_metric: Literal["bce", "mse"] | None = None,
        grid_images: int = 16,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 20,
        compile_nets: bool = False,
    ) -> None:
        """
        Args:
            encoder, decoder, latent_dim, width, image_shape: the nets, as fae.models.base.AutoEncoder
                builds them (a Gaussian encoder: two heads, mean and log-variance).
            likelihood: the decoder family p_theta(x|z).
            decoder_scale: s of a Gaussian decoder (its initial value when learned).
            learn_decoder_scale: learn log s with the other parameters.
            on_nonfinite: "stop" training with a message, or "skip" the step, on a non-finite loss or gradient.
            max_consecutive_skips: in "skip" mode, give up after this many skipped steps in a row.
            compile_nets: torch.compile the nets (fae.models.base.AutoEncoder).
        """
        super().__init__(
            encoder,
            decoder,
            latent_dim=latent_dim,
            width=width,
            image_shape=image_shape,
            prior="standard_normal",
            prior_degree=2,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            recon_metric=recon_metric,
            grid_images=grid_images,
            on_nonfinite=on_nonfinite,
            max_consecutive_skips=max_consecutive_skips,
            compile_nets=compile_nets,
        )
        self.save_config()
        self.build_likelihood(likelihood, decoder_scale, learn_decoder_scale)

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        mu, log_sigma = self.encode_gaussian(x)  # (B, d_z) each
        z, _ = self.reparameterise(mu, log_sigma)  # (B, d_z)
        out = self.decoder(z)  # (B, C, H, W)
        nll = self.likelihood.nll(out, x)  # (B,)
        kl = kl_to_standard_normal(mu, 2.0 * log_sigma)  # (B,)
        terms = {"loss": nll + kl, "nll": nll, "kl": kl}
        return {**terms, **self.diagnostics(x, self.likelihood.mean(out), mu, log_sigma.exp())}
