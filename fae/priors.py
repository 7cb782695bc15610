"""Latent priors p_eta(z): log-density up to a constant, score grad_z log p(z), and a sampler.

- StandardNormal:  log p(z) = -1/2 ||z||^2,  grad_z log p(z) = -z.
- PolynomialExpFamily (the paper's learned prior, DESIGN.md section 1): independent dimensions,

      log p_eta(z) = sum_j sum_{m=1..M} eta_{m,j} z_j^m        (unnormalised; M = 4 on CelebA)
      d/dz_j log p_eta(z) = sum_{m=1..M} m eta_{m,j} z_j^(m-1)

  eta is a parameter learned by the same loss. A polynomial exponential family is normalisable only
  when M is even and the leading coefficient is negative, so eta_{M,j} = -exp(rho_j) with rho learned;
  the other coefficients are free. It starts at the standard normal (eta_2 = -1/2, the rest 0;
  rho_j = log 1e-3 keeps the z^M term small). The paper samples it with SVGD; because the dimensions
  are independent, `sample` here inverts each one-dimensional CDF on a fine grid instead, which is
  exact up to the grid and needs no kernel bandwidth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fae.errors import UserError


class Prior(nn.Module):
    """Base: `log_prob(z)` up to a constant (B,), `score(z)` = grad_z log p(z) (B, d_z), `sample(n)`."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        raise NotImplementedError


class StandardNormal(Prior):
    """N(0, I)."""

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z.pow(2).sum(1)

    def score(self, z: Tensor) -> Tensor:
        return -z

    def sample(self, n: int) -> Tensor:
        return torch.randn(n, self.latent_dim, device=self.dummy_device())

    def dummy_device(self) -> torch.device:
        return next(self.buffers(), torch.empty(0)).device


class PolynomialExpFamily(Prior):
    """log p_eta(z) = sum_j sum_{m=1..M} eta_{m,j} z_j^m, eta_{M,j} = -exp(rho_j) < 0; see the module docstring."""

    def __init__(self, latent_dim: int, degree: int = 4) -> None:
        super().__init__(latent_dim)
        if degree < 2 or degree % 2:
            raise UserError(f"prior_degree must be even and >= 2 (a normalisable density), got {degree}")
        self.degree = degree
        lower = torch.zeros(degree - 1, latent_dim)  # eta_1 .. eta_{M-1}
        if degree > 2:
            lower[1] = -0.5  # eta_2: the standard normal
            rho = math.log(1e-3)
        else:
            rho = math.log(0.5)  # M = 2: eta_2 = -1/2 is the leading coefficient
        self.eta_lower = nn.Parameter(lower)
        self.rho = nn.Parameter(torch.full((latent_dim,), rho))

    @property
    def eta(self) -> Tensor:
        """(M, d_z): row m-1 holds eta_m."""
        return torch.cat([self.eta_lower, -self.rho.exp()[None]], 0)

    def powers(self, z: Tensor, start: int) -> Tensor:
        """z_j^(m - 1 + start) for m = 1..M: (B, M, d_z)."""
        exponents = torch.arange(start, self.degree + start, device=z.device, dtype=z.dtype)
        return z[:, None, :] ** exponents[None, :, None]

    def log_prob(self, z: Tensor) -> Tensor:
        return (self.eta.to(z.dtype) * self.powers(z, 1)).sum((1, 2))

    def score(self, z: Tensor) -> Tensor:
        m = torch.arange(1, self.degree + 1, device=z.device, dtype=z.dtype)[None, :, None]
        return (m * self.eta.to(z.dtype) * self.powers(z, 0)).sum(1)  # (B, d_z)

    @torch.no_grad()
    def sample(self, n: int, grid_size: int = 20001, half_width: float = 10.0) -> Tensor:
        """Exact per-dimension inverse-CDF sampling on a grid over [-half_width, half_width]."""
        grid = torch.linspace(-half_width, half_width, grid_size, device=self.rho.device, dtype=torch.float64)
        logp = (self.eta.double()[None] * self.powers(grid[:, None].expand(-1, self.latent_dim), 1)).sum(1)
        density = (logp - logp.max(0).values).exp()  # (G, d_z)
        cdf = torch.cumsum(density, 0)
        cdf = cdf / cdf[-1]
        u = torch.rand(n, self.latent_dim, device=grid.device, dtype=torch.float64)
        idx = torch.searchsorted(cdf.T.contiguous(), u.T.contiguous()).T.clamp(max=grid_size - 1)  # (n, d_z)
        return grid[idx].float()


def make_prior(name: str, latent_dim: int, degree: int) -> Prior:
    if name == "standard_normal":
        return StandardNormal(latent_dim)
    if name == "polynomial":
        return PolynomialExpFamily(latent_dim, degree)
    raise UserError(f"unknown prior {name!r}: use 'standard_normal' or 'polynomial'")
