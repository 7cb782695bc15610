"""No weight is ever updated from a non-finite value: the policy of every family for a loss term or a
gradient that is NaN or infinite, decided on the device so that a training step never waits for it.

As torch.amp's gradient scaler does, `NonFiniteGuard` keeps a found-inf flag per batch on the device,
set by the scaler's own kernel:
  - `check_terms` flags the objective's terms that are not finite (before backward);
  - `before_step`, called at every optimizer step once the gradients are reduced across devices, flags
    the gradients the optimizer is about to use, takes the flag's maximum across devices (every device
    decides alike) and masks the update on the device: a fused torch optimizer (Adam, AdamW, SGD, ...;
    `fused` builds fae's optimizers so) takes the flag as its `found_inf` and leaves the parameters, its
    moments and its step count as they were. Any other optimizer costs one read of the flag, and its
    gradients are cleared (no update). Under a gradient scaler (16-mixed) non-finite gradients are the
    scaler's to skip, and only the terms are checked, with that one read.
The flags are read back (`check`, one read of the device) on the steps the loggers write (and every
READ_EVERY steps), before each validation of a fit, before each checkpoint is written and at the end of
training:
  - "stop": from the first non-finite step on, every step is masked; the read puts the buffers
    (BatchNorm's statistics) back to those before it, so the model is as it was, and raises a UserError
    naming the term (or the parameter) and the step, and the last checkpoint saved, which nothing
    after it overwrote;
  - "skip": each non-finite step is masked, its buffers put back, and counted (train/skipped_steps);
    after `max_consecutive_skips` in a row every later step is masked, and the read gives up with a UserError.
A step whose finite gradients make the weights (or BatchNorm's statistics) non-finite, a learning rate
far too high, cannot be undone: every read also checks the weights, and stops with a UserError under
either policy, so that no checkpoint ever holds such a state and last.ckpt stays the last good one;
`check_outputs` does the same for non-finite reconstructions in an evaluation (a model diverged with
finite weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from fae.errors import UserError
from fae.models.metrics import loggers_write_this_step

Policy = Literal["stop", "skip"]


def fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer` rebuilt with torch's fused kernel, which takes the guard's found-inf flag (and is the
    fastest implementation: 4-6x faster than the default Adam on this CPU, benchmarks/framework_overhead.py),
    when its class has one and the configuration leaves `fused` unset; otherwise `optimizer` itself."""
    defaults = optimizer.defaults
    if defaults.get("fused", False) is not None or defaults.get("foreach") or defaults.get("differentiable"):
        return optimizer  # no fused kernel, or fused, foreach or differentiable chosen by the configuration
    supported = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not all(p.is_floating_point() and p.device.type in supported for p in params):
        return optimizer
    try:
        groups = [{**group, "fused": True} for group in optimizer.param_groups]
        return type(optimizer)(groups, **(defaults | {"fused": True}))
    except (RuntimeError, TypeError, ValueError):  # a class whose fused kernel refuses these settings
        return optimizer


