"""Lightning's loop counters in a checkpoint fae saves outside Lightning's own saving points, written as
Lightning 2.6's restore expects them, so that a resumed run steps, logs and validates as an
uninterrupted one.

fae.checkpoint saves last.ckpt at the start of a batch (every few minutes, and on SIGTERM/SIGINT). There
Lightning has counted the next batch `ready` but not `started`, a state its restore does not expect: it
counts that batch as trained (logged steps one ahead and, with check_val_every_n_epoch=None as `fae
experiment` runs, every later validation one batch early). `after_previous_batch` writes the counters as
after the previous batch and its validation, the state such a save holds, and repairs checkpoints written
before it did. Where Lightning then restores through its branch for a save at a validation's end (the
first batch of an epoch that validates per epoch; an epoch's end under a step budget, where Lightning
restarts the finished epoch's loop), which counts one more batch stepped, the save holds one fewer
(`restore_skips_a_validation`). Written by hand: Lightning has no hook for either; tests/test_checkpoint.py
resumes from each kind of save point and tests/test_runs.py through the CLI.
"""

from __future__ import annotations

import lightning as L


def as_lightning_restores(checkpoint: dict, trainer: L.Trainer, at_epoch_end: bool) -> None:
    """The counters of a checkpoint fae.checkpoint saves (`at_epoch_end`: from its epoch-end hook) as
    Lightning's restore expects them; a save at a batch's end or a validation's end is left as it is."""
    progress = after_previous_batch(checkpoint)
    if progress is None and at_epoch_end and trainer.max_steps != -1:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    if progress is not None and restore_skips_a_validation(trainer, progress):
        checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def after_previous_batch(checkpoint: dict) -> dict | None:
    """Write the batch counters of a checkpoint saved at the start of a batch as those after the previous
    batch and its validation, the state it holds (module docstring); returns the rewritten counters (None
    when there was nothing to rewrite). At that point Lightning 2.6 has counted the next batch `ready` but
    not `started`; restored so, the batch counts as trained once more (`total_batch_idx` and
    `_batches_that_stepped` one ahead of `global_step`). Checkpoints of Lightning's own saving points
    (after a batch, after a validation) have no such batch and are left as they are."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not isinstance(progress, dict):
        return None
    rewritten = None
    for counts in (progress.get("total"), progress.get("current")):
        if not isinstance(counts, dict) or "started" not in counts:
            continue
        fetched_only = counts["started"] == counts["processed"] == counts["completed"] == counts["ready"] - 1
        if fetched_only:
            counts["ready"] = counts["completed"]
            rewritten = progress
    return rewritten


def restore_skips_a_validation(trainer: L.Trainer, progress: dict) -> bool:
    """Whether Lightning, restoring batch counters all equal (as after a validation), takes the branch of
    `_TrainingEpochLoop.advance` meant for a checkpoint saved at a validation's end: it trains no batch,
    skips the validation already done and counts one more batch stepped, which such a checkpoint holds one
    short (it is saved before that count). Lightning's `_should_check_val_fx` on the restored counters, for
    the batch-based schedules (a time-based one is not due at a restore). It is taken at the first batch
    of an epoch that validates per epoch (the epoch's batch index is -1 there) and where a validation ran
    without a save of its own."""
    if (
        trainer.val_check_batch in (None, float("inf"))
        or getattr(trainer, "_val_check_time_interval", None) is not None
    ):
        return False
    if not trainer.fit_loop.epoch_loop._should_check_val_epoch():
        return False
    part = "total" if trainer.check_val_every_n_epoch is None else "current"
    return progress[part]["completed"] % trainer.val_check_batch == 0
