"""What W&B shows, read back from the offline run files: the robustness curves on the level's axis, one
row per trained model with its test's summaries, the names and groups of an experiment's runs, the
artifacts, a resumed run continuing its id, and `fae dashboard`'s report built without a server."""

from __future__ import annotations

import json
import shutil

import pytest

from fae.evaluation.results import area_under_curve, read_rows

from .helpers import QUICKSTART, made_once, run_in_process, step_of, wandb_run_records, wandb_runs

pytestmark = pytest.mark.slow

BUDGET = ["--model.width", "4", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
SWEEP = ["--sweep.sigmas", "[0.1, 0.5]", "--sweep.nus", "[0.2, 0.5]", "--trainer.limit_test_batches", "2",
         "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Three tiny runs with W&B offline, trained and tested in this process once per session
    (helpers.made_once): a plain VAE (its checkpoints left out of W&B), and the Fisher AE and the WAE-GAN as
    the variants of an experiment `quick` (seed 0). Read only."""
    naming = {"vae": ["--trainer.logger.log_model", "false"],
              "fisher": ["--experiment", "quick", "--variant", "fisher"],
              "wae_gan": ["--experiment", "quick", "--variant", "wae"]}  # fmt: skip

    def make(root):
        root.mkdir()
        for family, names in naming.items():
            run = root / family
            assert run_in_process(["fit", *QUICKSTART[family], *BUDGET, *names, "--run_dir", str(run)], root) == 0
            by_hand = family == "fisher"  # a test by hand, without the names: they are its training run's
            test = ["test", *QUICKSTART[family], *SWEEP, *([] if by_hand else names), "--ckpt_path",
                    str(run / "checkpoints" / "last.ckpt")]  # fmt: skip
            assert run_in_process(test, root) == 0

    return made_once(tmp_path_factory, "wandb", make)


def logged_test(run):
    (folder,) = run.glob("test-*")
    return folder, wandb_run_records(folder)


def test_the_curves_are_on_the_levels_axis_and_the_training_runs_row_holds_the_tests_summaries(logged):
    """The issue's acceptance: a quickstart Fisher AE, a few batches, a small sweep."""
    run = logged / "fisher"
    folder, test = logged_test(run)
    for kind, level in (("gaussian", "sigma"), ("mask", "nu")):
        x = f"robustness/{kind}/{level}"
        assert test["metrics"][x] == "" and test["metrics"][f"robustness/{kind}/error"] == x
        assert test["metrics"][f"robustness/{kind}/error_std"] == x
        rows = [r for r in read_rows(folder) if r.kind == kind]
        curve = [(h[x], h[f"robustness/{kind}/error"], h[f"robustness/{kind}/error_std"]) for h in test["history"]
                 if x in h]  # fmt: skip
        assert curve == [(r.level, pytest.approx(r.mean), pytest.approx(r.std)) for r in rows]
        assert test["summary"][f"robustness/auc_{kind}"] == pytest.approx(area_under_curve(rows, kind))
    trained, summarised = wandb_runs(run)  # the training run, and its resumption by the test (`wandb sync` merges)
    assert summarised["run"].run_id == trained["run"].run_id
    for key in ("robustness/auc_gaussian", "robustness/auc_mask", "test/recon_bce", "test/posterior_fisher"):
        assert summarised["summary"][key] == pytest.approx(test["summary"][key]), key
    assert not any(k.startswith("robustness/gaussian/0") for k in test["summary"])  # no one-point charts


def test_an_experiments_runs_are_named_grouped_and_tagged_and_a_plain_run_keeps_its_names(logged):
    trained = wandb_runs(logged / "fisher")[0]
    assert (trained["run"].display_name, trained["run"].run_group, trained["run"].job_type) == (
        "fisher/seed0",
        "quick",
        "train",
    )
    assert list(trained["run"].tags) == ["digits", "fisher"]  # the data set, the family (= the variant: once)
    assert list(wandb_runs(logged / "wae_gan")[0]["run"].tags) == ["digits", "wae_gan", "wae"]
    assert (trained["config"]["experiment"], trained["config"]["variant"], trained["config"]["seed_everything"]) == (
        "quick",
        "fisher",
        0,
    )
    folder, test = logged_test(logged / "fisher")  # tested without --experiment and --variant: its training's
    assert (test["run"].display_name, test["run"].run_group) == (f"fisher/seed0/{folder.name}", "quick")
    assert (test["config"]["experiment"], test["config"]["variant"]) == ("quick", "fisher")
    plain = wandb_runs(logged / "vae")[0]  # the whole resolved config, as flags
    assert (plain["run"].display_name, plain["run"].run_group) == ("vae", "quickstart")
    assert plain["config"]["data.batch_size"] == 64 and plain["config"]["model"] == "fae.models.VAE"
    folder, test = logged_test(logged / "vae")
    assert (test["run"].display_name, test["run"].run_group, test["run"].job_type) == (
        f"vae/{folder.name}",
        "quickstart",
        "test",
    )
    (table,) = folder.glob("wandb/offline-run-*/files/media/table/robustness/table_*.table.json")
    assert json.loads(table.read_text())["columns"][:5] == ["model", "dataset", "checkpoint", "kind", "level"]


def test_checkpoints_and_results_are_artifacts_of_their_runs(logged):
    trained = wandb_runs(logged / "wae_gan")[0]
    models = [files for name, kind, files in trained["artifacts"] if kind == "model"]
    assert models and all(files == ["model.ckpt"] for files in models)  # last and best, as versions
    _, test = logged_test(logged / "wae_gan")
    assert ("robustness", ["robustness.csv", "robustness.json"]) in [(k, sorted(f)) for _, k, f in test["artifacts"]]
    assert not [name for name, kind, _ in wandb_runs(logged / "vae")[0]["artifacts"] if kind == "model"]  # left out


def test_a_resumed_training_continues_its_wandb_run(logged, tmp_path):
    run = shutil.copytree(logged / "vae", tmp_path / "vae", ignore=shutil.ignore_patterns("test-*", ".fae.lock"))
    first = wandb_runs(run)[0]["run"].run_id
    resume = ["fit", *QUICKSTART["vae"], *BUDGET, "--trainer.max_steps", "5",
              "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]  # fmt: skip
    assert run_in_process(resume, tmp_path) == 0 and step_of(run / "checkpoints" / "last.ckpt") == 5
    resumed = wandb_runs(run)[-1]["run"]
    assert (resumed.run_id, resumed.display_name, resumed.run_group) == (first, "vae", "quickstart")


def test_the_dashboard_compares_runs_without_a_server(logged, tmp_path, fae_here, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no credentials anywhere
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    runs = [str(logged / family) for family in ("vae", "fisher", "wae_gan")]
    out = fae_here("dashboard", *runs, "--out", str(tmp_path / "d" / "report.json"), "--entity", "me", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dashboard of 3 runs written to" in out.stdout and "with --save" in out.stdout
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert (report["entityName"], report["projectName"], report["type"]) == ("me", "fae", "runs")
    grids = [b["metadata"] for b in report["spec"]["blocks"] if b["type"] == "panel-grid"]
    panels = [p for grid in grids for p in grid["panelBankSectionConfig"]["panels"]]
    lines = {p["config"]["xAxis"]: p["config"] for p in panels if p["viewType"] == "Run History Line Plot"}
    assert lines["robustness/gaussian/sigma"]["metrics"] == ["robustness/gaussian/error"]
    assert lines["robustness/mask/nu"]["metrics"] == ["robustness/mask/error"]
    assert lines["robustness/mask/nu"]["groupBy"] == "model.value"  # families (not all runs are variants)
    assert lines["robustness/mask/nu"]["groupArea"] == "stddev"
    bars = [p["config"]["metrics"] for p in panels if p["viewType"] == "Bar Chart"]
    assert ["test/recon_bce"] in bars
    tests, models = (grid["runSets"][0]["filters"]["filters"][0]["value"] for grid in grids)
    assert models == [wandb_runs(logged / f)[0]["run"].run_id for f in ("vae", "fisher", "wae_gan")]
    assert tests == [logged_test(logged / f)[1]["run"].run_id for f in ("vae", "fisher", "wae_gan")]
    workspace = json.loads((tmp_path / "d" / "report.workspace.json").read_text())  # a saved view, the same panels
    assert (workspace["entityName"], workspace["type"]) == ("me", "project-view")
    sections = workspace["spec"]["section"]["panelBankConfig"]["sections"]
    axes = [p["config"].get("xAxis") for section in sections for p in section["panels"]]
    assert {"robustness/gaussian/sigma", "robustness/mask/nu"} <= set(axes)
    assert json.dumps(tests) in json.dumps(workspace["spec"]["section"]["runSets"][0]["filters"])  # the tests only
    variants = fae_here("dashboard", *runs[1:], "--out", str(tmp_path / "v.json"), "--entity", "me", cwd=tmp_path)
    assert variants.returncode == 0, variants.stderr[-2000:]  # an experiment's runs: grouped by their variant
    lines = [p["config"] for b in json.loads((tmp_path / "v.json").read_text())["spec"]["blocks"]
             if b["type"] == "panel-grid" for p in b["metadata"]["panelBankSectionConfig"]["panels"]
             if p["viewType"] == "Run History Line Plot"]  # fmt: skip
    assert {line["groupBy"] for line in lines} == {"variant.value"}
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
    bare = fae_here("dashboard", str(tmp_path / "bare"), cwd=tmp_path)
    assert bare.returncode == 2 and "has no W&B run" in bare.stderr.strip().splitlines()[-1]
    refused = fae_here("dashboard", *runs, "--save", cwd=tmp_path)  # a switch, as the line printed above says
    assert refused.returncode == 2 and "--save needs W&B credentials" in refused.stderr.strip().splitlines()[-1]
