"""`fae dashboard RUN_DIR... [--out FILE.json] [--save]`: the W&B Report that compares runs, built as code
with wandb-workspaces from what their W&B runs logged (fae.evaluation.publish, fae.tracking).

Each RUN_DIR is a training run folder (or one of its test-* folders): its W&B run is the trained model's
row, its newest test's W&B run holds the robustness curves. The report's panels are the paper's figures:
  - for each corruption kind, the error against its level (robustness/<kind>/error against
    robustness/<kind>/sigma, nu, ...), the runs grouped by variant when all are runs of an experiment and
    by family otherwise, with the mean and a band of the seeds' standard deviation; the FID of the
    reconstructions against the level where it was scored;
  - the clean test error and the posterior Fisher divergence as bar charts of the trained models;
  - the grids: reconstructions of masked test images, validation reconstructions and samples;
  - the runs table of the trained models, with the summary columns (clean error, AUCs, FID/KID).
A saved Workspace view of the same panels, over the same runs, goes beside it (FILE.workspace.json).
wandb-workspaces serialises both without a server: the JSON written is what their `save()` uploads
(the upsert's variables, the spec as an object). `--save` uploads both, which needs W&B credentials
and the runs synced (`wandb sync`), and prints their URLs.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fae.data.noise import corruption_level_name
from fae.errors import UserError, make_folder
from fae.evaluation.results import QUALITY_COLUMNS, RESULTS_NAME, error_rows, read_rows, write_atomically
from fae.tracking import resolve_wandb_mode, wandb_credentials_found, wandb_run_ids

GRIDS = ("robustness/reconstructions_mask_0.8", "val/reconstructions", "val/samples")


def wandb_logger_settings(run_dir: Path) -> dict:
    """The init_args of the W&B logger in a run's config.yaml (empty when it had none)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    logger = (config.get("trainer") or {}).get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, dict) and "Wandb" in str(entry.get("class_path", "")):
            return entry.get("init_args") or {}
    return {}


