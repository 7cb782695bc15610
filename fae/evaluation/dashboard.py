"""`fae dashboard RUN_DIR... [--out FILE.json] [--save]`: the W&B Report that compares runs, built as code
with wandb-workspaces from what their W&B runs logged (fae.evaluation.publish, fae.tracking).

Each RUN_DIR is a training run folder (or one of its test-* folders): its W&B run is the trained model's
row, its newest (or the given) test's W&B run holds the robustness curves. The report's panels are the
paper's figures:
  - for each corruption kind, the error against its level (robustness/<kind>/error against
    robustness/<kind>/sigma, nu, ...), the runs grouped by variant when all are runs of an experiment and
    by family otherwise, with the mean and a band of the seeds' standard deviation; the FID of the
    reconstructions against the level where it was scored; the sweep's grids of reconstructions;
  - the clean test error and the posterior Fisher divergence as bar charts of the trained models, their
    validation grids, and their runs table with the summary columns (clean error, AUCs, FID/KID).
A saved Workspace view of the same panels, over the test runs, goes beside it (FILE.workspace.json).
wandb-workspaces serialises both without a server: the JSON written is what their `save()` uploads
(the upsert's variables, the spec as an object). `--save` uploads both, which needs W&B credentials
and the runs synced (`wandb sync`), and prints their URLs.
"""

from __future__ import annotations

import json
from pathlib import Path

from fae.data.noise import corruption_level_name
from fae.errors import UserError, make_folder
from fae.evaluation.results import QUALITY_COLUMNS, RESULTS_NAME, error_rows, read_rows
from fae.files import write_text
from fae.tracking import (
    resolve_wandb_mode,
    run_config,
    training_logger_settings,
    wandb_credentials_found,
    wandb_run_ids,
)

MODEL_GRIDS = ("val/reconstructions", "val/samples")  # of the training runs
TEST_GRIDS = ("test/reconstructions", "test/samples")  # of the test runs, beside the sweep's


