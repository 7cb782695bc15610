"""The objectives' pieces as pure functions of tensors: no nn.Module state, no Lightning.

Every function returns one value per sample, shape (B,); a batch loss is the mean over the batch.
Images are (B, C, H, W) and d = C * H * W is the number of pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fae.errors import UserError


def per_sample_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return t.flatten(1).sum(1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)."""
    return 0.5 * per_sample_sum(mu.pow(2) + logvar.exp() - 1.0 - logvar)


def bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log p(x|z) for independent Bernoulli pixels with mean sigmoid(logits), x in [0, 1]:
    sum_i BCE(x_i, sigmoid(logits_i)) (the continuous-Bernoulli-free form used by VAEs on MNIST)."""
    return per_sample_sum(F.binary_cross_entropy_with_logits(logits, x, reduction="none"))


def gaussian_nll(mean: Tensor, x: Tensor, log_scale: Tensor) -> Tensor:
    """-log N(x; mean, s^2 I) = ||x - mean||^2 / (2 s^2) + d log s + d/2 log(2 pi), with s = exp(log_scale)."""
    d = x[0].numel()
    sq = per_sample_sum((x - mean).pow(2))
    return 0.5 * sq * torch.exp(-2.0 * log_scale) + d * log_scale + 0.5 * d * math.log(2 * math.pi)


def reconstruction_bce(recon: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy per pixel between a reconstruction in [0, 1] and the clean image:
    the paper's MNIST error. log is clamped at -100, as torch's BCE does."""
    return F.binary_cross_entropy(recon.clamp(0.0, 1.0), target, reduction="none").flatten(1).mean(1)


