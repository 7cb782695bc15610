"""A budget means the same number of batches for every family: max_steps, global_step, step-based
checkpoints and logged steps all count batches, also for the WAE-GAN's two optimizer updates per batch."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from fae.data import DigitsDataModule
from fae.models import VAE, WAEGAN, FisherAE
from fae.nets import MNISTDecoder, MNISTEncoder

from .helpers import QUIET


class CountBatches(L.Callback):
    def __init__(self) -> None:
        self.batches = 0
        self.updates = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.updates += 1


def model_of(family: str):
    if family == "vae":
        return VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    if family == "fisher":
        return FisherAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    return WAEGAN(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)


@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_max_steps_checkpoints_and_logged_steps_count_batches(tmp_path, family):
    counter = CountBatches()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        max_steps=7,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[counter, saver],
        **{**QUIET, "enable_checkpointing": True, "logger": CSVLogger(tmp_path)},
    )
    trainer.fit(model_of(family), datamodule=DigitsDataModule(batch_size=16))
    assert counter.batches == 7 and trainer.global_step == 7
    assert counter.updates == (14 if family == "wae_gan" else 7)  # the discriminator's updates are real
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=3.ckpt", "step=6.ckpt"]
    for name, batches in (("step=3.ckpt", 3), ("step=6.ckpt", 6)):
        progress = torch.load(tmp_path / "ckpt" / name, weights_only=False)["loops"]["fit_loop"]
        assert progress["epoch_loop.batch_progress"]["total"]["processed"] == batches
    (path,) = tmp_path.glob("lightning_logs/*/metrics.csv")
    steps = [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("train/loss")]
    assert steps == list(range(7))
