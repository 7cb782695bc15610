"""Where the results of one `fae test` go once scored: files in the test's folder, figures drawn from
the rows in memory, the loggers' metrics and, for W&B, curves that compare runs.

  - robustness.json and robustness.csv (fae.evaluation.results), robustness_<kind>.png and
    fid_<kind>.png, robustness.md (fae.evaluation.report's tables of this one run), and each grid of
    reconstructions of corrupted images as reconstructions_<kind>_<level>.png;
  - for every logger but W&B (the CSV): robustness/<kind>/<level> (the mean error), robustness/auc_<kind>
    (the mean error over the swept range) and quality/<metric>/<kind>[/<level>] (FID and KID);
  - for W&B, curves on the level's axis: for each corruption kind, one history row per level holding
    robustness/<kind>/<level name> (sigma, nu, ...), robustness/<kind>/error, robustness/<kind>/error_std
    and robustness/<kind>/fid, the last three defined with the level as their step metric
    (`define_metric`), so that a standard line panel overlays runs and W&B's grouping draws the mean and
    spread of seeds; the AUCs and the quality scores as the run's summary; the rows as the table
    robustness/table; the grids as images; robustness.json/csv as an artifact;
  - at the end of the test (`publish_summary`), the test's summaries (the clean test metrics, the AUCs,
    the quality scores) also into the summary of the training run's W&B run: one row per trained model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchvision.utils import save_image

from fae.data.noise import corruption_level_name
from fae.evaluation.report import write_report
from fae.evaluation.results import (
    LOW_NOISE,
    SAMPLE_KINDS,
    Curves,
    Row,
    area_under_curve,
    error_rows,
    summary_of,
    write_rows,
)
from fae.files import written


def publish(trainer: L.Trainer, rows: list[Row], grids: dict[str, Tensor], folder: Path) -> None:
    """Everything the test's results go to (module docstring); on global rank zero only."""
    files = write_rows(rows, folder)
    write_report({f"{rows[0].model} ({folder.name})": Curves(rows, summary_of(rows))}, folder)
    for name, grid in grids.items():
        with written(folder / f"{name}.png") as file:
            save_image(grid, file, format="png")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger, rows, grids, folder, files)
        else:
            logger.log_metrics({**level_metrics(rows), **summaries(rows)}, step=trainer.global_step)


def level_metrics(rows: list[Row]) -> dict[str, float]:
    """robustness/<kind>/<level>: the mean error at each level, a scalar each (for the CSV)."""
    return {f"robustness/{r.kind}/{r.level:g}": r.mean for r in error_rows(rows)}


def summaries(rows: list[Row]) -> dict[str, float]:
    """One number per run: the AUC of each corruption kind (its full range and its levels up to LOW_NOISE)
    and the quality scores."""
    errors = error_rows(rows)
    values = {}
    for kind in sorted({r.kind for r in errors}):
        values[f"robustness/auc_{kind}"] = area_under_curve(errors, kind)
        values[f"robustness/auc_low_{kind}"] = area_under_curve(errors, kind, up_to=LOW_NOISE)
    for r in rows:
        if r.is_quality:
            values[f"quality/{r.metric}/{r.kind}" + ("" if r.kind in SAMPLE_KINDS else f"/{r.level:g}")] = r.mean
    return values


def curves(rows: list[Row]) -> dict[str, list[dict[str, float]]]:
    """{the level's key robustness/<kind>/<level name>: one history row per level}, each row holding the
    level, the error's mean and spread, and the FID of the reconstructions where it was scored."""
    fid = {(r.kind, r.level): r.mean for r in rows if r.metric == "fid"}
    out: dict[str, list[dict[str, float]]] = {}
    for r in sorted(error_rows(rows), key=lambda r: (r.kind, r.level)):
        prefix = f"robustness/{r.kind}"
        row = {f"{prefix}/{corruption_level_name(r.kind)}": r.level, f"{prefix}/error": r.mean}
        row[f"{prefix}/error_std"] = r.std
        if (r.kind, r.level) in fid:
            row[f"{prefix}/fid"] = fid[(r.kind, r.level)]
        out.setdefault(f"{prefix}/{corruption_level_name(r.kind)}", []).append(row)
    return out


def log_to_wandb(logger: WandbLogger, rows: list[Row], grids: dict[str, Tensor], folder: Path, files) -> None:
    """The curves on their level axis, the summaries, the table, the grids and the files' artifact."""
    import wandb

    run = logger.experiment
    for level_key, history in curves(rows).items():
        run.define_metric(level_key)
        for name in dict.fromkeys(key for row in history for key in row if key != level_key):
            run.define_metric(name, step_metric=level_key, summary="none")  # a curve: no value sums it up
        for row in history:
            run.log(row)
    run.summary.update(summaries(rows))
    columns = [f.name for f in dataclasses.fields(Row)]
    table = wandb.Table(columns=columns, data=[[getattr(r, c) for c in columns] for r in rows])
    images = {f"robustness/{name}": wandb.Image(str(folder / f"{name}.png")) for name in grids}
    run.log({"robustness/table": table, **images})
    artifact = wandb.Artifact(f"robustness-{run.id}", type="robustness", description="robustness.json and .csv")
    for file in files:
        artifact.add_file(str(file))
    run.log_artifact(artifact)


def publish_summary(trainer: L.Trainer, rows: list[Row]) -> None:
    """The test's summaries into the W&B row of the training run it evaluated (fae.tracking.WandbLogger),
    once the test's own metrics are computed; on global rank zero."""
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    values |= summaries(rows)
    for logger in trainer.loggers:
        if hasattr(logger, "write_to_training_run"):
            logger.write_to_training_run(values)
