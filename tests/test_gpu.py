"""On a GPU: a training step that logs nothing makes no host-device synchronisation (every family, under
torch.cuda.set_sync_debug_mode("error")), and on the CPU the parts of the GPU check that run there:
benchmarks/device_check.py (fit, test and sample, the corruptions and the sweep against the CPU's).
benchmarks/gpu_check.sh runs all of it where a GPU is lent; benchmarks/shared_device.py, its other
CPU-capable part, runs on the CPU under `make bench`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from .helpers import QUICKSTART, ROOT

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: benchmarks/gpu_check.sh runs it where one is lent"
)


@needs_cuda
@pytest.mark.parametrize("family", sorted(QUICKSTART))
def test_a_step_that_logs_nothing_never_waits_for_the_gpu(tmp_path, family, fae_here):
    sync_debug = ["--trainer.callbacks+=tests.callbacks.SyncDebugAt", "--trainer.callbacks.step", "5"]
    out = fae_here("fit", *QUICKSTART[family], "--model.width", "8", "--trainer.accelerator", "cuda",
                   "--trainer.devices", "1", "--trainer.max_steps", "8", "--trainer.log_every_n_steps", "1000",
                   "--trainer.limit_val_batches", "0", "--trainer.logger", "false", *sync_debug,
                   "--run_dir", "r", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]  # a synchronising call in step 5 raised


def script(name: str, *args: str, cwd) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240, env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                                                       "PATH": "/usr/bin:/bin", "HOME": str(cwd)})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_the_device_check_runs_its_fits_tests_samples_and_parity_on_a_cpu(tmp_path):
    # float32 only: bf16-mixed fits and sweeps are tests/test_precision.py's
    out = script("device_check.py", "--accelerator", "cpu", "--families", "wae_gan", "--precisions", "32-true",
                 "--width", "4", "--steps", "3", "--test_batches", "1", cwd=tmp_path)  # fmt: skip
    lines = [line for line in out.splitlines() if line.startswith("device check")]
    assert [line.split(":")[0] for line in lines] == [
        "device check runs wae_gan 32-true", "device check parity gaussian",
        "device check parity mask", "device check parity sweep wae_gan", "device check",
    ]  # fmt: skip
    assert all(line.split(": ")[1].startswith("ok") for line in lines), out
    assert "5 rows, largest relative difference CPU/cpu 0.00e+00" in out  # 4 levels and the mean image: equal
