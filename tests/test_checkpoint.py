"""fae.checkpoint.Checkpoint: last.ckpt holds the newest state, also when the monitored metric stops
improving, which Lightning's own ModelCheckpoint gets wrong (pinned here); a run resumed from any of its
save points steps, logs and validates as an uninterrupted one."""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from fae.checkpoint import Checkpoint, Preempted
from fae.data import DigitsDataModule
from fae.data.base import ResumableDataLoader
from fae.errors import UserError
from fae.models import VAE
from fae.nets import MNISTDecoder, MNISTEncoder

from .helpers import QUIET


class WorseEveryValidation(VAE):
    """A VAE whose monitored score grows with the step: the first validation stays the best."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val/score", float(self.global_step))


@pytest.mark.parametrize("callback", [Checkpoint, ModelCheckpoint])
@pytest.mark.parametrize("validation", ["every 4 batches", "at epoch ends"])
def test_last_checkpoint_is_the_newest_state(tmp_path, callback, validation):
    saver = callback(dirpath=tmp_path, monitor="val/score", mode="min", save_last=True, filename="best-{step}")
    schedule = {"val_check_interval": 4} if validation == "every 4 batches" else {"limit_train_batches": 4}
    trainer = L.Trainer(
        max_steps=10, limit_val_batches=1, callbacks=[saver], **schedule, **{**QUIET, "enable_checkpointing": True}
    )
    model = WorseEveryValidation(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert [p.name for p in tmp_path.glob("best-*.ckpt")] == ["best-step=4.ckpt"]  # the first validation's
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"]
    # Lightning 2.6 rewrites last.ckpt only along with a top-k save: stale at step 4. fae's is current.
    assert last == (10 if callback is Checkpoint else 4)


# --- exact resumption from every kind of save point -------------------------------------------------


class Line(L.LightningModule):
    """A linear model on fixed rows (2 per batch, `batches` per epoch); with `manual`, manual optimization
    with two optimizers, as the WAE-GAN trains."""

    def __init__(self, batches: int, manual: bool = False) -> None:
        super().__init__()
        self.batches, self.manual = batches, manual
        self.a, self.b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        loss = (self.a(batch[0]) ** 2).mean() + (self.b(batch[0]) ** 2).mean()
        if not self.manual:
            return loss
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (self.a(batch[0]) ** 2).mean() + float(self.global_step % 3))

    def configure_optimizers(self):
        if self.manual:
            return [torch.optim.SGD(self.a.parameters(), 0.1), torch.optim.SGD(self.b.parameters(), 0.1)]
        return torch.optim.SGD(self.parameters(), 0.1)

    def train_dataloader(self):
        rows = TensorDataset(torch.randn(2 * self.batches, 3, generator=torch.Generator().manual_seed(0)))
        progress = lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # noqa: E731
        return ResumableDataLoader(rows, batch_size=2, batches_done=progress)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 3, generator=torch.Generator().manual_seed(1))), batch_size=2)


class Trace(L.Callback):
    """(what, epoch, batch index, global step, batches stepped) at every batch and validation; a SIGTERM as
    fae's handler receives it once `stop_after` batches are trained."""

    def __init__(self, checkpoint: Checkpoint, stop_after: int | None = None) -> None:
        self.checkpoint, self.stop_after, self.rows = checkpoint, stop_after, []

    def row(self, what: str, trainer) -> None:
        loop = trainer.fit_loop.epoch_loop
        self.rows.append((what, trainer.current_epoch, loop.batch_idx, trainer.global_step, loop._batches_that_stepped))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.row("batch", trainer)

    def on_validation_start(self, trainer, pl_module):
        self.row("validation", trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.total_batch_idx + 1 == self.stop_after:
            self.checkpoint._on_signal(signal.SIGTERM, None)


SAVE_POINTS = {  # (batches per epoch, Trainer arguments, stop after this many batches, Checkpoint arguments)
    "steps, inside an accumulation window": (
        24, dict(max_steps=20, check_val_every_n_epoch=None, val_check_interval=7, accumulate_grad_batches=2), 11, {}
    ),
    "per epoch, an epoch's first batch": (12, dict(max_steps=30, val_check_interval=5), 12, {}),
    "every second epoch, its first batch": (6, dict(max_steps=30, check_val_every_n_epoch=2), 6, {}),
    "per epoch, at its end with a step budget": (12, dict(max_steps=30), 12, {}),
    "manual optimization, an epoch's first batch": (12, dict(max_steps=30, val_check_interval=5), 12, {}),
    "a validation without a save of its own": (
        12, dict(max_steps=30, check_val_every_n_epoch=None, val_check_interval=5), 5, {"save_on_train_epoch_end": True}
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SAVE_POINTS)
def test_a_run_resumed_from_any_save_point_steps_logs_and_validates_as_an_uninterrupted_one(tmp_path, case):
    """Stopped by SIGTERM at a save point of each kind, then resumed: the same batches, validations, global
    steps and logged steps (`_batches_that_stepped`), the same weights and the same best checkpoint.
    Lightning 2.6 restores a save at the start of a batch, or at an epoch's end with a step budget, one
    batch ahead unless fae.checkpoint writes its counters."""
    batches, schedule, stop_after, saving = SAVE_POINTS[case]
    manual = case.startswith("manual")

    def fit(folder: str, stop_after: int | None = None, ckpt_path: str | None = None):
        L.seed_everything(0, verbose=False)
        saver = Checkpoint(dirpath=tmp_path / folder, save_last=True, monitor="val_loss", last_every_minutes=None,
                           **saving)  # fmt: skip
        trace = Trace(saver, stop_after)
        trainer = L.Trainer(callbacks=[saver, trace], num_sanity_val_steps=0, limit_val_batches=2, max_epochs=-1,
                            **schedule, **{**QUIET, "enable_checkpointing": True})  # fmt: skip
        model = Line(batches, manual)
        try:
            trainer.fit(model, ckpt_path=ckpt_path)
        except Preempted as stop:
            return trace.rows, stop.step
        return trace.rows, model

    whole, uninterrupted = fit("whole")
    _, stopped_at = fit("parts", stop_after)
    assert 0 < stopped_at < schedule["max_steps"]
    rows, resumed = fit("parts", ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    start = next(i for i, row in enumerate(whole) if row[:4] == rows[0][:4])  # the same batch of the same epoch
    assert rows[0][0] == "batch" and rows == whole[start:]
    for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    best = [
        sorted(p.name for p in (tmp_path / run).glob("*.ckpt") if p.name != "last.ckpt") for run in ("whole", "parts")
    ]
    assert best[0] == best[1] and len(best[0]) == 1


def test_save_on_exception_is_refused_in_one_line():
    """Lightning's save_on_exception writes last.ckpt in the middle of the failed batch."""
    with pytest.raises(UserError, match="save_on_exception is not supported"):
        Checkpoint(save_on_exception=True)
