"""Two CPU processes with DDP (gloo): one run folder, the data split between the ranks, a checkpoint."""

from __future__ import annotations

import math

import torch

from .conftest import run_fae
from .test_cli import QUICK, TINY, last_value, read_metrics


def test_fit_on_two_cpu_processes(tmp_path):
    out = run_fae(
        "fit",
        *QUICK,
        *TINY,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_epochs",
        "1",
        "--run_name",
        "ddp",
        cwd=tmp_path,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # both ranks used one run folder
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    # 4000 training digits, 64 per batch per process, 2 processes: each rank sees half the data
    assert ckpt["global_step"] == math.ceil(4000 / 2 / 64)
    assert last_value(read_metrics(run / "metrics.csv"), "val/loss") > 0
