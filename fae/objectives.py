"""The objectives' pieces as pure functions of tensors: no nn.Module state, no Lightning.

Every function returns one value per sample, shape (B,); a batch loss is the mean over the batch.
Images are (B, C, H, W) and d = C * H * W is the number of pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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