class DashboardRun:
    """What the report needs of one trained run: its W&B ids, its test's rows and grids, its settings."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path} is not a run folder: give the folders of `fae fit` runs (or their test-* folders)")
        chosen = path if path.name.startswith("test-") and not (path / "checkpoints").is_dir() else None
        self.folder = path.parent if chosen else path
        trained = wandb_run_ids(self.folder)
        if not trained:
            raise UserError(
                f"{self.folder} has no W&B run ({self.folder / 'wandb'} holds none): it was trained without the W&B "
                "logger; `fae report` compares it from its files"
            )
        self.training_id = trained[-1]
        tests = [t for t in sorted(self.folder.glob("test-*")) if wandb_run_ids(t) and (t / RESULTS_NAME).is_file()]
        test = chosen or (tests[-1] if tests else None)
        if test is None or test not in tests:
            where = test or self.folder
            raise UserError(f"{where} holds no W&B test run with its results: run `fae test` on its checkpoint first")
        self.test_id = wandb_run_ids(test)[-1]
        self.rows = read_rows(test)
        self.grids = [f"robustness/{p.stem}" for p in sorted(test.glob("reconstructions_*.png"))]
        self.settings = training_logger_settings(self.folder)
        self.variant = run_config(self.folder).get("variant") and run_config(test).get("variant")  # both runs'


def grouping(runs: list[DashboardRun]) -> str:
    """The config key the runs are grouped by: the variant for the runs of an experiment, else the family."""
    return "variant" if all(run.variant for run in runs) else "model"


def recon_metrics(runs: list[DashboardRun]) -> list[str]:
    """The clean test errors the runs were scored by (bce on MNIST, mse on CelebA)."""
    return list(dict.fromkeys(f"test/recon_{r.metric}" for run in runs for r in error_rows(run.rows)))


def panels(runs: list[DashboardRun], group: str, grids: tuple[str, ...]):
    """The panels of the tested runs (curves, the sweep's grids) and of the models (bars, `grids`: the media
    keys of their grids), grouped by `group`."""
    import wandb_workspaces.reports.v2 as wr

    rows = [r for run in runs for r in run.rows]
    by = dict(groupby=wr.Config(group), groupby_aggfunc="mean", groupby_rangefunc="stddev")
    curves = []
    for kind in sorted({r.kind for r in error_rows(rows)}):
        x, name = f"robustness/{kind}/{corruption_level_name(kind)}", corruption_level_name(kind)
        curves.append(wr.LinePlot(title=f"error against {kind} {name}", x=x, y=[f"robustness/{kind}/error"], **by))
        if any(r.kind == kind and r.metric == "fid" for r in rows):
            title = f"FID of reconstructions against {kind} {name}"
            curves.append(wr.LinePlot(title=title, x=x, y=[f"robustness/{kind}/fid"], **by))
    sweep_grids = list(dict.fromkeys(key for run in runs for key in run.grids))
    if sweep_grids:
        curves.append(wr.MediaBrowser(title="reconstructions of corrupted test images", media_keys=sweep_grids))
    bars = [(f"clean {metric}", metric) for metric in recon_metrics(runs)]
    bars.append(("posterior Fisher divergence", "test/posterior_fisher"))
    models = [wr.BarPlot(title=title, metrics=[metric], groupby=wr.Config(group)) for title, metric in bars]
    models.append(wr.MediaBrowser(title="reconstructions and samples", media_keys=list(grids)))
    return curves, models


def run_filter(ids: list[str]) -> str:
    return f"Metric('ID') in [{', '.join(repr(i) for i in ids)}]"


def build_report(runs: list[DashboardRun], entity: str, project: str, title: str):
    """The wandb-workspaces Report comparing `runs` (module docstring)."""
    import wandb_workspaces.reports.v2 as wr

    group = grouping(runs)
    curves, models = panels(runs, group, MODEL_GRIDS)
    rows = [r for run in runs for r in run.rows]
    summary = [f"summary:{metric}" for metric in (*recon_metrics(runs), "test/posterior_fisher")]
    for kind in sorted({r.kind for r in error_rows(rows)}):
        summary += [f"summary:robustness/auc_{kind}", f"summary:robustness/auc_low_{kind}"]
    summary += [
        f"summary:quality/{m}/{k}" for (k, m) in QUALITY_COLUMNS if any((r.kind, r.metric) == (k, m) for r in rows)
    ]
    tested = wr.Runset(name="tests", filters=run_filter([run.test_id for run in runs]), groupby=[f"config.{group}"])
    trained = wr.Runset(
        name="trained models",
        filters=run_filter([run.training_id for run in runs]),
        groupby=[f"config.{group}"],
        pinned_columns=summary,
    )
    return wr.Report(
        project=project,
        entity=entity,
        title=title,
        description=f"fae: the robustness of {len(runs)} runs, grouped by {group}; bands: the standard deviation "
        "across the runs of a group",
        blocks=[
            wr.H2("Robustness: error against the corruption level"),
            wr.PanelGrid(runsets=[tested], panels=curves),
            wr.H2("The trained models"),
            wr.PanelGrid(runsets=[trained], panels=models),
        ],
    )


def build_workspace(runs: list[DashboardRun], entity: str, project: str, title: str):
    """A saved Workspace view of the report's panels over the test runs only (each holds its own test
    metrics, so that no model counts twice)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    group = grouping(runs)
    curves, models = panels(runs, group, TEST_GRIDS)
    return ws.Workspace(
        entity=entity,
        project=project,
        name=title,
        sections=[
            ws.Section(name="Robustness", panels=curves, is_open=True),
            ws.Section(name="The tested models", panels=models, is_open=True),
        ],
        runset_settings=ws.RunsetSettings(
            filters=run_filter([run.test_id for run in runs]), groupby=[expr.Config(group)]
        ),
    )


