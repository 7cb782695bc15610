"""No weight is ever updated from a non-finite value: the policy of every family for a loss term or a
gradient that is NaN or infinite.

`NonFiniteGuard` checks the objective's terms before backward (`terms_finite`) and the gradients of
the parameters an optimizer is about to step (`check_gradients`), on every device alike. On a
non-finite value, before any update:
  - "stop" raises a UserError naming the term (or the parameter) and the step, and the last
    checkpoint saved, which stays as it was;
  - "skip" restores the buffers (BatchNorm's statistics) to those before the step, clears the
    gradients, counts the step as skipped (train/skipped_steps), and gives up with a UserError after
    `max_consecutive_skips` in a row.
A step whose finite gradients make the weights (or BatchNorm's statistics) non-finite, a learning rate
far too high, cannot be skipped after the fact: `check_state`, before each validation of a fit and
before each checkpoint is written, stops with a UserError under either policy, so that no checkpoint
ever holds such a state and last.ckpt stays the last good one; `check_outputs` does the same for
non-finite reconstructions in an evaluation (a model diverged with finite weights).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor

from fae.errors import UserError

Policy = Literal["stop", "skip"]


class NonFiniteGuard:
    """The non-finite policy and its state for one model (module docstring)."""

    def __init__(self, policy: Policy = "stop", max_consecutive_skips: int = 20) -> None:
        if policy not in ("stop", "skip"):
            raise UserError(f"on_nonfinite must be 'stop' or 'skip', got {policy!r}")
        if max_consecutive_skips < 1:
            raise UserError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0  # in this process's training, for the log
        self.skips_in_a_row = 0
        self.skipped_this_batch = False
        self.buffers_before_step: dict[str, Tensor] = {}

    def batch_start(self, module: L.LightningModule) -> None:
        self.skipped_this_batch = False
        if self.policy == "skip":  # restored if this step is skipped
            self.buffers_before_step = {name: b.clone() for name, b in module.named_buffers()}

    def batch_end(self) -> None:
        if not self.skipped_this_batch:
            self.skips_in_a_row = 0

    def terms_finite(self, module: L.LightningModule, terms: dict[str, Tensor], names: tuple[str, ...]) -> bool:
        """True when the terms `names` are finite on every device; otherwise the policy acts (False: skip)."""
        if module._trainer is None:
            return True
        names = [name for name in names if name in terms]
        finite = torch.stack([torch.isfinite(terms[name]).all() for name in names]).tolist()  # one sync
        bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
        if not module.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return True
        self.non_finite(module, f"loss term {', '.join(bad) or '(on another device)'}")
        return False

    def check_gradients(self, module: L.LightningModule, optimizer) -> None:
        """A non-finite gradient of the parameters `optimizer` steps (after the devices' reduction, so
        every device decides alike): the policy acts, and the gradients are cleared (no update)."""
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # the sum of every entry, a read of each gradient and nothing allocated: NaN or inf when an entry
        # is, or when the entries sum past float32 (~1e38: gradients Adam's squares would overflow too);
        # an isfinite of each entry costs far more (benchmarks/framework_overhead.py)
        if not stepped or torch.isfinite(torch.stack([p.grad.sum() for p in stepped]).sum()):
            return
        names = {p: name for name, p in module.named_parameters()}
        bad = [names.get(p, "a parameter") for p in stepped if not torch.isfinite(p.grad).all()]
        self.non_finite(module, f"gradient of {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}")
        for p in stepped:  # an optimizer makes no update for a parameter without a gradient
            p.grad = None

    def non_finite(self, module: L.LightningModule, what: str) -> None:
        where = f"at step {module.global_step} (epoch {module.current_epoch})"
        callback = module.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or "no checkpoint was written yet"
        if self.policy == "stop":
            raise UserError(
                f"non-finite {what} {where}; stopped before the optimizer step, so no weight was updated from it "
                f"(last saved state: {last}). Lower the learning rate, or set --model.on_nonfinite skip"
            )
        if self.buffers_before_step:
            module.load_state_dict(self.buffers_before_step, strict=False)  # e.g. BatchNorm statistics
        self.skipped_this_batch = True
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        module.log("train/skipped_steps", float(self.skipped_steps))
        if self.skips_in_a_row >= self.max_consecutive_skips:
            raise UserError(
                f"{self.skips_in_a_row} steps in a row skipped, the last for a non-finite {what} {where}: "
                f"training is not recovering (last saved state: {last}); resume from an earlier checkpoint "
                "with a lower learning rate, or check the data"
            )

    def check_state(self, module: L.LightningModule, before: str) -> None:
        """A UserError (either policy) when a weight or a floating buffer is not finite; one read of the device."""
        tensors = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
        if not tensors or torch.isfinite(torch.stack([t.detach().float().sum() for _, t in tensors]).sum()):
            return
        bad = [name for name, t in tensors if not torch.isfinite(t).all()] or ["the weights' sum (past float32)"]
        raise UserError(
            f"non-finite weights ({bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}) at step "
            f"{module.global_step}, found before {before}: a step with finite gradients made the model diverge (a "
            f"learning rate far too high?), which no policy can undo; last saved state: {self.last_saved(module)}, "
            "not overwritten. Go on from a saved state with a lower learning rate"
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
