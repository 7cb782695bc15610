"""Latent priors p_eta(z): log-density up to a constant, score grad_z log p(z), and a sampler.

- StandardNormal:  log p(z) = -1/2 ||z||^2,  grad_z log p(z) = -z.
- PolynomialExpFamily (the learned prior of Elkhalil et al. 2021): independent dimensions,

      log p_eta(z) = sum_j sum_{m=1..M} eta_{m,j} z_j^m        (unnormalised; M = 4 on CelebA)
      d/dz_j log p_eta(z) = sum_{m=1..M} m eta_{m,j} z_j^(m-1)

  eta is a parameter learned by the same loss. A polynomial exponential family is normalisable only
  when M is even and the leading coefficient is negative, so eta_{M,j} = -exp(rho_j) with rho learned;
  the other coefficients are free. It starts at the standard normal (eta_2 = -1/2, the rest 0;
  rho_j = log 1e-3 keeps the z^M term small). Two samplers: `sample` inverts each one-dimensional CDF
  on a fine grid over the dimension's support, found wherever the learned density put its mass (the
  dimensions are independent), exact up to the grid and needing no tuning; and
  `sample_svgd`, Stein variational gradient descent as the paper samples it (`svgd` below).

SVGD (Liu and Wang 2016) moves n particles z_1..z_n along

      phi(z_i) = 1/n sum_j [ k(z_j, z_i) grad log p(z_j) + grad_{z_j} k(z_j, z_i) ],   z_i <- z_i + step phi(z_i)

with the RBF kernel k(a, b) = exp(-||a - b||^2 / h) and the median heuristic h = med^2 / log(n + 1)
(med the median pairwise distance, recomputed each iteration), from particles drawn from N(0, I).
"""

from __future__ import annotations

import math

import numpy as np
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

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def sample_svgd(
        self, n: int, steps: int = 500, step_size: float = 0.05, generator: torch.Generator | None = None
    ) -> Tensor:
        """n particles moved by `steps` SVGD iterations toward this prior (module docstring)."""
        z = torch.randn(n, self.latent_dim, generator=generator).to(self.dummy_device())  # a CPU generator
        return svgd(self.score, z, steps, step_size)

    def dummy_device(self) -> torch.device:
        return next(self.parameters(), next(self.buffers(), torch.empty(0))).device


@torch.no_grad()
def svgd(score, z: Tensor, steps: int, step_size: float) -> Tensor:
    """Stein variational gradient descent: `steps` updates of the particles z (n, d) toward the density
    whose score(z) = grad_z log p(z) is given; RBF kernel, median bandwidth (module docstring)."""
    if steps < 0 or step_size <= 0:
        raise UserError(f"SVGD needs steps >= 0 and step_size > 0, got {steps} and {step_size}")
    n = len(z)
    for _ in range(steps):
        squared = torch.cdist(z, z).pow(2)  # (n, n): ||z_i - z_j||^2
        h = squared.median().clamp(min=1e-12) / math.log(n + 1)
        kernel = torch.exp(-squared / h)  # symmetric
        attraction = kernel @ score(z)  # sum_j k(z_j, z_i) grad log p(z_j)
        repulsion = (2.0 / h) * (z * kernel.sum(1, keepdim=True) - kernel @ z)  # sum_j grad_{z_j} k(z_j, z_i)
        z = z + step_size * (attraction + repulsion) / n
    return z


class StandardNormal(Prior):
    """N(0, I)."""

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * z.pow(2).sum(1)

    def score(self, z: Tensor) -> Tensor:
        return -z

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator).to(self.dummy_device())  # a CPU generator


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

    def grid_log_prob(self, grid: Tensor) -> Tensor:
        """log p_eta per dimension on a grid (G, d_z) of values of each dimension -> (G, d_z), float64."""
        return (self.eta.double()[None] * self.powers(grid.double(), 1)).sum(1)

    @torch.no_grad()
    def support(self, drop: float = 60.0) -> tuple[Tensor, Tensor]:
        """Per dimension, the interval (lo, hi) outside which the density is below exp(-drop) times its
        peak. Every mode lies within the largest real root of the score polynomial in absolute value
        (beyond it log p only falls), so a symmetric grid is started past that root and widened until
        its ends fall below the threshold, then trimmed to the points above it, one step of margin each
        side: wherever the learned coefficients put the modes."""
        m = torch.arange(1, self.degree + 1, dtype=torch.float64)
        score = (m[:, None] * self.eta.detach().double().cpu()).T  # (d_z, M): the score's coefficients of z^0..z^(M-1)
        reach = []
        for coefficients in score.numpy():
            roots = np.roots(coefficients[::-1])  # highest power first
            real = roots[np.abs(roots.imag) < 1e-9 * (1 + np.abs(roots))].real
            reach.append(np.abs(real).max() if len(real) else 0.0)
        half_width = max(10.0, 1.5 * max(reach))
        while True:
            grid = torch.linspace(-half_width, half_width, 4001, device=self.rho.device, dtype=torch.float64)
            logp = self.grid_log_prob(grid[:, None].expand(-1, self.latent_dim))  # (G, d_z)
            low = logp < logp.max(0).values - drop
            if (low[0] & low[-1]).all():
                break
            half_width *= 2
        step = grid[1] - grid[0]
        above = ~low
        first = above.double().argmax(0)  # the first grid point above the threshold, per dimension
        last = len(grid) - 1 - above.flip(0).double().argmax(0)
        return grid[first] - step, grid[last] + step

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, grid_size: int = 20001) -> Tensor:
        """Exact per-dimension inverse-CDF sampling on a grid of `grid_size` points over each dimension's
        support (`support`), however far from 0 the learned density has moved its mass."""
        lo, hi = self.support()
        steps = torch.linspace(0, 1, grid_size, device=lo.device, dtype=torch.float64)[:, None]
        grid = lo[None] + steps * (hi - lo)[None]  # (G, d_z): each dimension its own grid
        logp = self.grid_log_prob(grid)
        density = (logp - logp.max(0).values).exp()  # (G, d_z)
        cdf = torch.cumsum(density, 0)
        cdf = cdf / cdf[-1]
        u = torch.rand(n, self.latent_dim, generator=generator, dtype=torch.float64).to(grid.device)
        idx = torch.searchsorted(cdf.T.contiguous(), u.T.contiguous()).T.clamp(max=grid_size - 1)  # (n, d_z)
        return grid.gather(0, idx).float()


def make_prior(name: str, latent_dim: int, degree: int) -> Prior:
    if name == "standard_normal":
        return StandardNormal(latent_dim)
    if name == "polynomial":
        return PolynomialExpFamily(latent_dim, degree)
    raise UserError(f"unknown prior {name!r}: use 'standard_normal' or 'polynomial'")
