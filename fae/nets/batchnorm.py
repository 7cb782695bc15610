"""BatchNorm that keeps samples independent, for objectives that differentiate per sample.

In training mode BatchNorm normalises each sample with statistics of the whole batch, so sample i's
output depends on every x_j, and a gradient of a batch sum with respect to x (or z) picks up
cross-sample terms: grad_{x_i} sum_k f(x_k) != grad_{x_i} f(x_i). The Fisher objective's
grad_x log q_phi(z|x) and grad_z log p_theta(x|z) are per-sample derivatives, so they would be wrong.
Two context managers fix that without changing the architecture. Inside either, every BatchNorm layer
in training mode normalises sample i as

    y_i = gamma (h_i - m) / sqrt(v + eps) + beta        with (m, v) CONSTANTS,

a per-sample function of h_i, as at test time; they differ in which constants:

- `detached_batchnorm`: (m, v) are the current batch's mean and biased variance, the values ordinary
  training-mode BatchNorm uses, but detached: every value equals ordinary BatchNorm's, and no
  derivative (in x, in z or in a weight) passes through the statistics. Each sample's terms are
  exactly those of the test-time net whose statistics are set to this batch's.
- `running_batchnorm`: (m, v) are the RUNNING statistics (lagged moving averages), as at test time.

Both then update the running statistics with the batch statistics (the usual momentum, unbiased
variance), so the net evaluates as an ordinary BatchNorm net. A batch whose statistics are not finite
leaves them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def batch_statistics(x: Tensor, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance over every dimension but the channel one (dim 1)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=unbiased)


def training_batchnorm_layers(*modules: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `modules` that would normalise with batch statistics."""
    found = (m for module in modules for m in module.modules())
    return list(dict.fromkeys(m for m in found if isinstance(m, _BatchNorm) and m.training and m.track_running_stats))


@torch.no_grad()
def update_running_statistics(layer: _BatchNorm, mean: Tensor, var: Tensor) -> None:
    """What BatchNorm does in training mode: running <- (1 - momentum) running + momentum batch
    (unbiased variance); skipped when the batch statistics are not finite."""
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        return
    momentum = 0.1 if layer.momentum is None else layer.momentum
    layer.running_mean.lerp_(mean, momentum)
    layer.running_var.lerp_(var, momentum)
    layer.num_batches_tracked += 1


def forward_with_detached_statistics(layer: _BatchNorm, h: Tensor) -> Tensor:
    """y = gamma (h - m) / sqrt(v + eps) + beta with the batch's (m, v) as constants; updates the running ones."""
    with torch.no_grad():
        mean, biased_var = batch_statistics(h.detach(), unbiased=False)
        n = h.numel() // h.shape[1]
        update_running_statistics(layer, mean, biased_var * n / max(n - 1, 1))
    return F.batch_norm(h, mean, biased_var, layer.weight, layer.bias, training=False, momentum=0.0, eps=layer.eps)


@contextmanager
def detached_batchnorm(*modules: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorm layers normalise with the batch's statistics as constants (module docstring)."""
    layers = training_batchnorm_layers(*modules)
    for layer in layers:  # an instance attribute shadows the class's forward for this layer only
        layer.forward = lambda h, _layer=layer: forward_with_detached_statistics(_layer, h)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@contextmanager
def running_batchnorm(*modules: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorm layers normalise with their running statistics (module docstring)."""
    layers = training_batchnorm_layers(*modules)
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def record(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if layer not in seen:
            with torch.no_grad():
                seen[layer] = batch_statistics(inputs[0].detach())

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    # The graph keeps copies of the running statistics it normalised with, so that updating the
    # buffers below does not invalidate the backward pass that follows.
    buffers = {layer: (layer.running_mean, layer.running_var) for layer in layers}
    for layer in layers:
        layer.eval()
        layer.running_mean, layer.running_var = layer.running_mean.clone(), layer.running_var.clone()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            layer.train()
            layer.running_mean, layer.running_var = buffers[layer]
            if layer in seen:
                update_running_statistics(layer, *seen[layer])