def masks_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` skips its update on the device when `optimizer.found_inf` is 1 (a fused
    torch optimizer; a checkpoint written by a non-fused one restores its groups unfused)."""
    return getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        group.get("fused") for group in optimizer.param_groups
    )


@dataclass
class Batch:
    """What a training batch left for the next read: its step and epoch, its found-inf flag (1.0: masked),
    the norms of what each site checked ((site, norms) in the order checked), and in "stop" mode the
    buffers at its start."""

    step: int
    epoch: int
    found: Tensor
    norms: list[tuple[Site, Tensor]]
    buffers: list[Tensor] | None


@dataclass
class Site:
    """One place a step is checked: its kind ("loss term", "gradient of") and the names of what it checks."""

    kind: str
    names: tuple[str, ...]


class NonFiniteGuard(L.Callback):
    """The non-finite policy and its state for one model (module docstring): the model holds it, flags its
    terms with `check_terms`, and adds it to the trainer's callbacks (configure_callbacks) for the rest."""

    READ_EVERY = 100  # steps between reads at most, whatever the loggers do

    def __init__(self, policy: Policy = "stop", max_consecutive_skips: int = 20) -> None:
        if policy not in ("stop", "skip"):
            raise UserError(f"on_nonfinite must be 'stop' or 'skip', got {policy!r}")
        if max_consecutive_skips < 1:
            raise UserError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.sites: dict[tuple, Site] = {}
        self.history: list[Batch] = []  # since the last read
        self.batch: Batch | None = None  # the batch in progress
        self.device: torch.device | None = None
        self.skipped_steps = 0  # in this process's training, as of the last read (train/skipped_steps)
        self.in_a_row = 0  # skipped steps in a row, as of the last read
        self.stopped_by: str | None = None  # the stop's message, once raised

    # --- on the device, every step -------------------------------------------------------------
    def reset(self, module: L.LightningModule) -> None:
        """Nothing found, nothing skipped; the device state on the model's device."""
        self.device = module.device
        self.sites.clear()
        self.history.clear()
        self.batch = None
        self.skipped_steps = self.in_a_row = 0
        self.stopped_by: str | None = None  # the stop's message, once raised
        self.one = torch.ones((), device=self.device)  # the scale the found-inf kernel "unscales" by
        self.sticky = torch.zeros((), device=self.device)  # 1.0: every later step is masked
        self.streak = torch.zeros((), device=self.device)  # skipped steps in a row ("skip")
        self.buffers = [b for _, b in module.named_buffers()]
        self.saved_buffers = [b.clone() for b in self.buffers] if self.policy == "skip" else []

    def start_batch(self, module: L.LightningModule) -> None:
        if self.device != module.device:
            self.reset(module)
        buffers = None
        if self.buffers and self.policy == "stop":  # a copy, put back if the run stops at this batch
            buffers = torch._foreach_add(self.buffers, 0)
        elif self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)
        self.batch = Batch(module.global_step, module.current_epoch, self.sticky.clone(), [], buffers)

    def site(self, key: tuple, kind: str, names: tuple[str, ...]) -> Site:
        if key not in self.sites:
            self.sites[key] = Site(kind, names)
        return self.sites[key]

    def flag(self, site: Site, values: list[Tensor]) -> None:
        """The batch's flag set when a tensor of `values` (one per name of `site`) is not finite: by their
        2-norms (one multi-tensor operation; a sum per tensor costs as much on a CPU and a kernel each on
        a GPU), which are NaN or inf when an entry is, or when its squares sum past float32 (~3e38: entries
        past ~1e19, whose squares an Adam's second moment could not hold either); the flag is set by the
        kernel torch.amp's gradient scaler uses (it multiplies the norms by 1)."""
        norms = torch.stack(torch._foreach_norm(values))
        torch._amp_foreach_non_finite_check_and_unscale_([norms], self.batch.found, self.one)
        self.batch.norms.append((site, norms))

    def check_terms(self, module: L.LightningModule, terms: dict[str, Tensor], names: tuple[str, ...]) -> None:
        """Flag the terms `names` of a training step that are not finite anywhere in the batch."""
        if module._trainer is None or self.batch is None:
            return  # outside a fit's training batch
        names = tuple(name for name in names if name in terms)
        self.flag(self.site(("terms", names), "loss term", names), [terms[name].detach().float() for name in names])

    def before_step(self, module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Flag the gradients `optimizer` is about to use, agree across devices, and mask its update."""
        if self.batch is None:
            return
        scaled = getattr(module.trainer.precision_plugin, "scaler", None) is not None
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if stepped and not scaled:  # under a scaler, non-finite gradients are its to skip
            key = ("gradient", *map(id, stepped))
            if key not in self.sites:
                names = {p: name for name, p in module.named_parameters()}
                self.site(key, "gradient of", tuple(names.get(p, "a parameter") for p in stepped))
            self.flag(self.sites[key], [p.grad for p in stepped])
        if module.trainer.strategy.world_size > 1:  # a term can be non-finite on one device only
            torch.distributed.all_reduce(self.batch.found, op=torch.distributed.ReduceOp.MAX)
        if module.automatic_optimization:  # the batch's backward is done; a manual step calls end_steps
            self.end_steps()
        if masks_on_device(optimizer) and not scaled:
            optimizer.found_inf = self.batch.found
        elif bool(self.batch.found):  # one read of the device
            for p in stepped:  # an optimizer makes no update for a parameter without a gradient
                p.grad = None

    def end_steps(self) -> None:
        """After a batch's last backward ("skip"): its buffers (BatchNorm's statistics) put back if it was
        masked (a buffer a backward still needs, BatchNorm's running statistics, cannot change before)."""
        if self.policy == "skip" and self.buffers and self.batch is not None:
            masked = self.batch.found.bool()
            kept = [torch.where(masked, s, b) for s, b in zip(self.saved_buffers, self.buffers, strict=True)]
            torch._foreach_copy_(self.buffers, kept)

    def end_batch(self) -> None:
        """The batch joins the history of the next read; "stop" masks every later step once one is found,
        "skip" once `max_consecutive_skips` were in a row."""
        if self.batch is None:
            return
        batch, self.batch = self.batch, None
        if self.policy == "stop":
            self.sticky = batch.found
        else:
            self.streak = (self.streak + 1) * batch.found
            self.sticky = (self.streak >= self.max_consecutive_skips).float()
        self.history.append(batch)

    # --- the trainer's hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reset(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.start_batch(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before_step(pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """The batch ends; on the steps the loggers write (and every READ_EVERY steps) the flags are read
        back: the one read of the device in a training step."""
        self.end_batch()
        if loggers_write_this_step(trainer) or len(self.history) >= self.READ_EVERY:
            self.check(pl_module, f"the check at step {pl_module.global_step}")
            if self.policy == "skip":
                pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(pl_module, "the end of training")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":  # a diverged state fails in one line, before a validation fails on it
            self.check(pl_module, "validating")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.check(pl_module, "writing a checkpoint")  # no checkpoint holds a diverged or unapplied state

    # --- read back -----------------------------------------------------------------------------
    def check(self, module: L.LightningModule, before: str) -> None:
        """One read of the device: a UserError when the weights are not finite, when "stop" found a
        non-finite step since the last read, or when "skip" gave up; otherwise the skips counted."""
        self.end_batch()
        if self.stopped_by is not None:  # nothing is validated or saved after the stop
            raise UserError(self.stopped_by)
        history, self.history = self.history, []
        tensors = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
        parts = [torch.stack(torch._foreach_norm([t.detach() for _, t in tensors]))]
        parts += [b.found.reshape(1) for b in history] + [norms for b in history for _, norms in b.norms]
        values = iter(torch.cat([part.float().to(parts[0].device) for part in parts]).tolist())  # the one read
        bad_weights = [name for name, _ in tensors if not math.isfinite(next(values))]
        found = [next(values) > 0 for _ in history]
        norms = [[(site, [next(values) for _ in site.names]) for site, _ in b.norms] for b in history]
        stopped = next((i for i, masked in enumerate(found) if masked), None) if self.policy == "stop" else None
        if stopped is not None:  # the earliest cause: the buffers of the masked steps after it are put back
            batch = history[stopped]
            if batch.buffers is not None:
                torch._foreach_copy_(self.buffers, batch.buffers)
            self.stopped_by = (
                f"non-finite {recorded_what(norms[stopped])} at step {batch.step} (epoch {batch.epoch}); that "
                f"optimizer step was not applied, nor any after it, so no weight was updated from it (found before "
                f"{before}; last saved state: {self.last_saved(module)}). Lower the learning rate, or set "
                "--model.on_nonfinite skip"
            )
            raise UserError(self.stopped_by)
        if bad_weights:
            raise UserError(
                f"non-finite weights ({bad_weights[0]}{and_more(bad_weights)}) at step {module.global_step}, found "
                f"before {before}: a step with finite gradients made the model diverge (a learning rate far too "
                f"high?), which no policy can undo; last saved state: {self.last_saved(module)}, not overwritten. "
                "Go on from a saved state with a lower learning rate"
            )
        for batch, masked, checked in zip(history, found, norms, strict=True):
            self.skipped_steps += masked
            self.in_a_row = self.in_a_row + 1 if masked else 0
            if self.policy == "skip" and self.in_a_row >= self.max_consecutive_skips:
                raise UserError(
                    f"{self.in_a_row} steps in a row skipped, the last for a non-finite {recorded_what(checked)} at "
                    f"step {batch.step}: training is not recovering (last saved state: {self.last_saved(module)}); "
                    "resume from an earlier checkpoint with a lower learning rate, or check the data"
                )

    def check_outputs(self, module: L.LightningModule, recon: Tensor, stage: str) -> None:
        """A UserError when an evaluation's reconstructions are not finite (a diverged model), on every device
        alike (each has its own images: one that stopped alone would leave the others waiting)."""
        bad = not torch.isfinite(recon).all()
        if module._trainer is not None:
            bad = module.trainer.strategy.reduce_boolean_decision(bool(bad), all=False)
        if not bad:
            return
        raise UserError(
            f"non-finite reconstructions in {stage} at step {module.global_step}: the model has diverged (a learning "
            f"rate far too high?); last saved state: {self.last_saved(module)}. Go on from a saved state with a lower "
            "learning rate"
        )

    @staticmethod
    def last_saved(module: L.LightningModule) -> str:
        callback = module.trainer.checkpoint_callback if module._trainer is not None else None
        return getattr(callback, "last_model_path", "") or "no checkpoint (none was written yet)"


def recorded_what(checked: list[tuple[Site, list[float]]]) -> str:
    """What a batch found non-finite, from the norms of each site (in the order checked)."""
    for site, norms in checked:
        bad = [name for name, norm in zip(site.names, norms, strict=True) if not math.isfinite(norm)]
        if bad and site.kind == "loss term":
            return f"loss term {', '.join(bad)}"
        if bad:
            return f"gradient of {bad[0]}{and_more(bad)}"
    return "value on another device"


def and_more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""
