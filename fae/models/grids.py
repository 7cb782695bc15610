"""The image grids of every validation and test, drawn by a callback that every family's model adds
to its Trainer (AutoEncoder.configure_callbacks): on global rank zero, once per validation and test
(not the sanity check), from the first batch,
  - <stage>/reconstructions: its images on odd rows and their reconstructions on even rows;
  - <stage>/samples: decoded prior draws from a fixed seed (0), so that successive grids show the
    decoder changing, not the draw (families with a prior);
to every logger that takes images (W&B) and as PNGs in the run folder's images/ (fae.images). The
reconstructions are made again for the grid's images (with compiled nets, one more batch shape)."""

from __future__ import annotations

import lightning as L
import torch

from fae.data.base import Batch
from fae.images import log_image_grid, reconstruction_grid, sample_grid


class ImageGrids(L.Callback):
    """Grids of `images` images (module docstring)."""

    def __init__(self, images: int) -> None:
        self.images = images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx: int, dataloader_idx=0):
        self.draw(trainer, pl_module, batch, batch_idx, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx: int, dataloader_idx=0):
        self.draw(trainer, pl_module, batch, batch_idx, "test")

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module, batch: Batch, batch_idx: int, stage: str) -> None:
        if batch_idx != 0 or not trainer.is_global_zero or trainer.sanity_checking or self.images <= 0:
            return
        images, inputs = batch.target[: self.images], batch.x[: self.images]
        with trainer.precision_plugin.forward_context():  # as the step computed them
            recon = pl_module.reconstruct(inputs)
        grid = reconstruction_grid(pl_module.to_unit_range(images), pl_module.to_unit_range(recon))
        log_image_grid(trainer, f"{stage}/reconstructions", grid)
        if pl_module.can_sample:
            with trainer.precision_plugin.forward_context():
                samples = pl_module.sample(self.images, generator=torch.Generator().manual_seed(0))
            log_image_grid(trainer, f"{stage}/samples", sample_grid(pl_module.to_unit_range(samples)))
