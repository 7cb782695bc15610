"""The checkpoint callback of every fae run: Lightning's ModelCheckpoint whose last.ckpt is always the
newest state.

Lightning 2.6 rewrites last.ckpt at a validation only when a top-k checkpoint is saved at the same
step, and at the end of training only when none was ever written. A run whose monitored metric stops
improving therefore keeps a stale last.ckpt, and `fae test --ckpt_path .../last.ckpt` would score old
weights (seen here: a run of 3000 batches whose last.ckpt held step 1000). `Checkpoint` saves last.ckpt
after each of Lightning's saving points and when training ends, unless it already holds that step. It
relies on three of ModelCheckpoint's own methods (`_monitor_candidates`, `_save_last_checkpoint`,
`_should_save_on_train_epoch_end`); tests/test_checkpoint.py pins the behaviour.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) with last.ckpt kept current; see the module docstring."""

    _last_step_saved_as_last: int | None = None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_saved_as_last = trainer.global_step

    def save_last_if_stale(self, trainer: L.Trainer) -> None:
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == 0:
            return
        if self._last_step_saved_as_last != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # After each of Lightning's own saving points (a validation, or the epoch's end when validation runs
    # there): saving last.ckpt earlier would mark the step saved and make Lightning skip its top-k save.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not self._should_save_on_train_epoch_end(trainer):
            self.save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self.save_last_if_stale(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.save_last_if_stale(trainer)
