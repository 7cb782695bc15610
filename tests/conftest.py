"""Shared fixtures: real MNIST when FAE_MNIST_ROOT points at it, and a runner for the `fae` CLI."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A folder holding MNIST/raw/ (FAE_MNIST_ROOT; `make test` sets it to ../shared/data when present)."""
    root = os.environ.get("FAE_MNIST_ROOT")
    if not root or not (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.skip("real MNIST not available: set FAE_MNIST_ROOT to a folder holding MNIST/raw/")
    return Path(root)


def run_fae(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `fae ARGS` in a subprocess (DDP re-executes sys.argv, so the CLI is never run in-process)."""
    root = str(Path(__file__).resolve().parent.parent)  # so that --trainer.callbacks can name tests.callbacks
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": path, **(env or {})}
    full_env.pop("FAE_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "fae.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def fae_here(monkeypatch, capfd):
    """Run `fae ARGS` in this process (for commands on one device: Lightning's DDP re-executes sys.argv);
    returns a CompletedProcess with the exit status and the captured output. Saves the interpreter's
    start for each command."""
    from fae.cli import main

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as scoped:  # `env` for this command only
            for key, value in (env or {}).items():
                scoped.setenv(key, value)
            return run_here(args, cwd)

    def run_here(args: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["fae"])
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.delenv("FAE_RUN_DIR", raising=False)
        capfd.readouterr()
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # handlers hold the stderr of their import
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.stream = sys.stderr  # not setStream: it flushes the old one, maybe closed
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def wandb_run_records(run_folder: Path) -> dict:
    """What an offline W&B run under `run_folder` recorded, read from its transaction log (a LevelDB-style
    log of protobuf records in 32 KiB blocks): {"run": the run record, "config": {key: value},
    "summary": {key: value}} (values decoded from JSON). wandb itself has no reader of these files."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, pending, raw = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind in (2, 3):  # first, middle
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:  # last
            raw.append(pending + chunk)
    out: dict = {"run": None, "config": {}, "summary": {}}
    for item in raw:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(item)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "config":
            out["config"] |= {u.key: json.loads(u.value_json) for u in record.config.update}
        elif kind == "summary":
            out["summary"] |= {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update}
    return out


CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# A Trainer for tests: CPU, no files, no bars; evaluation with gradients (as the CLI sets it), which the
# posterior Fisher divergence and the Fisher objective need.
QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    inference_mode=False,
)


def write_idx(folder, name: str, array: np.ndarray) -> None:
    """An MNIST IDX file: magic (0, 0, type 0x08 = uint8, number of dimensions), the sizes, the bytes."""
    with open(folder / name, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def digits_mnist(tmp_path_factory):
    """The 5000 embedded digits in MNIST's layout (4500 to train, 500 to test), with a classifier
    trained briefly on them (fae.evaluation.features): (data folder, classifier file)."""
    from fae.data.digits import load_digits
    from fae.evaluation.features import train_classifier

    root = tmp_path_factory.mktemp("digits-mnist")
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
    return root, train_classifier(root, epochs=2)
