"""Families with a Gaussian encoder q_phi(z|x) = N(mu(x), diag sigma(x)^2) and a prior p_eta(z) (the VAE,
the Fisher AE): the encoder's two heads, the reparameterised sample, the prior's samples, and the
posterior Fisher divergence that evaluation adds for every such family,

    D(q(z|x) || p(z|x)) = 1/2 || grad_z log q(z|x) - grad_z log p(x|z) - grad_z log p(z) ||^2

at one z ~ q(z|x) (grad_z log p(x) = 0): the paper's measure of how far the encoder is from the true
posterior. It needs gradients: the CLI runs evaluation with `inference_mode=False`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fae.errors import UserError
from fae.models.base import AutoEncoder
from fae.nets.contract import DecoderFactory, EncoderFactory
from fae.objectives import grad_z_log_decoder, grad_z_log_encoder, posterior_fisher_divergence
from fae.priors import make_prior


class GaussianAutoEncoder(AutoEncoder):
    """A family with a Gaussian encoder q_phi(z|x) = N(mu(x), diag sigma(x)^2) and a prior p_eta(z).

    The encoder net's two heads are the mean and the log-variance (supplement Table 1); here they
    are returned as (mu, log sigma). Evaluation adds the posterior Fisher divergence.
    """

    abstract = True
    gaussian_encoder = True

    eval_metrics_extra = ("posterior_fisher",)
    diagnostic_terms = ("recon_mse", "encoder_sigma")

    def __init__(
        self, encoder: EncoderFactory, decoder: DecoderFactory, prior: str, prior_degree: int, **kwargs
    ) -> None:
        super().__init__(encoder, decoder, **kwargs)
        self.prior = make_prior(prior, self.latent_dim, prior_degree)

    def encode_gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma), each (B, d_z); log sigma = 1/2 log-variance head."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)  # float32 under bf16 autocast: exp(log sigma)
        return mu, 0.5 * logvar

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_gaussian(x)[0]

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator=generator).to(self.device)

    @staticmethod
    def reparameterise(mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        """z = mu + sigma * eps with eps ~ N(0, I): returns (z, eps)."""
        eps = torch.randn_like(mu)
        return mu + log_sigma.exp() * eps, eps

    def posterior_fisher(self, x: Tensor) -> Tensor:
        """D(q(z|x) || p(z|x)) at one z ~ q(z|x), (B,); per-sample when the nets are in eval mode."""
        if torch.is_inference_mode_enabled():
            raise UserError(
                "the posterior Fisher divergence needs gradients: run evaluation with "
                "Trainer(inference_mode=False) (the fae CLI does)"
            )
        with torch.enable_grad():
            mu, log_sigma = self.encode_gaussian(x)
            z, eps = self.reparameterise(mu.detach(), log_sigma.detach())
            z.requires_grad_(True)
            nll = self.likelihood.nll(self.decoder(z), x)
            grad_lik = grad_z_log_decoder(nll, z, create_graph=False)
            divergence = posterior_fisher_divergence(
                grad_z_log_encoder(eps, log_sigma.detach()), grad_lik, self.prior.score(z).detach()
            )
        return divergence.detach()

    def evaluation_terms(self, x: Tensor) -> dict[str, Tensor]:
        terms = super().evaluation_terms(x)
        terms.setdefault("posterior_fisher", self.posterior_fisher(x))
        return terms
