"""`fae experiment`: the experiment file and its grid, one run's job (resume, retry, stop, requeue), the
local executor stopped by SIGTERM and restarted, and the SLURM job array against fake SLURM commands."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fae.errors import UserError
from fae.experiment.spec import Run, extra_sbatch, minutes, read_experiment, seed_major
from fae.experiment.state import RunState, holder, read_status, run_state, take_lock, write_status
from fae.experiment.task import Interrupted, RunFailed, RunTask

from .helpers import CONFIGS, ROOT, fake_slurm, last_value, rows_of, slurm_calls, slurm_task_env, step_of

VAE_CONFIG = str(CONFIGS / "quickstart" / "digits_vae.yaml")
WAE_CONFIG = str(CONFIGS / "quickstart" / "digits_wae_gan.yaml")
TINY_FLAGS = {"--model.width": 4, "--trainer.logger": False, "--trainer.limit_val_batches": 2,
              "--sweep.sigmas": [0.5], "--sweep.nus": [0.8]}  # fmt: skip


def write_spec(folder: Path, **changes) -> Path:
    spec = {
        "budget": {"batches": 6, "val_every": 2},
        "seeds": [0, 1],
        "flags": TINY_FLAGS,
        "table": {"val_at": [2, 6], "levels": {"mask": [0.8]}},
        "variants": {"vae": {"config": VAE_CONFIG}, "wae": {"config": WAE_CONFIG, "seeds": [0]}},
        **changes,
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def experiment_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # tests.callbacks
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", **extra}
    env.pop("FAE_RUN_DIR", None)
    return env


def fae_experiment(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fae.cli", "experiment", *args], cwd=cwd, env=env or experiment_env(),
                          capture_output=True, text=True, timeout=400)  # fmt: skip


# --- the experiment file -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"budget": None}, "`budget:` is missing"),
        ({"budget": {"batches": 0, "val_every": 2}}, "budget.batches must be a positive number"),
        ({"variants": {}}, "variants is empty"),
        ({"variants": {"a b": {"config": VAE_CONFIG}}}, "variant name 'a b' must be"),
        ({"variants": {"vae": {"flags": {}}}}, "variant vae needs a config"),
        ({"variants": {"vae": {"config": "configs/none.yaml"}}}, "variant vae's config configs/none.yaml does not"),
        ({"slurm": {"gpus": 1}}, "slurm.gpus is not a setting"),
        ({"slurm": {"time": "four hours"}}, "time 'four hours' is not a SLURM time limit"),
        ({"seeds": 3}, "seeds must be a list of numbers"),
        ({"flags": ["--model.width", 4]}, "flags must be a mapping"),
        ({"slurm": 5}, "slurm must be a mapping"),
        ({"table": {"val_at": 6, "levels": {}}}, "table.val_at must be a list of numbers"),
        ({"table": {"levels": [0.5]}}, "table.levels must be a mapping"),
        ({"variants": {"vae": {"config": VAE_CONFIG, "seeds": "0"}}}, "variants.vae.seeds must be a list"),
        ({"variants": {"vae": {"config": 3}}}, "variant vae needs a config"),
        ({"flags": {"model.width": 4}}, "flags: 'model.width' is not a flag of fae fit: write it as on the command"),
        ({"variants": {"vae": {"config": VAE_CONFIG, "flags": {"x": 1}}}}, "variants.vae.flags: 'x' is not a flag"),
    ],
)
def test_a_bad_experiment_file_is_refused_in_one_line(tmp_path, changes, message):
    path = write_spec(tmp_path, **{k: v for k, v in changes.items() if v is not None})
    if changes.get("budget", 1) is None:
        spec = yaml.safe_load(path.read_text())
        del spec["budget"]
        path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as err:
        read_experiment(path).grid(tmp_path / "out")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "given, expected",
    [(240, 240), ("90", 90), ("30:30", 31), ("4:00:00", 240), ("1-00", 1440), ("1-2:30", 1590), ("0-00:00:59", 1)],
)
def test_slurm_time_limits_read_as_minutes(given, expected):
    assert minutes(given) == expected


def test_extra_sbatch_lines_become_submitit_parameters():
    assert extra_sbatch(("--constraint=a100", "#SBATCH --exclusive", "--mail-type END")) == {
        "constraint": "a100", "exclusive": True, "mail-type": "END"
    }  # fmt: skip
    with pytest.raises(UserError, match="is not an sbatch option"):
        extra_sbatch(("constraint=a100",))


def test_the_grid_names_every_variant_and_seed_with_its_flags(tmp_path):
    variants = {
        "vae": {"config": VAE_CONFIG, "flags": {"--model.beta": 2.0}},
        "wae": {"config": WAE_CONFIG, "seeds": [3]},
    }
    exp = read_experiment(write_spec(tmp_path, variants=variants))
    runs = exp.grid(tmp_path / "out", data_dir=tmp_path / "data")
    assert [r.key for r in runs] == ["vae/seed0", "vae/seed1", "wae/seed3"]
    flags = list(runs[1].flags)
    assert flags[flags.index("--model.width") + 1] == "4" and flags[flags.index("--model.beta") + 1] == "2.0"
    assert flags[flags.index("--data.data_dir") + 1] == str(tmp_path / "data")
    assert flags[-6:] == ["--seed_everything", "1", "--experiment", "grid", "--variant", "vae"]
    assert (
        runs[2].run_dir == tmp_path / "out" / "wae" / "seed3" and runs[2].log == tmp_path / "out" / "wae" / "seed3.log"
    )
    # a start takes every variant's first seed (here wae's only one) before any variant's second
    assert [r.key for r in seed_major(runs)] == ["vae/seed0", "wae/seed3", "vae/seed1"]


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "experiments").glob("*.yaml")))
def test_the_shipped_experiment_files_read_and_name_existing_configs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # configs are found beside the experiments/ folder too
    exp = read_experiment(ROOT / "experiments" / f"{name}.yaml")
    runs = exp.grid(tmp_path / "out")
    assert runs and all(run.config.is_file() for run in runs) and exp.batches > 0
    if name == "mnist_reproduce_paper":  # made for a cluster: every run on one GPU, within a time limit
        parameters = exp.slurm.sbatch_parameters("fae-x")
        assert parameters["gpus_per_node"] == 1 and parameters["time"] == 240 and len(runs) == 12


def test_a_run_folder_of_other_settings_is_refused_not_relabelled(tmp_path):
    from fae.experiment.launch import check_settings
    from fae.experiment.state import settings_of, write_status

    exp = read_experiment(write_spec(tmp_path))
    runs = exp.grid(tmp_path / "out", data_dir=tmp_path / "data")
    write_status(runs[0], settings=settings_of(runs[0], 6, 2))
    check_settings(runs, exp)  # the same settings (the data's folder is not one of them)
    moved = read_experiment(write_spec(tmp_path)).grid(tmp_path / "out", data_dir=tmp_path / "elsewhere")
    check_settings(moved, exp)
    write_status(runs[1], settings=settings_of(runs[1], 3000, 2))
    with pytest.raises(UserError, match=r"seed1 holds a run of other settings \(batches 3000 there, 6 here\)"):
        check_settings(runs, exp)


# --- one run's job, with a stand-in for `fae` -------------------------------------------------------

FAKE_FAE = """import json, os, signal, sys, time
calls = os.environ["FAKE_FAE_CALLS"]
with open(calls, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
with open(calls + ".started", "a") as f:  # its process group, and whether SLURM's warning signal is ignored here
    f.write(json.dumps([os.getpgid(0), signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN]) + "\\n")
codes = json.loads(os.environ["FAKE_FAE_CODES"])
code = codes[min(len(open(calls).read().splitlines()), len(codes)) - 1]
if code == "sleep":  # a long fit: SIGTERM stops it as `fae fit` stops (status 143), saying so
    def stop(signum, frame):
        open(calls + ".stopped", "w").write("SIGTERM")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(30)
if code == 2:
    print("fae: error: model.width: must be > 0, got 0")
sys.exit(code if code != "sleep" else 0)
"""


def fake_task(tmp_path: Path, monkeypatch, codes: list) -> tuple[RunTask, Path]:
    script = tmp_path / "fake_fae.py"
    script.write_text(FAKE_FAE)
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_FAE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_FAE_CODES", json.dumps(codes))
    run = Run("vae", 0, Path(VAE_CONFIG), ("--model.width", "4"), tmp_path / "out" / "vae" / "seed0")
    return RunTask(run, batches=6, val_every=2, cwd=str(tmp_path), program=(sys.executable, str(script))), calls


def commands(calls: Path) -> list[str]:
    return [json.loads(line)[0] for line in calls.read_text().splitlines()] if calls.is_file() else []


def test_a_run_fits_then_tests_and_a_crash_is_retried_once_saying_so(tmp_path, monkeypatch, capsys):
    task, calls = fake_task(tmp_path, monkeypatch, [1, 0, 0])
    assert task() == "vae/seed0: fit 0.0 min, test 0.0 min"
    assert commands(calls) == ["fit", "fit", "test"]
    fit = json.loads(calls.read_text().splitlines()[1])
    assert fit[fit.index("--ckpt_path") + 1] == "last" and fit[fit.index("--trainer.max_steps") + 1] == "6"
    assert "`fae fit` crashed (exit 1" in capsys.readouterr().out and "retrying it once" in task.run.log.read_text()
    assert read_status(task.run)["state"] == "done" and read_status(task.run)["fit_seconds"] > 0


@pytest.mark.parametrize(
    "codes, error, state, line",
    [
        ([1, 1], RunFailed, "failed", "`fae fit` failed (exit 1)"),
        ([2], RunFailed, "failed", "`fae fit` failed (exit 2): fae: error: model.width: must be > 0, got 0"),
        ([143], Interrupted, "interrupted", "`fae fit` stopped by SIGTERM"),
        ([0, 130], Interrupted, "interrupted", "`fae test` stopped by SIGINT"),
    ],
)
def test_a_failed_or_stopped_run_says_so_in_its_status(tmp_path, monkeypatch, codes, error, state, line):
    task, calls = fake_task(tmp_path, monkeypatch, codes)
    with pytest.raises(error):
        task()
    assert len(commands(calls)) == len(codes)  # a mistake (exit 2) or a stop is not retried
    status = read_status(task.run)
    assert status["state"] == state and status["line"].startswith(line)
    assert run_state(task.run).state == state and holder(task.run) is None  # the lock went with the job


def test_a_run_another_process_holds_is_left_to_it(tmp_path, monkeypatch):
    task, calls = fake_task(tmp_path, monkeypatch, [0])
    held = take_lock(task.run)  # as another `fae experiment` process's job would
    try:
        assert holder(task.run).startswith(f"pid {os.getpid()} on ")
        assert run_state(task.run).state == "running"
        assert task() == "vae/seed0: another process runs it; left to that process"
        assert commands(calls) == []
    finally:
        os.close(held)
    assert holder(task.run) is None and run_state(task.run).state == "missing"


def test_the_warning_signal_stops_the_command_and_hands_submitit_the_same_job(tmp_path, monkeypatch):
    task, calls = fake_task(tmp_path, monkeypatch, ["sleep"])
    task.run.run_dir.parent.mkdir(parents=True)
    task._lock = take_lock(task.run)
    task._stopped_by, task._child = None, subprocess.Popen([*task.program, "fit"])
    try:
        time.sleep(0.5)
        start = time.monotonic()
        delayed = task.checkpoint()  # what submitit calls on USR2
        assert time.monotonic() - start < 10 and task._child.wait(timeout=1) == 143  # stopped as fae stops
    finally:
        os.close(task._lock)
    again = pickle.loads(pickle.dumps(delayed.function))  # requeued as submitit dumps it
    assert isinstance(again, RunTask) and again.run == task.run and again.batches == 6
    assert read_status(task.run)["state"] == "interrupted" and "requeues it" in read_status(task.run)["line"]


# --- the local executor, end to end ------------------------------------------------------------------


@pytest.mark.multiprocess  # a grid of two jobs side by side
def test_a_local_grid_stopped_by_sigterm_resumes_on_the_next_start(tmp_path, monkeypatch, capsys):
    """A SIGTERM to `fae experiment` once a run has a checkpoint stops every run with its state saved;
    the next start resumes them, each to the budget, and writes the table of every variant."""
    from fae.experiment.launch import experiment

    # a SIGTERM to `fae experiment` at step 3 of a run: fae fit -> its job -> submitit's controller -> fae experiment
    stop = {"--trainer.callbacks+": "tests.callbacks.SignalAncestorAt", "--trainer.callbacks.step": 3,
            "--trainer.callbacks.generations": 3, "--trainer.callbacks.once": str(tmp_path / "signalled")}  # fmt: skip
    variants = {"vae": {"config": VAE_CONFIG, "flags": stop, "seeds": [0]}, "wae": {"config": WAE_CONFIG, "seeds": [0]}}
    spec = write_spec(tmp_path, variants=variants)
    out = tmp_path / "exp"
    first = fae_experiment(str(spec), "--out", str(out), "--jobs", "1", cwd=tmp_path)  # wae waits its turn
    assert first.returncode == 128 + signal.SIGTERM, first.stdout + first.stderr
    assert "stopped by SIGTERM: 1 runs stopped with their state saved, 1 not started" in first.stderr
    assert "the same command resumes them" in first.stderr and not (out / "wae" / "seed0").exists()
    vae = Run("vae", 0, Path(), (), out / "vae" / "seed0")
    assert 3 <= step_of(vae.run_dir / "checkpoints" / "last.ckpt") < 6
    assert not list(out.glob("*/seed0/test-*/robustness.json"))
    assert read_status(vae)["state"] == "interrupted" and holder(vae) is None  # no lock outlives its run

    monkeypatch.chdir(tmp_path)
    for key, value in experiment_env().items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    experiment(spec, out=out, jobs=2, publish=tmp_path / "docs")  # the same command, again
    shown = capsys.readouterr().out
    assert "vae/seed0: interrupted (last.ckpt at step" in shown and "resuming it" in shown, shown
    for run in (out / "vae" / "seed0", out / "wae" / "seed0"):
        assert step_of(run / "checkpoints" / "last.ckpt") == 6  # the same budget for both families
        assert len(list(run.glob("test-*/robustness.json"))) == 1
    log = (out / "vae" / "seed0.log").read_text()
    assert log.count("$ fae fit") == 2 and "--ckpt_path last" in log and "--experiment grid --variant vae" in log
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert set(rows) == {"vae", "wae"} and rows["vae"]["seed_count"] == "1"
    clean = last_value(rows_of(next((out / "vae" / "seed0").glob("test-*/metrics.csv"))), "test/recon_bce")
    assert float(rows["vae"]["test recon_bce mean"]) == pytest.approx(clean)
    assert "| vae | 1 |" in (out / "report" / "robustness.md").read_text()  # grouped per variant
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == [  # one level per kind: no AUC, no trade-off
        "reconstructions_clean.png", "reconstructions_mask_0.8.png", "robustness.md", "robustness_gaussian.png",
        "robustness_mask.png", "table.csv", "table.md",
    ]  # fmt: skip

    experiment(spec, out=out, status=True)
    assert "experiment: 2 done" in capsys.readouterr().out
    experiment(spec, out=out)  # finished runs are reused
    assert capsys.readouterr().out.count("done earlier, reused") == 2


def fake_finished_run(run: Run, clean: float) -> None:
    """The files a finished run leaves that the table reads: metrics.csv, a test's rows and metrics."""
    test = run.run_dir / "test-1"
    test.mkdir(parents=True)
    (run.run_dir / "metrics.csv").write_text(f"step,val/recon_bce\n1,{clean + 0.1}\n3,{clean + 0.05}\n")
    (test / "metrics.csv").write_text(f"step,test/recon_bce,test/recon_mse\n3,{clean},{clean / 4}\n")
    rows = [{"model": "VAE", "kind": kind, "level": level, "metric": "bce", "mean": clean + level, "std": 0.1, "n": 9}
            for kind, level in (("clean", 0.0), ("mask", 0.8))]  # fmt: skip
    (test / "robustness.json").write_text(json.dumps(rows))


def test_the_table_pools_the_seeds_of_each_variant_and_leaves_unfinished_runs_out(tmp_path):
    from fae.experiment.table import write_table

    exp = read_experiment(write_spec(tmp_path, table={"val_at": [1, 3], "levels": {"mask": [0.8]}}))
    runs = exp.grid(tmp_path / "out")
    for run, clean in zip(runs[:2], (0.2, 0.3), strict=True):  # vae seeds 0 and 1; wae unfinished
        fake_finished_run(run, clean)
    table = write_table(runs, exp, tmp_path / "out").read_text()
    assert "| vae | 2 | 0.3500 ± 0.0707 | 0.3000 ± 0.0707 | 0.2500 ± 0.0707 |" in table and "| wae" not in table
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    assert len(rows) == 1 and float(rows[0]["mask 0.8 mean"]) == pytest.approx(1.05)
    assert float(rows[0]["test recon_mse std"]) == pytest.approx(0.025 / 2**0.5)


def test_status_with_publish_reports_and_publishes_the_runs_done_and_starts_nothing(tmp_path, monkeypatch, capsys):
    """A grid half done (a cluster's array still running, a long grid on a workstation): `--status --publish`
    writes the table and the report of the runs done, copies them and says how many runs they hold."""
    from fae.experiment.launch import experiment

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, table={"val_at": [1, 3], "levels": {"mask": [0.8]}})
    runs = read_experiment(spec).grid(tmp_path / "out")
    for run, clean in zip(runs[:2], (0.2, 0.3), strict=True):  # vae seeds 0 and 1; wae not started
        fake_finished_run(run, clean)
    write_status(runs[0], state="done", fit_seconds=600.0, test_seconds=120.0)
    experiment(spec, out=tmp_path / "out", status=True, publish=tmp_path / "docs")
    shown = capsys.readouterr().out
    assert "experiment: 2 done, 1 missing" in shown, shown
    assert "experiment: about 0.2 h of run time left at the pace of the runs done" in shown  # wae: 720 s
    assert f"copied the tables and figures of 2 of the 3 runs (the others not done) to {tmp_path / 'docs'}" in shown
    assert "| vae | 2 |" in (tmp_path / "docs" / "robustness.md").read_text()  # the report, grouped per variant
    table = (tmp_path / "docs" / "table.md").read_text()
    assert "| vae | 2 |" in table and "Interim: 2 of the 3 runs are done; the others are not in this table." in table
    assert not (runs[2].run_dir).exists()  # nothing was started


