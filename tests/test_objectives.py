"""Objective pieces against torch.distributions and plain formulas, in float64."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from fae.objectives import (
    bernoulli_nll,
    gaussian_nll,
    kl_to_standard_normal,
    reconstruction_bce,
    reconstruction_mse,
)

torch.manual_seed(0)


def test_kl_to_standard_normal_matches_torch_distributions():
    mu, logvar = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), expected)


def test_gaussian_nll_matches_log_density():
    mean, x = torch.rand(4, 1, 6, 6, dtype=torch.float64), torch.rand(4, 1, 6, 6, dtype=torch.float64)
    for s in (0.1, 1.0, 3.0):
        expected = -Normal(mean, s).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(gaussian_nll(mean, x, torch.tensor(s, dtype=torch.float64).log()), expected)


def test_bernoulli_nll_matches_log_mass_on_binary_pixels():
    logits = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    x = (torch.rand(4, 1, 6, 6) > 0.5).double()
    expected = -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_nll(logits, x), expected)


def test_reconstruction_errors_are_per_pixel_means():
    recon, target = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.rand(3, 1, 4, 4, dtype=torch.float64)
    bce = -(target * recon.log() + (1 - target) * (1 - recon).log()).flatten(1).mean(1)
    torch.testing.assert_close(reconstruction_bce(recon, target), bce)
    torch.testing.assert_close(reconstruction_mse(recon, target), ((recon - target) ** 2).flatten(1).mean(1))
