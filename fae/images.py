"""The pictures of a run: the one grid of reconstructions that validation and the sweep both draw (true
images on odd rows, reconstructions on even rows, the paper's figure layout), the grid of samples, and
where a grid goes (a PNG in the run folder's images/, and every logger that takes images: W&B)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

from fae.errors import make_folder
from fae.files import written


def interleave_rows(top: Tensor, bottom: Tensor, per_row: int) -> Tensor:
    """Rows of `per_row` images alternating top, bottom, top, ...: the paper's figure layout
    (true images on odd rows, reconstructions on even rows). Both (N, C, H, W) -> (2N, C, H, W)."""
    n = (len(top) // per_row) * per_row
    c, h, w = top.shape[1:]
    rows = torch.stack([top[:n].reshape(-1, per_row, c, h, w), bottom[:n].reshape(-1, per_row, c, h, w)], 1)
    return rows.reshape(-1, c, h, w)


def reconstruction_grid(images: Tensor, recon: Tensor, per_row: int = 8) -> Tensor:
    """The one picture of reconstructions, in validation and in the sweep: images (N, C, H, W) in [0, 1]
    on odd rows, their reconstructions on even rows, `per_row` a row -> (C, H', W')."""
    per_row = min(per_row, len(images))
    return make_grid(interleave_rows(images, recon, per_row), nrow=per_row, padding=1)


def sample_grid(samples: Tensor, per_row: int = 8) -> Tensor:
    """Generated images (N, C, H, W) in [0, 1], `per_row` a row -> (C, H', W')."""
    return make_grid(samples, nrow=min(per_row, len(samples)), padding=1)


@rank_zero_only
def save_grid(grid: Tensor, run_dir: str | Path, key: str, step: int) -> Path:
    """Write an image grid (C, H, W) in [0, 1] to RUN_DIR/images/<key>_step<step>.png."""
    path = Path(run_dir) / "images" / f"{key.replace('/', '_')}_step{step:07d}.png"
    make_folder(path.parent, "the images folder", "free the run folder's path")
    with written(path) as file:
        save_image(grid, file, format="png")
    return path


def log_image_grid(trainer, key: str, grid: Tensor) -> None:
    """Send an image grid to every logger that takes images (W&B) and, as a PNG, to the log folder
    (the run folder under the CLI). A Trainer without loggers writes nothing."""
    if not trainer.loggers:
        return
    # not trainer.log_dir: it broadcasts across devices, and only rank zero logs images
    folder = getattr(trainer.loggers[0], "log_dir", None) or trainer.default_root_dir
    save_grid(grid, folder, key, trainer.global_step)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=trainer.global_step)
