"""Two CPU processes with DDP (gloo): one run folder, the data split between the ranks, a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import CONFIGS, run_fae
from .test_cli import TINY, last_value, read_metrics


@pytest.mark.parametrize("family", ["vae", "fisher"])
def test_fit_on_two_cpu_processes(tmp_path, family):
    out = run_fae(
        "fit",
        "--config",
        str(CONFIGS / "quickstart" / f"digits_{family}.yaml"),
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
    rows = read_metrics(run / "metrics.csv")
    assert math.isfinite(last_value(rows, "val/loss"))
    assert 0 < last_value(rows, "val/recon_bce") < 2
