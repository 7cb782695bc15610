"""Results are written whole or not at all, and compared only when alike: a failed write (a full disk, a
file-size limit) leaves no partial file under a result's name and ends in one line; a report replaces
an earlier one whole, or leaves it as it was; unlike sweeps are refused, and unlike levels are
summarised over the levels every run has; a sweep level whose reconstructions are not finite is a row
marked so."""

from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import signal

import numpy as np
import pytest

from fae.errors import UserError
from fae.files import WriteFailed, write_text, written

from .helpers import QUICK, TINY, fake_run, one_line_error, step_of


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG (RLIMIT_FSIZE), as they do on a full disk with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_file_is_written_whole_or_not_at_all(tmp_path):
    target = write_text(tmp_path / "rows.json", "earlier")
    with file_size_limit(1000), pytest.raises(WriteFailed) as failed:
        write_text(target, "x" * 5000)
    message = str(failed.value)
    assert message.startswith(f"could not write {target} (File too large; ") and "free on its disk" in message
    assert target.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # no partial
    write_text(target, "x" * 5000)  # the retry, with room
    assert target.read_text() == "x" * 5000
    with pytest.raises(UserError, match="rows.json exists: give another name"):
        with written(target, replace=False) as file:
            file.write(b"new")
    assert target.read_text() == "x" * 5000 and len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
def test_fae_sample_on_a_full_disk_leaves_nothing_and_the_retry_writes_it(tmp_path, fae_here, trained_run):
    last = trained_run("vae") / "checkpoints" / "last.ckpt"
    with file_size_limit(50_000):  # 64 images of 28 x 28 float32: 200 kB
        out = fae_here("sample", str(last), "--n", "64", "--out", str(tmp_path / "s.npy"), cwd=tmp_path)
    one_line_error(out, f"could not write {tmp_path / 's.npy'} (File too large; ")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".s.npy", "s.npy"))]  # no part, no name
    again = fae_here("sample", str(last), "--n", "64", "--out", str(tmp_path / "s.npy"), cwd=tmp_path)
    assert again.returncode == 0 and np.load(tmp_path / "s.npy").shape == (64, 1, 28, 28)


@pytest.mark.slow
def test_a_full_disk_in_validation_ends_fit_in_one_line_naming_the_safe_checkpoint(tmp_path, fae_here):
    full = ["--trainer.callbacks+=tests.callbacks.DiskFullAt", "--trainer.callbacks.step", "20"]
    out = fae_here("fit", *QUICK, *TINY, *full, "--trainer.max_steps", "30", "--trainer.val_check_interval", "10",
                   "--trainer.limit_val_batches", "2", "--run_dir", "r", cwd=tmp_path)  # fmt: skip
    images, last = tmp_path / "r" / "images", tmp_path / "r" / "checkpoints" / "last.ckpt"
    one_line_error(out, "could not write r/images/val_reconstructions_step0000020.png (No space left on device; ")
    assert f"nothing was left under that name; the last good checkpoint is {last} (step 10), intact" in out.stderr
    assert step_of(last) == 10 and sorted(p.name for p in images.iterdir()) == [
        "val_reconstructions_step0000010.png", "val_samples_step0000010.png",
    ]  # fmt: skip