def test_status_estimates_the_run_time_left_at_the_pace_of_the_runs_done(tmp_path):
    """Each unfinished run takes its variant's mean fit and test time (the mean of every finished run for a
    variant with none done); a started run's fit only the part past its last.ckpt; a failed run nothing."""
    from fae.experiment import state as states

    runs = read_experiment(write_spec(tmp_path, seeds=[0, 1, 2])).grid(tmp_path / "out")  # vae x 3, wae x 1
    write_status(runs[0], state="done", fit_seconds=600.0, test_seconds=120.0)
    grid = [RunState(runs[0], "done"), RunState(runs[1], "interrupted", step=3), RunState(runs[2], "failed"),
            RunState(runs[3], "missing")]  # fmt: skip
    # vae seed 1: half its fit (step 3 of 6) and its test; wae: the only finished run's pace, whole
    assert states.time_left(grid, batches=6) == pytest.approx(300 + 120 + 600 + 120)
    assert states.time_left([RunState(run, "missing") for run in runs], batches=6) is None  # no pace known yet


# --- SLURM, against fake SLURM commands ---------------------------------------------------------------


@pytest.mark.slow
def test_a_slurm_grid_is_one_job_array_whose_tasks_resume_after_a_requeue(tmp_path, monkeypatch, capsys):
    from fae.experiment.launch import experiment

    env = fake_slurm(tmp_path / "slurm")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_SLURM", env["FAKE_SLURM"])
    monkeypatch.chdir(tmp_path)
    block = {"partition": "gpu", "time": "0-00:30:00", "gpus_per_task": 2, "cpus_per_task": 4, "mem_gb": 8,
             "array_parallelism": 2, "setup": ["module load cuda"], "extra": ["--constraint=a100"]}  # fmt: skip
    spec = write_spec(tmp_path, slurm=block)
    out = tmp_path / "exp"
    experiment(spec, executor="slurm", out=out, qos="high")  # a flag over the block
    assert len(slurm_calls(tmp_path / "slurm", "sbatch")) == 1  # one job array for the grid
    script = (tmp_path / "slurm" / "sbatch-4242.sh").read_text()
    for line in ("--array=0-2%2", "--signal=USR2@120", "--time=30", "--gpus-per-node=2", "--cpus-per-task=4",
                 "--partition=gpu", "--qos=high", "--mem=8GB", "--constraint=a100", "--ntasks-per-node=1",
                 "--job-name=fae-grid"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, script
    assert "\nmodule load cuda\n" in script and "-m submitit.core._submit" in script.splitlines()[-1]
    assert json.loads((out / "jobs.json").read_text()) == {
        "vae/seed0": "4242_0",
        "vae/seed1": "4242_1",
        "wae/seed0": "4242_2",
    }
    tasks = [pickle.load(open(out / ".submitit" / f"4242_{i}_submitted.pkl", "rb")).function for i in range(3)]
    assert [t.run.key for t in tasks] == ["vae/seed0", "vae/seed1", "wae/seed0"]
    fit = tasks[2].fit_args()
    assert fit[fit.index("--trainer.devices") + 1] == "2" and fit[fit.index("--run_dir") + 1] == str(
        out / "wae" / "seed0"
    )
    assert tasks[2].test_args()[-2:] == ["--trainer.devices", "1"] and tasks[0].signal_delay_s == 120

    # --status reads the jobs back from sacct; a new start submits only the runs whose jobs have ended
    (tmp_path / "slurm" / "sacct").write_text("4242_0|RUNNING|node1\n4242_[1]|PENDING|\n4242_2|FAILED|node2\n")
    capsys.readouterr()
    experiment(spec, executor="slurm", out=out, status=True)
    shown = capsys.readouterr().out
    assert "experiment: 1 running, 1 queued, 1 failed" in shown and "SLURM job 4242_0 RUNNING" in shown, shown
    assert "SLURM job 4242_2 FAILED; see its log in" in shown
    experiment(spec, executor="slurm", out=out)
    assert len(slurm_calls(tmp_path / "slurm", "sbatch")) == 2
    second = (tmp_path / "slurm" / "sbatch-4243.sh").read_text()
    assert "--array" not in second and json.loads((out / "jobs.json").read_text())["wae/seed0"] == "4243"

    # a task as SLURM runs it, its `fae` a stand-in (that `fae fit` saves on SIGTERM is tests/test_runs.py's): the
    # warning signal to every process of the step mid-fit, the requeue, the requeued task again to its end
    from submitit.core.utils import DelayedSubmission

    small = write_spec(tmp_path, slurm={"time": 30, "gpus_per_task": 0, "cpus_per_task": 1})
    out = tmp_path / "cpu"
    experiment(small, executor="slurm", out=out)
    script = tmp_path / "slurm" / "sbatch-4244.sh"
    pickled = out / ".submitit" / "4244_0_submitted.pkl"
    submitted = DelayedSubmission.load(pickled)
    (tmp_path / "fake_fae.py").write_text(FAKE_FAE)
    submitted.function.program = (sys.executable, str(tmp_path / "fake_fae.py"))
    submitted.dump(pickled)
    calls = tmp_path / "calls"
    task_env = experiment_env(**env, **slurm_task_env("4244", 0, 4245), FAKE_FAE_CALLS=str(calls))
    first = subprocess.Popen(["bash", str(script)], env={**task_env, "FAKE_FAE_CODES": '["sleep"]'},
                             start_new_session=True, stderr=subprocess.PIPE, text=True)  # fmt: skip
    started = Path(f"{calls}.started")
    deadline = time.monotonic() + 60
    while not started.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    group, usr2_ignored = json.loads(started.read_text().splitlines()[0])
    assert usr2_ignored  # else SLURM's step-wide USR2 would kill the fit before it saves
    os.killpg(group, signal.SIGUSR2)  # as SLURM sends it: to every process of the step
    assert first.wait(timeout=60) != 0, first.stderr.read()
    assert Path(f"{calls}.stopped").read_text() == "SIGTERM"  # the job stopped its command as fae stops
    assert slurm_calls(tmp_path / "slurm", "scontrol") == ["requeue 4244_0"], first.stderr.read()
    run = out / "vae" / "seed0"
    assert "requeues it" in read_status(Run("vae", 0, Path(), (), run))["line"]
    requeued = DelayedSubmission.load(pickled)  # as submitit dumped it at the signal
    assert requeued.function.run.key == "vae/seed0" and requeued._timeout_countdown == 20  # a preemption
    again = subprocess.run(["bash", str(script)], env={**task_env, "FAKE_FAE_CODES": "[0]"}, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    first_fit, fit, test = (json.loads(line) for line in calls.read_text().splitlines())
    assert first_fit == fit and fit[0] == "fit" and fit[fit.index("--run_dir") + 1] == str(run)
    assert fit[fit.index("--ckpt_path") + 1] == "last"  # it resumes the run's folder
    assert test[0] == "test" and test[test.index("--ckpt_path") + 1] == str(run / "checkpoints" / "last.ckpt")
    status = read_status(Run("vae", 0, Path(), (), run))
    assert status["state"] == "done" and status["job"] == "4244_0"
