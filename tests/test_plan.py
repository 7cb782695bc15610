"""fae.plan: every rule of where a run goes, as a table. Each case lays out folders and checkpoints (files
with the fields the planner reads), asks for a plan, and checks the plan or the refusal's line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fae.checkpoint import forget_checkpoints
from fae.errors import UserError
from fae.plan import Request, folder_to_lock, plan

from .helpers import fake_checkpoint

NOW = "20260101-000000"
FIT = Request(subcommand="fit", config_name="quick", now=NOW, model_class_path="fae.models.VAE")
TEST = replace(FIT, subcommand="test")


def layout(root: Path, spec: str) -> None:
    """Files under root: `a/checkpoints/last.ckpt@30` is a checkpoint at step 30 (`!w`: weights only,
    `#E`: E epochs done, `>best.ckpt`: recording that best path, `:Fisher`: a FisherAE's), other paths
    are empty files."""
    for entry in spec.split():
        path, _, facts = entry.partition("@")
        if not facts:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text("epoch,step\n" if path.endswith(".csv") else "")
            continue
        step, best, family, epochs = facts, None, "fae.models.VAE", 0
        if ":" in step:
            step, family = step.split(":")[0], "fae.models.FisherAE"
        if ">" in step:
            step, best = step.split(">")
            best = str(root / best)
        if "#" in step:
            step, epochs = step.split("#")
        weights_only = step.endswith("!w")
        fake_checkpoint(root / path, int(step.rstrip("!w")), family, not weights_only, best, int(epochs))


# fmt: off
REFUSALS = [  # (files, request, the start of the line)
    ("", replace(FIT, run_dir=""), "--run_dir is empty: give a folder"),
    ("", replace(FIT, several_processes=True), "with several nodes, or under torchrun or srun, every process"),
    ("", replace(FIT, ckpt_path="last"), "--ckpt_path last needs --run_dir RUN"),
    ("", replace(TEST, ckpt_path="best"), "--ckpt_path best needs --run_dir RUN"),
    ("a/metrics.csv", replace(TEST, ckpt_path="last", run_dir="a"), "--ckpt_path last: a/checkpoints/last.ckpt does"),
    ("a/checkpoints/last.ckpt@5", replace(TEST, ckpt_path="best", run_dir="a"), "a/checkpoints/last.ckpt records no"),
    ("a/checkpoints/best.ckpt@5", replace(FIT, ckpt_path="last", run_dir="a"), "a has checkpoints but no last.ckpt"),
    ("w.ckpt@5!w", replace(FIT, ckpt_path="w.ckpt"), "w.ckpt holds weights only (no optimizer or loop state)"),
    ("c.ckpt@10", replace(FIT, ckpt_path="c.ckpt", max_steps=10), "c.ckpt is at step 10, not below trainer.max_steps"),
    ("c.ckpt@3#2", replace(FIT, ckpt_path="c.ckpt", max_epochs=2), "c.ckpt has 2 epochs done, not below trainer.max_"),
    ("a/metrics.csv", replace(FIT, run_dir="a"), "a holds the metrics of a run that saved no checkpoint: start it"),
    ("a/checkpoints/last.ckpt@5", replace(FIT, run_dir="a"), "a already holds a run: resume it with --ckpt_path a/"),
    ("a/checkpoints/last.ckpt@5 b/checkpoints/last.ckpt@9", replace(FIT, run_dir="a",
     ckpt_path="b/checkpoints/last.ckpt"), "a already holds a run, and b/checkpoints/last.ckpt is not one of its"),
    ("a/checkpoints/last.ckpt@10 a/checkpoints/best.ckpt@5", replace(FIT, run_dir="a",
     ckpt_path="a/checkpoints/best.ckpt"), "a/checkpoints/last.ckpt holds step 10, newer than best.ckpt (step 5)"),
    ("d/x.ckpt", replace(FIT, checkpoint_dirpath="d"), "checkpoint.dirpath d already holds another run's checkpoints"),
    ("", TEST, "`fae test` needs a trained model: give --ckpt_path RUN/checkpoints/last.ckpt"),
    ("", replace(TEST, subcommand="validate"), "`fae validate` needs a trained model"),
    ("a/checkpoints/last.ckpt@5 b/metrics.csv", replace(TEST, run_dir="b", ckpt_path="a/checkpoints/last.ckpt"),
     "a/checkpoints/last.ckpt is a checkpoint of the run"),
    ("f.ckpt@5:Fisher", replace(TEST, ckpt_path="f.ckpt"), "f.ckpt holds a FisherAE, the config a VAE: use the config"),
    ("f.ckpt@5:Fisher", replace(FIT, ckpt_path="f.ckpt"), "f.ckpt holds a FisherAE, the config a VAE"),
    ("", replace(TEST, ckpt_path="missing.ckpt"), "checkpoint not found: missing.ckpt"),
    ("broken.ckpt", replace(TEST, ckpt_path="broken.ckpt"), "checkpoint broken.ckpt cannot be read, it is truncated"),
]
# fmt: on


@pytest.mark.parametrize("files, request_, refusal", REFUSALS)
def test_each_refusal_is_one_line(tmp_path, monkeypatch, files, request_, refusal):
    monkeypatch.chdir(tmp_path)
    layout(tmp_path, files)
    forget_checkpoints()
    with pytest.raises(UserError) as error:
        plan(request_)
    assert str(error.value).startswith(refusal), str(error.value)
    assert "\n" not in str(error.value)


# fmt: off
PLANS = [  # (files, request, the plan's run folder, checkpoint, new, restart, what it evaluates)
    ("", FIT, f"runs/quick-{NOW}", None, True, False, None),
    ("", replace(FIT, run_name="mine", runs_dir="out"), f"out/mine-{NOW}", None, True, False, None),
    ("", replace(FIT, run_dir="a"), "a", None, False, False, None),  # an exact folder, made as it is named
    ("a/checkpoints/last.ckpt@5", replace(FIT, ckpt_path="a/checkpoints/last.ckpt"), "a", "a/checkpoints/last.ckpt",
     False, False, None),
    ("a/hpc_ckpt_1.ckpt@7", replace(FIT, ckpt_path="a/hpc_ckpt_1.ckpt"), "a", "a/hpc_ckpt_1.ckpt", False, False, None),
    ("c.ckpt@5", replace(FIT, ckpt_path="c.ckpt"), f"runs/quick-{NOW}", "c.ckpt", True, False, None),  # a new run
    ("a/checkpoints/last.ckpt@10 a/checkpoints/best.ckpt@5", replace(FIT, ckpt_path="a/checkpoints/best.ckpt"),
     f"runs/quick-{NOW}", "a/checkpoints/best.ckpt", True, False, None),  # a best-*.ckpt goes on in a new folder
    ("", replace(FIT, run_dir="a", ckpt_path="last"), "a", None, False, True, None),  # (re)start a requeued job
    ("a/metrics.csv", replace(FIT, run_dir="a", ckpt_path="last"), "a", None, False, True, None),
    ("a/checkpoints/last.ckpt@5 a/hpc_ckpt_2.ckpt@9", replace(FIT, run_dir="a", ckpt_path="last"), "a",
     "a/hpc_ckpt_2.ckpt", False, False, None),  # the newest state: a SLURM requeue's, written after last.ckpt
    ("a/checkpoints/last.ckpt@5", replace(TEST, ckpt_path="a/checkpoints/last.ckpt"), f"a/test-{NOW}",
     "a/checkpoints/last.ckpt", True, False, "a"),
    ("a/checkpoints/last.ckpt@5>a/checkpoints/b.ckpt a/checkpoints/b.ckpt@3",
     replace(TEST, ckpt_path="best", run_dir="a"), f"a/test-{NOW}", "a/checkpoints/b.ckpt", True, False, "a"),
    ("x.ckpt@5", replace(TEST, subcommand="predict", ckpt_path="x.ckpt"), f"runs/quick-predict-{NOW}", "x.ckpt",
     True, False, None),
    ("", replace(TEST, allow_untrained=True), f"runs/quick-test-{NOW}", None, True, False, None),
    ("", replace(TEST, allow_untrained=True, run_dir="e"), f"e/test-{NOW}", None, True, False, "e"),
    ("a/checkpoints/last.ckpt@5", replace(FIT, rank_zero=False, run_dir="a", ckpt_path="last"), "a",
     "a/checkpoints/last.ckpt", False, False, None),  # a worker follows rank zero's folder
]
# fmt: on


@pytest.mark.parametrize("files, request_, run_dir, ckpt, new, restart, evaluates", PLANS)
def test_each_plan(tmp_path, monkeypatch, files, request_, run_dir, ckpt, new, restart, evaluates):
    monkeypatch.chdir(tmp_path)
    layout(tmp_path, files)
    forget_checkpoints()
    result = plan(request_)
    resolved = lambda path: Path(path).resolve() if path else None  # noqa: E731
    assert (resolved(result.run_dir), resolved(result.ckpt), result.new, result.restart) == (
        resolved(run_dir),
        resolved(ckpt),
        new,
        restart,
    )
    assert resolved(result.evaluates) == resolved(evaluates)


def test_a_resume_keeps_the_first_config_and_an_evaluation_points_at_the_checkpoints_it_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout(tmp_path, "a/config.yaml a/metrics.csv a/checkpoints/last.ckpt@5")
    resumed = plan(replace(FIT, ckpt_path="a/checkpoints/last.ckpt"))
    assert resumed.config_name == f"config-resumed-{NOW}.yaml" and resumed.checkpoint_dirpath is None
    assert plan(FIT).config_name == "config.yaml"
    assert plan(replace(TEST, ckpt_path="a/checkpoints/last.ckpt")).checkpoint_dirpath == Path("a/checkpoints")
    layout(tmp_path, f"runs/quick-{NOW}/config.yaml")  # a fresh folder's name another command took: made -2
    assert plan(FIT).new and plan(FIT).config_name == "config.yaml"
    worker = plan(replace(TEST, rank_zero=False, run_dir="a", ckpt_path="a/checkpoints/last.ckpt"))
    assert worker.checkpoint_dirpath == Path("a/checkpoints")  # as rank zero's: beside the evaluated checkpoint
    restarted = plan(replace(FIT, run_dir="b", ckpt_path="last"))
    assert restarted.note is None  # nothing to set aside
    layout(tmp_path, "b/metrics.csv")
    assert "b holds no checkpoint: starting its run again" in plan(replace(FIT, run_dir="b", ckpt_path="last")).note


def test_a_training_run_holds_its_folder_before_it_is_planned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout(tmp_path, "a/checkpoints/last.ckpt@5 a/checkpoints/best.ckpt@3")
    assert folder_to_lock(replace(FIT, run_dir="a")) == Path("a")
    assert folder_to_lock(replace(FIT, ckpt_path="a/checkpoints/last.ckpt")) == Path("a").resolve()
    assert folder_to_lock(replace(FIT, ckpt_path="a/checkpoints/best.ckpt")) is None  # resumed in a new folder
    assert folder_to_lock(replace(FIT, run_dir="new")) is None  # nothing there to hold yet
    assert folder_to_lock(replace(TEST, run_dir="a")) is None  # an evaluation holds its own new folder
    assert folder_to_lock(replace(FIT, run_dir="a", rank_zero=False)) is None


def test_a_checkpoint_is_read_once_per_command(tmp_path, monkeypatch):
    """The planner's reads and the loader's share one torch.load per file version."""
    import torch

    from fae.checkpoint import read_checkpoint

    monkeypatch.chdir(tmp_path)
    layout(tmp_path, "a/checkpoints/last.ckpt@5 a/hpc_ckpt_1.ckpt@4")
    forget_checkpoints()
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    request = replace(FIT, run_dir="a", ckpt_path="last")
    chosen = plan(request).ckpt
    plan(request)  # planned again: nothing read again
    forget_checkpoints(keep=chosen)
    read_checkpoint(chosen)  # Lightning's restore takes the planner's copy
    assert sorted(Path(p).name for p in loads) == ["hpc_ckpt_1.ckpt", "last.ckpt"]


def test_a_resume_names_the_settings_that_change_the_data_stream():
    from fae.cli.lightning import stream_changes

    data = {"class_path": "fae.data.MNISTDataModule",
            "init_args": {"batch_size": 64, "num_workers": 0, "data_dir": "/a", "split_seed": 0}}  # fmt: skip
    recorded = {"seed_everything": 0, "trainer": {"accumulate_grad_batches": 1, "devices": 1, "max_steps": 40},
                "data": data}  # fmt: skip
    same = {**recorded, "trainer": {**recorded["trainer"], "max_steps": 80}}  # a longer budget: the same stream
    moved = {"data": {**recorded["data"], "init_args": {**recorded["data"]["init_args"], "num_workers": 4,
                                                          "data_dir": "/b"}}}  # fmt: skip
    assert stream_changes(recorded, same) == [] and stream_changes(recorded, {**recorded, **moved}) == []
    changed = {
        "seed_everything": 7,
        "trainer": {"accumulate_grad_batches": 2, "devices": 2},
        "data": {"class_path": "fae.data.DigitsDataModule", "init_args": {"batch_size": 32, "split_seed": 0}},
    }
    assert stream_changes(recorded, changed) == [
        "seed_everything 0 -> 7", "trainer.accumulate_grad_batches 1 -> 2", "trainer.devices 1 -> 2",
        "data fae.data.MNISTDataModule -> fae.data.DigitsDataModule", "data.batch_size 64 -> 32",
    ]  # fmt: skip
    assert stream_changes({}, changed) == []  # a run without config.yaml: nothing to compare with