class DashboardRun:
    """What the report needs of one trained run: its W&B ids, its results' rows, its settings."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self.folder = path.parent if path.name.startswith("test-") and not (path / "checkpoints").is_dir() else path
        trained = wandb_run_ids(self.folder)
        if not trained:
            raise UserError(
                f"{self.folder} has no W&B run ({self.folder / 'wandb'} holds none): it was trained without the W&B "
                "logger; `fae report` compares it from its files"
            )
        self.training_id = trained[-1]
        tests = [t for t in sorted(self.folder.glob("test-*")) if wandb_run_ids(t) and (t / RESULTS_NAME).is_file()]
        if not tests:
            raise UserError(f"{self.folder} has no tested W&B run: run `fae test --ckpt_path {self.folder}/... ` first")
        self.test_id = wandb_run_ids(tests[-1])[-1]
        self.rows = read_rows(tests[-1])
        self.settings = wandb_logger_settings(self.folder)
        config = (
            yaml.safe_load((self.folder / "config.yaml").read_text()) if (self.folder / "config.yaml").is_file() else {}
        )
        self.variant = (config or {}).get("variant")


def grouping(runs: list[DashboardRun]) -> str:
    """The config key the runs are grouped by: the variant for the runs of an experiment, else the family."""
    return "variant" if all(run.variant for run in runs) else "model"


def panels(runs: list[DashboardRun], group: str):
    """The curve panels of the tested runs and the panels of the trained models, grouped by `group`."""
    import wandb_workspaces.reports.v2 as wr

    rows = [r for run in runs for r in run.rows]
    by = dict(groupby=wr.Config(group), groupby_aggfunc="mean", groupby_rangefunc="stddev")
    curves = []
    for kind in sorted({r.kind for r in error_rows(rows)}):
        x = f"robustness/{kind}/{corruption_level_name(kind)}"
        name = corruption_level_name(kind)
        curves.append(wr.LinePlot(title=f"error against {kind} {name}", x=x, y=[f"robustness/{kind}/error"], **by))
        if any(r.kind == kind and r.metric == "fid" for r in rows):
            title = f"FID of reconstructions against {kind} {name}"
            curves.append(wr.LinePlot(title=title, x=x, y=[f"robustness/{kind}/fid"], **by))
    metric = error_rows(rows)[0].metric if error_rows(rows) else "bce"
    models = [
        wr.BarPlot(title=f"clean test {metric.upper()}", metrics=[f"test/recon_{metric}"], groupby=wr.Config(group)),
        wr.BarPlot(title="posterior Fisher divergence", metrics=["test/posterior_fisher"], groupby=wr.Config(group)),
        wr.MediaBrowser(title="validation reconstructions and samples", media_keys=list(GRIDS[1:])),
    ]
    curves.append(wr.MediaBrowser(title="reconstructions of masked test images", media_keys=[GRIDS[0]]))
    return curves, models, metric


def build_report(runs: list[DashboardRun], entity: str, project: str, title: str):
    """The wandb-workspaces Report comparing `runs` (module docstring)."""
    import wandb_workspaces.reports.v2 as wr

    group = grouping(runs)
    curves, models, metric = panels(runs, group)
    summary = [f"summary:test/recon_{metric}", "summary:test/posterior_fisher"]
    summary += [
        f"summary:robustness/auc_{kind}" for kind in sorted({r.kind for run in runs for r in error_rows(run.rows)})
    ]
    summary += [
        f"summary:quality/{m}/{k}"
        for (k, m) in QUALITY_COLUMNS
        if any(r.kind == k and r.metric == m for run in runs for r in run.rows)
    ]
    ids = lambda attribute: ", ".join(repr(getattr(run, attribute)) for run in runs)  # noqa: E731
    tested = wr.Runset(name="tests", filters=f"Metric('ID') in [{ids('test_id')}]", groupby=[f"config.{group}"])
    trained = wr.Runset(
        name="trained models",
        filters=f"Metric('ID') in [{ids('training_id')}]",
        groupby=[f"config.{group}"],
        pinned_columns=summary,
    )
    where = f"{len(runs)} runs, grouped by {group}"
    return wr.Report(
        project=project,
        entity=entity,
        title=title,
        description=f"fae: the robustness of {where}; bands: the standard deviation across the runs of a group",
        blocks=[
            wr.H2("Robustness: error against the corruption level"),
            wr.PanelGrid(runsets=[tested], panels=curves),
            wr.H2("The trained models"),
            wr.PanelGrid(runsets=[trained], panels=models),
        ],
    )


def build_workspace(runs: list[DashboardRun], entity: str, project: str, title: str):
    """A saved Workspace view of the report's panels, over the same runs (module docstring)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    group = grouping(runs)
    curves, models, _ = panels(runs, group)
    ids = ", ".join(repr(i) for run in runs for i in (run.training_id, run.test_id))
    return ws.Workspace(
        entity=entity,
        project=project,
        name=title,
        sections=[
            ws.Section(name="Robustness", panels=curves, is_open=True),
            ws.Section(name="Trained models", panels=models, is_open=True),
        ],
        runset_settings=ws.RunsetSettings(filters=f"Metric('ID') in [{ids}]", groupby=[expr.Config(group)]),
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
        out: where the report's JSON goes (what `save()` uploads).
        save: upload the report to W&B (needs credentials and the runs synced) and print its URL.
        entity: the W&B entity (default: the runs' config's, else the default entity of the credentials).
        project: the W&B project (default: the runs' config's, `fae`).
        title: the report's title.
    """
    runs = [DashboardRun(Path(p)) for p in run_dirs]
    projects = {project or run.settings.get("project") or "fae" for run in runs}
    if len(projects) > 1:
        raise UserError(f"the runs were logged to several W&B projects ({', '.join(sorted(projects))}): give --project")
    entity = entity or next((run.settings["entity"] for run in runs if run.settings.get("entity")), None)
    online = wandb_credentials_found() and resolve_wandb_mode("auto") == "online"
    if save and not online:
        raise UserError("--save needs W&B credentials and online mode: `wandb login` (and unset WANDB_MODE=offline)")
    if save and entity is None:
        import wandb

        entity = wandb.Api().default_entity
    project = projects.pop()
    report, workspace = (
        build_report(runs, entity or "", project, title),
        build_workspace(runs, entity or "", project, title),
    )
    out = Path(out)
    make_folder(out.parent, "the dashboard's folder", "give --out a file in a folder that can be made")
    write_atomically(out, json.dumps(report_json(report), indent=1))
    write_atomically(out.with_name(f"{out.stem}.workspace.json"), json.dumps(workspace_json(workspace), indent=1))
    if save:
        report.save()
        workspace.save()
        print(f"fae: dashboard saved: the report {report.url}, the workspace {workspace.url} (their specs in {out})")
        return
    print(
        f"fae: dashboard of {len(runs)} runs written to {out}, the report W&B would save; to save it: `wandb sync` "
        "the runs, `wandb login`, then the same command with --save"
    )
