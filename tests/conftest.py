"""Shared fixtures: real MNIST when FAE_MNIST_ROOT points at it, the `fae` command in this process, the
embedded digits in MNIST's layout, and tiny trained runs of each family made once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# The fixtures import .helpers (and so Lightning, about 8 s here) when they first run, not at the top: under
# pytest-xdist the controlling process loads this file too but runs no test, and every worker would wait for
# its import before starting.


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A folder holding MNIST/raw/ (FAE_MNIST_ROOT; `make test` sets it to ../shared/data when present)."""
    root = os.environ.get("FAE_MNIST_ROOT")
    if not root or not (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.skip("real MNIST not available: set FAE_MNIST_ROOT to a folder holding MNIST/raw/")
    return Path(root)


@pytest.fixture
def fae_here(capfd):
    """Run `fae ARGS` in this process (commands on one device: Lightning's DDP re-executes sys.argv);
    returns a CompletedProcess with the exit status and the captured output."""

    from .helpers import run_in_process

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        code = run_in_process(list(args), cwd, env, capture=capfd)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


# the runs of `trained_run`: 6 batches of 64 at width 4, a validation of 2 batches at steps 3 and 6
TRAINED = ["--model.width", "4", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
           "--trainer.limit_val_batches", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.log_every_n_steps", "2"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """family -> the folder of its tiny run (TRAINED on the family's quickstart config), trained once per
    session (helpers.made_once). Read only: tests copy it (`trained_run`)."""
    from .helpers import QUICKSTART, made_once, run_in_process

    def train(family: str, run: Path) -> None:
        code = run_in_process(["fit", *QUICKSTART[family], *TRAINED, "--run_dir", str(run)], run.parent)
        assert code == 0, f"the session's {family} run failed"

    return lambda family: made_once(tmp_path_factory, f"trained-{family}", lambda run: train(family, run))


@pytest.fixture
def trained_run(trained_runs, tmp_path):
    """A copy of the session's tiny run of a family in tmp_path/NAME (for evaluations of its checkpoints;
    its checkpoints record the original's paths, so a test that resumes trains its own run)."""

    def copy(family: str = "vae", name: str = "run") -> Path:
        return Path(shutil.copytree(trained_runs(family), tmp_path / name, ignore=shutil.ignore_patterns(".fae.lock")))

    return copy


@pytest.fixture(scope="session")
def digits_mnist(tmp_path_factory):
    """The 5000 embedded digits in MNIST's layout (4500 to train, 500 to test), with a classifier
    trained briefly on them (fae.evaluation.classifier), made once per session (helpers.made_once):
    (data folder, classifier file). Read only."""
    from fae.data.digits import load_digits
    from fae.evaluation.classifier import train_classifier

    from .helpers import made_once, write_idx

    def make(root: Path) -> None:
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        images = load_digits()[:, 0].numpy()
        labels = np.repeat(np.arange(10), 500)  # the file holds 500 digits per class, sorted by class
        order = np.random.default_rng(0).permutation(5000)
        train, test = order[:4500], order[4500:]
        write_idx(raw, "train-images-idx3-ubyte", images[train])
        write_idx(raw, "train-labels-idx1-ubyte", labels[train])
        write_idx(raw, "t10k-images-idx3-ubyte", images[test])
        write_idx(raw, "t10k-labels-idx1-ubyte", labels[test])
        train_classifier(root, epochs=2)

    root = made_once(tmp_path_factory, "digits-mnist", make)
    return root, train_classifier(root)  # the file made above, returned untouched
