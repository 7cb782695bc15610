"""Two CPU processes with DDP (gloo): one run folder, the data split between the ranks, a checkpoint."""

from __future__ import annotations

import math
import time

import pytest
import torch

from .helpers import CONFIGS, TINY, WAE, last_value, rows_of, run_fae

pytestmark = pytest.mark.multiprocess


# the VAE's DDP training: test_sigterm_to_rank_zero_... below, and torchrun's in tests/test_runs.py; the Fisher
# AE's: test_ddp_converts_once_and_both_processes_train_from_the_memory_map in tests/test_celeba.py
def test_the_wae_gan_fits_on_two_cpu_processes_and_plain_ddp_is_refused_in_one_line(tmp_path, fae_here):
    out = run_fae("fit", *WAE, *TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.max_epochs", "1",
                  "--trainer.limit_val_batches", "2", "--run_name", "ddp", cwd=tmp_path, timeout=400)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # both ranks used one run folder
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    # 4000 training digits, 64 per batch per process, 2 processes: each rank sees half the data; a step
    # is a batch (the WAE-GAN's two optimizer updates per batch count once)
    assert ckpt["global_step"] == math.ceil(4000 / 2 / 64)
    assert len(ckpt["optimizer_states"]) == 2
    rows = rows_of(run / "metrics.csv")
    assert math.isfinite(last_value(rows, "val/loss"))
    assert 0 < last_value(rows, "val/recon_bce") < 2
    # plain ddp is refused with the fix in one line, before any process starts
    plain = fae_here("fit", *WAE, *TINY, "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    assert plain.returncode == 2
    assert "use --trainer.strategy ddp_find_unused_parameters_true" in plain.stderr.strip().splitlines()[-1]


def test_a_killed_process_stops_the_other_in_one_line_that_resumes_from_last_ckpt(tmp_path):
    """kill -9 of rank 1 (as the OOM killer does) at step 8: rank 0's next collective fails, and it ends in
    one line naming the checkpoint it holds (step 5, the last validation) and the command that resumes."""
    start = time.monotonic()
    out = run_fae("fit", "--config", str(CONFIGS / "quickstart" / "digits_vae.yaml"), *TINY,
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                  "--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "1",
                  "--trainer.callbacks+=tests.callbacks.KillRankAt", "--trainer.callbacks.step", "8",
                  "--run_dir", "r", cwd=tmp_path, timeout=400)  # fmt: skip
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("fae: error: another process of this run stopped") and f"{last} holds step 5." in line
    assert line.endswith(f"--trainer.callbacks.step 8 --ckpt_path {last}") and "Resume with: fae fit --config" in line
    assert torch.load(last, weights_only=False)["global_step"] == 5
    assert time.monotonic() - start < 120  # it stops; it does not wait for the lost process


def test_sigterm_to_rank_zero_stops_both_processes_with_a_resumable_checkpoint(tmp_path):
    """A scheduler may signal only the launching process: the decision reaches the other rank at the next
    batch, both write nothing but rank zero's last.ckpt, and the command exits 143 with one line."""
    out = run_fae("fit", "--config", str(CONFIGS / "quickstart" / "digits_vae.yaml"), *TINY,
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                  "--trainer.callbacks+=tests.callbacks.SignalAt", "--trainer.callbacks.step", "10",
                  "--run_dir", "r", cwd=tmp_path, timeout=400)  # fmt: skip
    assert out.returncode == 143, out.stderr[-3000:]
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert out.stderr.count("fae: stopped by SIGTERM at step 10; ") == 1  # said once, by rank zero
    assert torch.load(last, weights_only=False)["global_step"] == 10