def reconstruction_mse(recon: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per pixel: the paper's CelebA error."""
    return (recon - target).pow(2).flatten(1).mean(1)


RECONSTRUCTION_ERRORS = {"bce": reconstruction_bce, "mse": reconstruction_mse}


# --- Fisher auto-encoder (Elkhalil et al. 2021, Theorem 1 and its proof in the supplement) --------
#
#   L(x) = E_{z ~ q(z|x)} [ s(x; p_theta(.|z))
#                           + 1/2 || grad_x log q_phi(z|x) ||^2
#                           + 1/2 || grad_z log q_phi(z|x) - grad_z log p_theta(x|z) - grad_z log p_eta(z) ||^2 ]
#   s(x; p) = 1/2 || grad_x log p(x) ||^2 + Laplacian_x log p(x)
#
# Gradients "through a net" are vector-Jacobian products of a batch sum, kept in the graph
# (create_graph=True) so that the loss can be differentiated again. They are per-sample only when
# the nets treat samples independently (see fae.models.fisher for BatchNorm).


def gaussian_hyvarinen_score(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """s(x; N(mean, s^2 I)) = ||x - mean||^2 / (2 s^4) - d / s^2, s = exp(log_scale), d pixels."""
    d = x[0].numel()
    inv_var = torch.exp(-2.0 * log_scale)
    return 0.5 * per_sample_sum((x - mean).pow(2)) * inv_var.pow(2) - d * inv_var


def exponential_family_hyvarinen_score(
    eta: Tensor, dT: Tensor, d2T: Tensor, dlogh: Tensor | None = None, d2logh: Tensor | None = None
) -> Tensor:
    """s(x; p) for pixelwise exponential families p(x) = prod_i h(x_i) exp(sum_k eta_ki T_k(x_i) - A(eta)).

    A(eta) drops out of every x-derivative, so with T', T'' and (log h)', (log h)'' evaluated at x:
        grad_{x_i} log p = (log h)'(x_i) + sum_k eta_ki T_k'(x_i)
        Laplacian log p  = sum_i [ (log h)''(x_i) + sum_k eta_ki T_k''(x_i) ]
    eta, dT, d2T: (B, K, *pixel shape); dlogh, d2logh: (B, *pixel shape) or None (h constant).
    """
    grad = (eta * dT).sum(1)
    lap = (eta * d2T).sum(1)
    if dlogh is not None:
        grad = grad + dlogh
    if d2logh is not None:
        lap = lap + d2logh
    return 0.5 * per_sample_sum(grad.pow(2)) + per_sample_sum(lap)


def vjp(outputs: tuple[Tensor, ...], inputs: Tensor, vectors: tuple[Tensor, ...], create_graph: bool = True) -> Tensor:
    """sum_k J_{outputs_k}(inputs)^T vectors_k: one backward pass, kept in the graph for the loss."""
    (grad,) = torch.autograd.grad(outputs, inputs, vectors, create_graph=create_graph, retain_graph=True)
    return grad


def grad_z_log_decoder(nll: Tensor, z: Tensor, create_graph: bool = True) -> Tensor:
    """grad_z log p_theta(x|z) = -grad_z nll, (B, d_z): one VJP through the decoder. For a Gaussian
    decoder it is J_mu_theta(z)^T (x - mu_theta(z)) / s^2; for a Bernoulli one J_logits^T (x - p)."""
    return vjp((nll,), z, (-torch.ones_like(nll),), create_graph)


def grad_x_log_encoder_fixed_z(
    mu: Tensor, log_sigma: Tensor, eps: Tensor, x: Tensor, create_graph: bool = True
) -> Tensor:
    """grad_x log q_phi(z|x) at FIXED z = mu + sigma * eps: J_mu(x)^T (eps / sigma) + J_logsigma(x)^T (eps^2 - 1).
    One VJP through the encoder, (B, *x shape)."""
    sigma = log_sigma.exp()
    return vjp((mu, log_sigma), x, (eps / sigma, eps.pow(2) - 1.0), create_graph)


def grad_x_log_encoder_total(log_sigma: Tensor, x: Tensor, create_graph: bool = True) -> Tensor:
    """d/dx log q_phi(z(x)|x) with z = mu(x) + sigma(x) eps still the reparameterised sample: the TOTAL
    derivative, -sum_j grad_x log sigma_j(x) (what the authors' public snapshot computes)."""
    return -vjp((log_sigma,), x, (torch.ones_like(log_sigma),), create_graph)


def grad_z_log_encoder(eps: Tensor, log_sigma: Tensor) -> Tensor:
    """grad_z log q_phi(z|x) = -(z - mu) / sigma^2 = -eps / sigma."""
    return -eps * torch.exp(-log_sigma)


def stability_term(grad_x_log_q: Tensor) -> Tensor:
    """1/2 || grad_x log q_phi(z|x) ||^2, (B,)."""
    return 0.5 * per_sample_sum(grad_x_log_q.pow(2))


def posterior_fisher_divergence(grad_z_log_q: Tensor, grad_z_log_lik: Tensor, grad_z_log_prior: Tensor) -> Tensor:
    """D(q(z|x) || p(z|x)) at one z: 1/2 || grad_z log q(z|x) - grad_z log p(x|z) - grad_z log p(z) ||^2, (B,).
    Exact: grad_z log p(z|x) = grad_z log p(x|z) + grad_z log p(z), as grad_z log p(x) = 0."""
    return 0.5 * per_sample_sum((grad_z_log_q - grad_z_log_lik - grad_z_log_prior).pow(2))


def fisher_terms(
    x: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    eps: Tensor,
    z: Tensor,
    decoder_mean: Tensor,
    log_scale: Tensor,
    prior_score: Tensor,
    stability: str = "fixed_z",
    create_graph: bool = True,
    likelihood_score_constant: bool = False,
) -> dict[str, Tensor]:
    """Theorem 1's per-sample loss for a Gaussian encoder and a Gaussian decoder N(mu_theta(z), s^2 I).

    x (B, ...) requires grad; mu, log_sigma (B, d_z) are the encoder's outputs on x; z = mu + sigma eps;
    decoder_mean = mu_theta(z); prior_score = grad_z log p_eta(z). `stability` picks grad_x log q at
    fixed z ("fixed_z", Theorem 1) or the total derivative ("total", the authors' snapshot).
    `likelihood_score_constant` computes grad_z log p_theta(x|z) without a graph, so that it enters the
    posterior term as a constant (the authors' code: no create_graph): that term's gradient then reaches
    neither the decoder nor, through this score's dependence on z, the encoder; the values are unchanged.
    Returns {"loss", "decoder_score", "stability", "posterior_fisher"}, each (B,).
    """
    if stability == "fixed_z":
        grad_x_log_q = grad_x_log_encoder_fixed_z(mu, log_sigma, eps, x, create_graph)
    elif stability == "total":
        grad_x_log_q = grad_x_log_encoder_total(log_sigma, x, create_graph)
    else:
        raise UserError(f"stability must be 'fixed_z' or 'total', got {stability!r}")
    decoder_score = gaussian_hyvarinen_score(x, decoder_mean, log_scale)
    stab = stability_term(grad_x_log_q)
    nll = gaussian_nll(decoder_mean, x, log_scale)
    grad_z_log_lik = grad_z_log_decoder(nll, z, create_graph and not likelihood_score_constant)
    posterior = posterior_fisher_divergence(grad_z_log_encoder(eps, log_sigma), grad_z_log_lik, prior_score)
    return {
        "loss": decoder_score + stab + posterior,
        "decoder_score": decoder_score,
        "stability": stab,
        "posterior_fisher": posterior,
    }


# --- WAE ---------------------------------------------------------------------------------------


def mmd_imq(x: Tensor, y: Tensor, scale: float) -> Tensor:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d) with the inverse multiquadratic kernel
    k(a, b) = C / (C + ||a - b||^2), C = `scale` (the WAE paper: C = 2 d_z sigma_z^2). A scalar."""
    n, m = len(x), len(y)
    k_xx = scale / (scale + torch.cdist(x, x).pow(2))
    k_yy = scale / (scale + torch.cdist(y, y).pow(2))
    k_xy = scale / (scale + torch.cdist(x, y).pow(2))
    off_diagonal = lambda k: (k.sum() - k.diagonal().sum()) / (len(k) * (len(k) - 1))  # noqa: E731
    return off_diagonal(k_xx) + off_diagonal(k_yy) - 2.0 * k_xy.sum() / (n * m)


def dequantise(x: Tensor, tau: float, training: bool) -> Tensor:
    """x + tau * N(0, I) in training (x unchanged otherwise, or for tau = 0): the training data smoothed
    into a density on all of R^d. Theorem 1 of Elkhalil et al. (2021) integrates by parts over a smooth
    data density whose boundary terms vanish; raw MNIST pixels lie in [0, 1] and most are exactly 0, so
    there the Fisher objective is well defined but is not the joint Fisher divergence."""
    return x + tau * torch.randn_like(x) if training and tau > 0 else x
