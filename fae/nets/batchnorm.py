"""BatchNorm that keeps samples independent, for objectives that differentiate per sample.

In training mode BatchNorm normalises each sample with statistics of the whole batch, so sample i's
output depends on every x_j, and a gradient of a batch sum with respect to x (or z) picks up
cross-sample terms: grad_{x_i} sum_k f(x_k) != grad_{x_i} f(x_i). The Fisher objective's
grad_x log q_phi(z|x) and grad_z log p_theta(x|z) are per-sample derivatives, so they would be wrong.
Three ways out, none changing the architecture. In each, every BatchNorm layer in training mode
normalises sample i as

    y_i = gamma (h_i - m) / sqrt(v + eps) + beta        with (m, v) constant in x and z,

a per-sample function of h_i, as at test time; they differ in what (m, v) are:

- `BatchStatistics` (two passes): (m, v) are the current batch's mean and biased variance, recorded by
  an ordinary training-mode pass on the DETACHED inputs (x, and the code z computed from it), then
  replayed by the pass that the objective differentiates. Every value equals ordinary BatchNorm's; the
  derivatives in x and z are per sample (the statistics do not depend on the differentiated inputs);
  and the weights' gradient still flows through the statistics, as in ordinary BatchNorm training.
- `detached_batchnorm`: the same (m, v), detached: no derivative, in the inputs or the weights, passes
  through the statistics (a single pass; the weights' gradient misses the statistics' part).
- `running_batchnorm`: (m, v) are the RUNNING statistics (lagged moving averages), as at test time.

In all three, each sample's terms are exactly those of the test-time net holding these statistics. The
running statistics are updated once per training step with the batch statistics (the usual momentum,
unbiased variance), so the net evaluates as an ordinary BatchNorm net; a batch whose statistics are not
finite leaves them unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
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
    (unbiased variance); skipped when the batch statistics are not finite, decided on the device (no
    read back to the host: a step on a GPU does not wait for it)."""
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    momentum = 0.1 if layer.momentum is None else layer.momentum
    layer.running_mean.copy_(torch.where(finite, layer.running_mean.lerp(mean, momentum), layer.running_mean))
    layer.running_var.copy_(torch.where(finite, layer.running_var.lerp(var, momentum), layer.running_var))
    layer.num_batches_tracked += finite.to(layer.num_batches_tracked.dtype)


def statistics_of_batch(layer: _BatchNorm, h: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel mean and biased variance of h, in h's graph (what training-mode BatchNorm
    normalises with); the layer's running statistics are updated with them. In float32, as autocast
    runs BatchNorm: bf16 activations would lose the statistics' precision."""
    mean, biased_var = batch_statistics(h.float(), unbiased=False)
    n = h.numel() // h.shape[1]
    update_running_statistics(layer, mean.detach(), biased_var.detach() * n / max(n - 1, 1))
    return mean, biased_var


def normalise(layer: _BatchNorm, h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """gamma (h - mean) / sqrt(var + eps) + beta per channel (dim 1), differentiable in every argument;
    in float32 (as autocast runs BatchNorm)."""
    shape = (1, -1) + (1,) * (h.dim() - 2)
    y = (h.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + layer.eps)
    if layer.affine:
        y = y * layer.weight.view(shape) + layer.bias.view(shape)
    return y


@contextmanager
def layer_forwards(layers: list[_BatchNorm], forward: Callable[[_BatchNorm, Tensor], Tensor]) -> Iterator[None]:
    """Inside, each layer computes forward(layer, h): an instance attribute shadows the class's forward."""
    for layer in layers:
        layer.forward = lambda h, _layer=layer: forward(_layer, h)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class BatchStatistics:
    """The two-pass mode (module docstring): `record()` around an ordinary training-mode pass on the
    detached inputs, then `replay()` around the pass the objective differentiates, which normalises with
    the recorded statistics, still in the graph of the weights. Each layer replays its calls in order."""

    def __init__(self, *modules: nn.Module) -> None:
        self.layers = training_batchnorm_layers(*modules)
        self.statistics: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {layer: [] for layer in self.layers}

    def record(self) -> contextlib.AbstractContextManager:
        def forward(layer: _BatchNorm, h: Tensor) -> Tensor:
            self.statistics[layer].append(statistics_of_batch(layer, h))
            return normalise(layer, h, *self.statistics[layer][-1])

        return layer_forwards(self.layers, forward)

    def replay(self) -> contextlib.AbstractContextManager:
        calls = {layer: iter(recorded) for layer, recorded in self.statistics.items()}
        return layer_forwards(self.layers, lambda layer, h: normalise(layer, h, *next(calls[layer])))


def detached_batchnorm(*modules: nn.Module) -> contextlib.AbstractContextManager:
    """Training-mode BatchNorm layers normalise with the batch's statistics as constants (module docstring)."""

    def forward(layer: _BatchNorm, h: Tensor) -> Tensor:
        return normalise(layer, h, *statistics_of_batch(layer, h.detach()))

    return layer_forwards(training_batchnorm_layers(*modules), forward)


@contextmanager
def running_batchnorm(*modules: nn.Module) -> Iterator[None]:
    """Training-mode BatchNorm layers normalise with their running statistics (module docstring)."""
    layers = training_batchnorm_layers(*modules)
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def record(layer: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if layer not in seen:
            with torch.no_grad():
                seen[layer] = batch_statistics(inputs[0].detach().float())

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
