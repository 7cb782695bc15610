"""Where the results of one `fae test` go once scored: files in the test's folder, figures drawn from
the rows in memory, the loggers' metrics and, for W&B, tables, line plots and images.

  - robustness.json and robustness.csv (fae.evaluation.results), robustness_<kind>.png and
    fid_<kind>.png, robustness.md (fae.evaluation.report's tables of this one run), and each grid of
    reconstructions of corrupted images as reconstructions_<kind>_<level>.png;
  - for every logger: robustness/<kind>/<level> (the mean error), robustness/auc_<kind> (the mean error
    over the swept range) and quality/<metric>/<kind>[/<level>] (FID and KID); the last value of each is
    its W&B summary, by which a runs table sorts;
  - for W&B also the rows as the table robustness/table, a line plot per corruption kind (error against
    level) and the grids as images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchvision.utils import save_image

from fae.evaluation.report import write_report
from fae.evaluation.results import SAMPLE_KINDS, Curves, Row, area_under_curve, error_rows, summary_of, write_rows


def publish(trainer: L.Trainer, rows: list[Row], grids: dict[str, Tensor], folder: Path) -> None:
    """Everything the test's results go to (module docstring); on global rank zero only."""
    write_rows(rows, folder)
    write_report({f"{rows[0].model} ({folder.name})": Curves(rows, summary_of(rows))}, folder)
    for name, grid in grids.items():
        save_image(grid, folder / f"{name}.png")
    log_to_loggers(trainer, rows, grids, folder)


def logged_metrics(rows: list[Row]) -> dict[str, float]:
    """The scalars every logger receives (module docstring)."""
    errors = error_rows(rows)
    kinds = sorted({r.kind for r in errors})
    metrics = {f"robustness/{r.kind}/{r.level:g}": r.mean for r in errors}
    metrics |= {f"robustness/auc_{kind}": area_under_curve(errors, kind) for kind in kinds}
    for r in rows:
        if r.is_quality:
            metrics[f"quality/{r.metric}/{r.kind}" + ("" if r.kind in SAMPLE_KINDS else f"/{r.level:g}")] = r.mean
    return metrics


def log_to_loggers(trainer: L.Trainer, rows: list[Row], grids: dict[str, Tensor], folder: Path) -> None:
    metrics = logged_metrics(rows)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger, rows, grids, folder)


def log_to_wandb(logger: WandbLogger, rows: list[Row], grids: dict[str, Tensor], folder: Path) -> None:
    """The rows as a W&B table, a line plot of the error against the level per corruption kind, the grids."""
    import wandb

    columns = [f.name for f in dataclasses.fields(Row)]
    table = wandb.Table(columns=columns, data=[[getattr(r, c) for c in columns] for r in rows])
    errors = error_rows(rows)
    plots = {
        f"robustness/plot_{kind}": wandb.plot.line(
            wandb.Table(columns=["level", "mean"], data=[[r.level, r.mean] for r in errors if r.kind == kind]),
            "level",
            "mean",
            title=f"reconstruction error vs {kind} level",
        )
        for kind in sorted({r.kind for r in errors})
    }
    images = {f"robustness/{name}": wandb.Image(str(folder / f"{name}.png")) for name in grids}
    logger.experiment.log({"robustness/table": table, **plots, **images})
