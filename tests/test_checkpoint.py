"""fae.checkpoint.Checkpoint: last.ckpt holds the newest state, also when the monitored metric stops
improving, which Lightning's own ModelCheckpoint gets wrong (pinned here)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fae.checkpoint import Checkpoint
from fae.data import DigitsDataModule
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
