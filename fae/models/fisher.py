"""The Fisher auto-encoder (Elkhalil et al., AISTATS 2021): the exact Fisher-divergence objective.

Gaussian encoder q_phi(z|x), Gaussian decoder N(mu_theta(z), s^2 I) (s fixed or learned), prior
p_eta(z) standard normal or the learned polynomial exponential family. Per-sample loss (Theorem 1),
one z sample per data point, each term with weight 1, batch loss the mean over the batch:

    L(x) = s(x; p_theta(.|z))                                          decoder_score
         + 1/2 || grad_x log q_phi(z|x) ||^2                             stability
         + 1/2 || grad_z log q_phi(z|x) - grad_z log p_theta(x|z) - grad_z log p_eta(z) ||^2
                                                                         posterior_fisher
    s(x; N(mu, s^2 I)) = ||x - mu||^2 / (2 s^4) - d / s^2

The pieces are fae.objectives.fisher_terms. Three choices, each a named option:

- `stability`: grad_x log q_phi(z|x) at fixed z (Theorem 1, the default) or "total", the total
  derivative with z = mu(x) + sigma(x) eps still a function of x (the authors' public snapshot).
- `batchnorm`: how the paper's BatchNorm layers normalise inside the objective, whose derivatives in x
  and z must be those of each sample alone (how each mode computes: fae.nets.batchnorm).
  "per_sample" (the default) normalises with the current batch's statistics, held constant in x and z:
  values as ordinary BatchNorm's, per-sample derivatives, and the weights' gradient flowing through the
  statistics as in ordinary BatchNorm training (one extra forward pass). "detached" holds the same
  statistics constant everywhere, "running" uses the lagged running statistics: per sample too, but
  their weight gradients ignore the normalisation and they train far worse
  (docs/results/mnist/ablation/). "batch" is ordinary training-mode BatchNorm, whose statistics couple
  the samples: the gradients of the batch sum carry cross-sample terms (the authors' CelebA code does
  this). Nets without BatchNorm (`norm: group` or `none`) are per sample whatever this says.
- `posterior_trains_decoder`: true differentiates the posterior term through grad_z log p_theta(x|z)
  (Theorem 1). False takes that score as a constant, as the authors' code does (it is computed
  without create_graph): the decoder then learns from the Hyvarinen score alone, and the posterior
  term trains the encoder (through grad_z log q and the prior score) and the prior.

A non-finite loss term or gradient stops training (or skips the step), as in every family
(`on_nonfinite`, fae.models.guard).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import Tensor

from fae.errors import UserError
from fae.models.gaussian import GaussianAutoEncoder
from fae.nets.batchnorm import BatchStatistics, detached_batchnorm, running_batchnorm
from fae.nets.contract import DecoderFactory, EncoderFactory
from fae.objectives import dequantise, fisher_terms


class FisherAE(GaussianAutoEncoder):
    """Fisher auto-encoder; logs each term of the loss per step and on validation."""

    terms = ("loss", "decoder_score", "stability", "posterior_fisher")
    compile_refusal = (
        "the Fisher objective differentiates the nets twice (create_graph), which torch.compile's autograd "
        "cannot (double backward)"
    )

    def __init__(
        self,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        decoder_scale: float = 1.0,
        learn_decoder_scale: bool = False,
        prior: Literal["standard_normal", "polynomial"] = "standard_normal",
        prior_degree: int = 4,
        stability: Literal["fixed_z", "total"] = "fixed_z",
        batchnorm: Literal["per_sample", "detached", "running", "batch"] = "per_sample",
        posterior_trains_decoder: bool = True,
        decoder_scale_floor: float | None = None,
        input_noise: float = 0.0,
        **kwargs,
    ) -> None:
        """
        Args:
            encoder, decoder: the nets, as fae.models.base.AutoEncoder builds them (a Gaussian encoder:
                two heads, mean and log-variance). The likelihood is N(mu_theta(z), s^2 I) (a Bernoulli
                decoder is not admissible: the Hyvarinen score needs a density in continuous x).
            decoder_scale: s (its initial value when learned).
            learn_decoder_scale: learn log s by the same loss (optimum s^2 = ||x - mu||^2 / d).
            prior: "standard_normal", or "polynomial", the learned exponential family of degree prior_degree.
            prior_degree: M, the degree of the polynomial prior (even; 4 on CelebA in the paper).
            stability: "fixed_z" (Theorem 1) or "total" (the authors' snapshot); see the module docstring.
            batchnorm: "per_sample" (default), "detached" or "running" (per sample), or "batch" (couples the
                samples); see the module docstring.
            posterior_trains_decoder: differentiate the posterior term through grad_z log p_theta(x|z)
                (Theorem 1); false treats that score as a constant (the authors' code).
            decoder_scale_floor: keep a learned s at or above this (None: no floor): with a learned s the
                loss is unbounded below as the residual shrinks.
            input_noise: tau: train on x + tau * N(0, I), a smooth density as Theorem 1 assumes (0: the raw
                images; validation and tests see the clean x).
            **kwargs: the arguments every family takes (fae.models.base.AutoEncoder).
        """
        super().__init__(encoder, decoder, prior=prior, prior_degree=prior_degree, **kwargs)
        self.save_config()
        self.build_likelihood("gaussian", decoder_scale, learn_decoder_scale, decoder_scale_floor)
        if input_noise < 0:
            raise UserError(f"input_noise must be >= 0, got {input_noise}")
        self.input_noise = input_noise
        self.stability = stability
        self.batchnorm = batchnorm
        self.posterior_trains_decoder = posterior_trains_decoder

    def normalisation(self, x: Tensor, eps: Tensor) -> contextlib.AbstractContextManager:
        """The context in which the nets' BatchNorm layers normalise as the `batchnorm` option says, for
        the objective on x with z = mu + sigma eps. "per_sample" first records the batch statistics by an
        ordinary training-mode pass on the detached x (and the z it gives), whose graph the weights'
        gradient later flows through."""
        if self.batchnorm == "per_sample":
            statistics = BatchStatistics(self.encoder, self.decoder)
            if statistics.layers:
                with torch.enable_grad(), statistics.record():
                    mu, log_sigma = self.encode_gaussian(x.detach())
                    self.decoder(mu + log_sigma.exp() * eps)
            return statistics.replay()
        single_pass = {"detached": detached_batchnorm, "running": running_batchnorm}.get(self.batchnorm)
        return single_pass(self.encoder, self.decoder) if single_pass else contextlib.nullcontext()

    def fisher_terms(self, x: Tensor, eps: Tensor | None = None) -> dict[str, Tensor]:
        """Theorem 1's terms on x, each (B,), with the diagnostics; `eps` (B, d_z) fixes the sample
        z = mu + sigma eps."""
        if torch.is_inference_mode_enabled():
            raise UserError("the Fisher objective needs gradients: use Trainer(inference_mode=False) (the CLI does)")
        eps = torch.randn(len(x), self.latent_dim, device=x.device, dtype=x.dtype) if eps is None else eps
        with torch.enable_grad(), self.normalisation(x, eps):
            x = x.detach().requires_grad_(True)  # (B, C, H, W): the objective differentiates in x
            mu, log_sigma = self.encode_gaussian(x)  # (B, d_z) each
            z = mu + log_sigma.exp() * eps  # (B, d_z)
            mean = self.likelihood.mean(self.decoder(z))  # (B, C, H, W)
            terms = fisher_terms(
                x,
                mu,
                log_sigma,
                eps,
                z,
                mean,
                self.likelihood.log_scale,
                self.prior.score(z),
                stability=self.stability,
                create_graph=torch.is_grad_enabled() and self.training,
                likelihood_score_constant=not self.posterior_trains_decoder,
            )
        return {**terms, **self.diagnostics(x, mean, mu, log_sigma.exp())}

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        return self.fisher_terms(dequantise(x, self.input_noise, self.training))