def report_json(report) -> dict:
    """What `Report.save()` uploads: its upsert's variables, the spec as an object."""
    model = report._to_model()  # wandb-workspaces' serialisation; offline
    return {
        "entityName": model.project.entity_name,
        "projectName": model.project.name,
        "displayName": model.display_name,
        "description": model.description,
        "type": "runs",
        "spec": json.loads(model.spec.model_dump_json(by_alias=True, exclude_none=True)),
    }


def workspace_json(workspace) -> dict:
    """What `Workspace.save()` uploads: its upsert's variables, the spec as an object."""
    view = workspace._to_model()
    spec = json.loads(view.spec.model_dump_json(by_alias=True, exclude_none=True))
    return {
        "entityName": view.entity,
        "projectName": view.project,
        "displayName": view.display_name,
        "type": "project-view",
        "description": "",
        "spec": spec,
    }


def default_entity() -> str:
    """The default W&B entity of the credentials, or one line saying to give --entity."""
    import wandb

    try:
        entity = wandb.Api().default_entity
    except Exception:  # wandb's own errors, of the network or the credentials
        entity = None
    if not entity:
        raise UserError("--save needs an entity W&B could not tell: give --entity (your W&B user or team)")
    return entity


def save_to_wandb(report, workspace) -> str:
    """Upload both; any failure of the server's or the network's as one line."""
    try:
        report.save()
        workspace.save()
    except Exception as err:  # wandb's and wandb-workspaces' own errors
        raise UserError(
            f"W&B did not save the dashboard ({type(err).__name__}: {str(err)[:200]}): try --save again"
        ) from None
    return f"the report {report.url}, the workspace {workspace.url}"


def dashboard(
    run_dirs: list[Path],
    out: Path = Path("dashboard.json"),
    save: bool = False,
    entity: str | None = None,
    project: str | None = None,
    title: str = "fae: robustness of the families",
) -> None:
    """Build the W&B Report that compares runs: the paper's figures as panels, the runs table.

    Args:
        run_dirs: training run folders (or their test-* folders) whose W&B runs to compare.
        out: where the report's JSON goes (what `save()` uploads); the Workspace view's beside it.
        save: upload the report and the view to W&B (needs credentials and the runs synced) and print
            their URLs.
        entity: the W&B entity (default: the runs' config's, else the default entity of the credentials).
        project: the W&B project (default: the runs' config's, `fae`).
        title: the report's title.
    """
    runs = [DashboardRun(Path(p)) for p in run_dirs]
    projects = {project or run.settings.get("project") or "fae" for run in runs}
    if len(projects) > 1:
        raise UserError(f"the runs were logged to several W&B projects ({', '.join(sorted(projects))}): give --project")
    entity = entity or next((run.settings["entity"] for run in runs if run.settings.get("entity")), None)
    if save and not (wandb_credentials_found() and resolve_wandb_mode("auto") == "online"):
        raise UserError("--save needs W&B credentials and online mode: `wandb login` (and unset WANDB_MODE=offline)")
    if save and entity is None:
        entity = default_entity()
    project = projects.pop()
    report = build_report(runs, entity or "", project, title)
    workspace = build_workspace(runs, entity or "", project, title)
    out = Path(out)
    make_folder(out.parent, "the dashboard's folder", "give --out a file in a folder that can be made")
    write_text(out, json.dumps(report_json(report), indent=1))
    write_text(out.with_name(f"{out.stem}.workspace.json"), json.dumps(workspace_json(workspace), indent=1))
    if save:
        print(f"fae: dashboard saved: {save_to_wandb(report, workspace)} (their specs in {out})")
        return
    print(
        f"fae: dashboard of {len(runs)} runs written to {out}, the report W&B would save; to save it: `wandb sync` "
        "the runs, `wandb login`, then the same command with --save"
    )