def test_a_report_replaces_an_earlier_one_whole_or_leaves_it_as_it_was(tmp_path, monkeypatch):
    import fae.evaluation.report as report_module
    from fae.cli.failures import Stopped
    from fae.evaluation.report import report

    fake_run(tmp_path / "a", "VAE", {("mask", 0.1): 1.0, ("mask", 0.5): 2.0})
    fake_run(tmp_path / "b", "VAE", {("gaussian", 0.1): 1.0, ("gaussian", 0.5): 2.0})
    out = tmp_path / "report"
    report([tmp_path / "a"], out=out)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(earlier) == {".fae-report", "robustness.md", "robustness_mask.png"}

    def stop_midway(runs, folder):
        write_text(folder / "robustness_gaussian.png", "part of the new report")
        raise Stopped("SIGTERM")

    monkeypatch.setattr(report_module, "plot_results", stop_midway)
    with pytest.raises(Stopped):
        report([tmp_path / "b"], out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # the earlier report, as it was
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-built report left
    monkeypatch.undo()

    with file_size_limit(2000), pytest.raises(WriteFailed, match="could not write .*report.*File too large"):
        report([tmp_path / "b"], out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    report([tmp_path / "b"], out=out)  # the retry: only the new report's files
    assert {p.name for p in out.iterdir()} == {".fae-report", "robustness.md", "robustness_gaussian.png"}

    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt, which is not a file of a report"):
        report([tmp_path / "a"], out=out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "robustness_gaussian.png").is_file()


def test_the_report_refuses_unlike_sweeps_and_summarises_unlike_levels_over_the_common_ones(tmp_path, capsys):
    from fae.evaluation.report import report

    alike = dict(split="test", noise_seed=0, dataset="MNISTDataModule")
    fake_run(tmp_path / "a", "VAE", {("gaussian", 0.1): 1.0, ("gaussian", 0.5): 2.0, ("gaussian", 1.0): 3.0}, **alike)
    fake_run(tmp_path / "b", "FisherAE", {("gaussian", 0.1): 2.0, ("gaussian", 0.5): 4.0, ("gaussian", 2.0): 9.0},
             **alike)  # fmt: skip
    fake_run(tmp_path / "seed7", "VAE", {("gaussian", 0.1): 1.0, ("gaussian", 0.5): 2.0}, **{**alike, "noise_seed": 7})
    fake_run(tmp_path / "fewer", "VAE", {("gaussian", 0.1): 1.0, ("gaussian", 0.5): 2.0}, **{**alike, "n": 5})
    for other, difference in {"seed7": "noise seed (--sweep.seed): 0 against 7",
                              "fewer": "number of test images: 10 against 5"}.items():  # fmt: skip
        with pytest.raises(UserError, match=re.escape(f"a and {other} were not swept alike ({difference})")):
            report([tmp_path / "a", tmp_path / other], out=tmp_path / other / "r")
        assert not (tmp_path / other / "r").exists()  # nothing written

    report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "r")
    note = "the AUC columns are over the levels every run has (gaussian 0.1, gaussian 0.5); left out of them: "
    assert note + "gaussian 1, gaussian 2" in capsys.readouterr().out
    table = (tmp_path / "r" / "robustness.md").read_text()
    # over sigma 0.1 and 0.5 only: the mean of the two errors (a trapezoid over the common range)
    assert "| VAE (a) | 1 | 1.5 |" in table and "| FisherAE (b) | 1 | 3 |" in table and note in table


@pytest.mark.slow
def test_a_sweep_level_whose_reconstructions_are_not_finite_is_a_row_marked_so(tmp_path, fae_here, trained_run):
    run = trained_run("vae")
    out = fae_here("test", *QUICK, *TINY, "--run_dir", str(run), "--ckpt_path", "last", "--sweep.sigmas",
                   "[0.1, 1e38]", "--sweep.nus", "[]", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "the reconstructions at gaussian 1e+38 are not finite for some test images" in out.stderr + out.stdout
    (results,) = run.glob("test-*/robustness.json")
    rows = {r["level"]: r for r in json.loads(results.read_text())}
    assert math.isfinite(rows[0.1]["mean"]) and rows[1e38]["mean"] == math.inf
    assert rows[0.1]["split"] == "test" and rows[0.1]["noise_seed"] == 0  # what makes sweeps comparable
    assert "| gaussian | 1e+38 | non-finite |" in (results.parent / "robustness.md").read_text()


def test_publishing_an_experiment_replaces_its_report_files_and_keeps_the_others(tmp_path):
    from fae.experiment.table import copy_published

    out, docs = tmp_path / "exp", tmp_path / "docs"
    (out / "report").mkdir(parents=True)
    docs.mkdir()
    for name in ("table.md", "table.csv", "report/robustness.md", "report/robustness_mask.png", "report/.fae-report"):
        (out / name).write_text(f"new {name}")
    for name in ("README.md", "robustness_gaussian.png", "robustness.md"):  # a verdict, a stale figure, the table
        (docs / name).write_text(f"old {name}")
    copy_published(out, docs)
    assert {p.name: p.read_text() for p in docs.iterdir()} == {
        "README.md": "old README.md", "robustness.md": "new report/robustness.md",
        "robustness_mask.png": "new report/robustness_mask.png", "table.md": "new table.md",
        "table.csv": "new table.csv",
    }  # fmt: skip
