"""The learned polynomial prior's two samplers, the inverse CDF and SVGD, reproduce its moments E[z_j^k],
k = 1..4, computed by quadrature of its density; SVGD also recovers the standard normal."""

from __future__ import annotations

import pytest
import torch

from fae.priors import PolynomialExpFamily, StandardNormal, svgd

ORDERS = torch.arange(1, 5, dtype=torch.float64)


def skewed_prior() -> PolynomialExpFamily:
    """Two independent dimensions: a skewed quartic and a symmetric, lighter-tailed one."""
    prior = PolynomialExpFamily(2, degree=4).double()
    with torch.no_grad():  # rows eta_1, eta_2, eta_3; eta_4 = -exp(rho)
        prior.eta_lower.copy_(torch.tensor([[0.8, 0.0], [-0.3, -0.5], [0.2, 0.0]]))
        prior.rho.copy_(torch.tensor([0.25, 0.05]).log())
    return prior


def quadrature_moments(prior: PolynomialExpFamily) -> torch.Tensor:
    """(4, d_z): E[z_j^k] of each dimension's density exp(sum_m eta_{m,j} z^m) / Z_j, on a fine grid."""
    grid = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    log_density = (prior.eta.detach().double()[None] * grid[:, None, None] ** ORDERS[None, :, None]).sum(1)
    density = (log_density - log_density.max(0).values).exp()  # (G, d_z)
    density = density / torch.trapezoid(density, grid, dim=0)
    return torch.stack([torch.trapezoid(grid[:, None] ** k * density, grid, dim=0) for k in ORDERS])


def sample_moments(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([(z.double() ** k).mean(0) for k in ORDERS])


def test_the_inverse_cdf_sampler_reproduces_the_moments():
    prior = skewed_prior()
    exact = quadrature_moments(prior)
    z = prior.sample(400_000, generator=torch.Generator().manual_seed(0))
    # 400k samples: the standard error of E[z^4] is below 0.01 here; the grid's step is 0.001
    torch.testing.assert_close(sample_moments(z), exact, atol=0.02, rtol=0.02)


def test_the_inverse_cdf_sampler_finds_mass_far_from_zero():
    """A learned prior can move its modes far out (a positive z^2 coefficient: modes at +-sqrt(1000) and,
    with a z term, one of them heavier); the sampler's grid follows the mass, wherever it is."""
    prior = PolynomialExpFamily(2, degree=4).double()
    with torch.no_grad():
        prior.eta_lower.copy_(torch.tensor([[0.01, 0.0], [0.2, -0.5], [0.0, 0.0]]))
        prior.rho.copy_(torch.tensor([1e-4, 1e-3]).log())
    grid = torch.linspace(-60, 60, 1_200_001, dtype=torch.float64)
    log_density = (prior.eta.detach()[None] * grid[:, None, None] ** ORDERS[None, :, None]).sum(1)
    density = (log_density - log_density.max(0).values).exp()
    density = density / torch.trapezoid(density, grid, dim=0)
    exact = torch.stack([torch.trapezoid(grid[:, None] ** k * density, grid, dim=0) for k in ORDERS[:2]])
    z = prior.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert z[:, 0].abs().min() > 20  # no draw left near 0, where a fixed +-10 grid would have put all of them
    torch.testing.assert_close(sample_moments(z)[:2], exact, atol=0.05, rtol=0.01)


def test_the_inverse_cdf_sampler_finds_a_mode_behind_a_deep_dip():
    """log p = -0.01 (z^4 - 60 z^3 + 900 z^2): equal modes at 0 and 30 with a dip of 20 nats between; a
    grid widened only until its ends are low would stop inside the dip and miss the far mode."""
    prior = PolynomialExpFamily(1, degree=4).double()
    with torch.no_grad():
        prior.eta_lower.copy_(torch.tensor([[0.0], [-9.0], [0.6]]))
        prior.rho.copy_(torch.tensor([0.01]).log())
    z = prior.sample(20_000, generator=torch.Generator().manual_seed(0))
    far = (z > 15).double().mean().item()
    assert abs(far - 0.5) < 0.02  # half the mass is at the far mode


@pytest.mark.slow
def test_svgd_reproduces_the_moments():
    prior = skewed_prior()
    exact = quadrature_moments(prior)
    z = prior.sample_svgd(500, steps=1000, step_size=0.1, generator=torch.Generator().manual_seed(0))
    # 500 particles are a quadrature of their own: the first two moments within a few hundredths,
    # the higher ones (tails, few particles) within 10%
    got = sample_moments(z)
    torch.testing.assert_close(got[:2], exact[:2], atol=0.05, rtol=0.05)
    torch.testing.assert_close(got[2:], exact[2:], atol=0.1, rtol=0.1)


@pytest.mark.slow
def test_svgd_moves_particles_from_anywhere_to_a_standard_normal():
    start = 3.0 + 0.1 * torch.randn(400, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = svgd(StandardNormal(2).score, start, steps=1500, step_size=0.1)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(0), torch.ones(2, dtype=torch.float64), atol=0.1, rtol=0)
