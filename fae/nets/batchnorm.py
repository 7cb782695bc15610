"""BatchNorm that keeps samples independent, for objectives that differentiate per sample.

In training mode BatchNorm normalises each sample with statistics of the whole batch, so sample i's
output depends on every x_j, and a gradient of a batch sum with respect to x (or z) picks up
cross-sample terms: grad_{x_i} sum_k f(x_k) != grad_{x_i} f(x_i). The Fisher objective's
grad_x log q_phi(z|x) and grad_z log p_theta(x|z) are per-sample derivatives, so they would be wrong.

`running_batchnorm(*modules)` fixes that without changing the architecture: inside it, every
BatchNorm layer in training mode normalises with its RUNNING statistics (a per-sample function, as at
test time), and the batch statistics of the activations it saw update the running ones afterwards
(the usual momentum, unbiased variance). Samples are then independent in value and in derivative;
the running statistics still track the data as in ordinary training. A batch whose statistics are
not finite leaves them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance over every dimension but the channel one (dim 1)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=True)


@contextmanager
def running_batchnorm(*modules: nn.Module) -> Iterator[None]:
    layers = [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
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
        with torch.no_grad():
            for layer in layers:
                layer.train()
                layer.running_mean, layer.running_var = buffers[layer]
                mean, var = seen.get(layer, (None, None))
                if mean is not None and torch.isfinite(mean).all() and torch.isfinite(var).all():
                    momentum = 0.1 if layer.momentum is None else layer.momentum
                    layer.running_mean.lerp_(mean, momentum)
                    layer.running_var.lerp_(var, momentum)
                    layer.num_batches_tracked += 1
