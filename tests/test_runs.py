"""No result lost or misreported, through the `fae` CLI: run folders that are never shared or rewritten,
resumption that continues metrics.csv, evaluations that need a trained checkpoint, SIGTERM/SIGINT,
atomic and validated checkpoints, non-finite values in every family, one-line errors, several nodes."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import CONFIGS, FISHER, QUICK, TINY, one_line_error, rows_of, step_of, steps_of


@pytest.mark.slow
def test_a_run_folder_is_resumed_in_place_and_never_reused_or_overwritten(tmp_path, fae_here):
    run_fae = fae_here
    run = tmp_path / "runs" / "a"
    first = run_fae("fit", *QUICK, *TINY, "--trainer.max_steps", "30", "--run_dir", str(run), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"last:        {run / 'checkpoints' / 'last.ckpt'} (step 30)" in first.stderr + first.stdout
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".fae.lock"}

    again = run_fae("fit", *QUICK, *TINY, "--run_dir", str(run), cwd=tmp_path)  # a new run in a used folder
    one_line_error(again, f"{run} already holds a run: resume it with --ckpt_path")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".fae.lock"} == before

    # rows logged after the checkpoint, before a crash (kill -9): the resumed run logs those steps again
    with open(run / "metrics.csv", "a") as f:
        f.write("0,34,1,1,1,1,1,1\n")
    resumed = run_fae("fit", *QUICK, *TINY, "--trainer.max_steps", "80", "--seed_everything", "7",
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (  # a resume that changes the data stream says so, in one line
        "fae: this resume changes what fixes the run's data stream against its config.yaml (seed_everything 0 -> 7): "
        "it goes on, but its weights will no longer be those of an uninterrupted run"
    ) in resumed.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a"]  # resumed in its own folder
    assert (run / "config.yaml").read_bytes() == before[run / "config.yaml"]  # the resume's is beside it
    assert "max_steps: 80" in next(run.glob("config-resumed-*.yaml")).read_text()
    assert step_of(run / "checkpoints" / "last.ckpt") == 80
    assert not [p for p in run.rglob("*-v[0-9]*.ckpt")], "no versioned checkpoints behind the user's back"
    train = steps_of(run / "metrics.csv", "train/loss")
    assert train == list(range(4, 80, 5)), train  # one continuous record, every step once
    (superseded,) = run.glob("metrics-superseded-*.csv")
    assert [r["step"] for r in rows_of(superseded)] == ["34"]  # kept, not lost

    test = run_fae("test", *QUICK, *TINY, "--run_dir", str(run), "--ckpt_path", "last",
                   "--sweep.sigmas", "[0.1]", "--sweep.nus", "[0.1]", cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stderr[-2000:]
    (test_dir,) = run.glob("test-*")  # the evaluation in its own folder; the training metrics untouched
    assert (test_dir / "robustness.json").is_file() and steps_of(run / "metrics.csv", "train/loss") == train
    assert f"robustness:  {test_dir / 'robustness.json'}" in test.stderr + test.stdout

    older = run / "checkpoints" / next(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))
    rewind = run_fae("fit", *QUICK, *TINY, "--run_dir", str(run), "--ckpt_path", str(older), cwd=tmp_path)
    one_line_error(rewind, f"{run / 'checkpoints' / 'last.ckpt'} holds step 80, newer than")
    done = run_fae("fit", *QUICK, *TINY, "--trainer.max_steps", "80", "--ckpt_path",
                   str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path)  # fmt: skip
    one_line_error(done, f"{run / 'checkpoints' / 'last.ckpt'} is at step 80, not below trainer.max_steps=80")


def test_evaluations_need_a_trained_checkpoint(tmp_path, fae_here):
    run_fae = fae_here
    for extra, message in {
        (): "`fae test` needs a trained model: give --ckpt_path",
        ("--ckpt_path", "last"): "--ckpt_path last needs --run_dir RUN",
        ("--ckpt_path", "last", "--run_dir", "nothing"): "--ckpt_path last: nothing/checkpoints/last.ckpt does not",
    }.items():
        one_line_error(run_fae("test", *QUICK, *TINY, *extra, cwd=tmp_path), message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, fae_here):
    """The Fisher AE on `fae experiment`'s budget (steps counted across epochs, a validation every 7
    batches), with gradients accumulated over 2 batches (an epoch: 24 batches, 12 steps), stopped by
    SIGTERM after 11 batches (inside a step's window and between validations: it stops when the window
    ends, at step 6) and after 24 (an epoch's end: saved at the next epoch's first batch), resumed each
    time: every weight, logged value and validation as in the uninterrupted run. The second resume reads
    its checkpoint with the batch counters as fae wrote them before it wrote them as after the previous
    batch (the next batch fetched, not started): restored as they were, the resumed run validated one
    batch early."""
    budget = ["--trainer.max_steps", "15", "--trainer.max_epochs", "-1", "--trainer.check_val_every_n_epoch", "null",
              "--trainer.val_check_interval", "7", "--trainer.limit_val_batches", "2",
              "--trainer.limit_train_batches", "24", "--trainer.accumulate_grad_batches", "2"]  # fmt: skip
    whole = fae_here("fit", *FISHER, *TINY, *budget, "--run_dir", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    often = ["--checkpoint.last_every_minutes", "0.0005"]  # last.ckpt at nearly every step: changes nothing
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"

    def stop_after(batches: int, step: int, *resume: str) -> None:
        stop = ["--trainer.callbacks+=tests.callbacks.SignalAfterBatches", "--trainer.callbacks.batches", str(batches)]
        stopped = fae_here("fit", *FISHER, *TINY, *budget, *often, *stop, "--run_dir", "parts", *resume, cwd=tmp_path)
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
        message = stopped.stderr.strip().splitlines()[-1]
        assert message.startswith(f"fae: stopped by SIGTERM at step {step}; {last} holds that state. Resume with:")
        assert step_of(last) == step

    stop_after(11, step=6)
    counters = torch.load(last, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert counters == dict.fromkeys(("ready", "started", "processed", "completed"), 12)  # after batch 12
    stop_after(24, 12, "--ckpt_path", str(last))
    written = torch.load(last, weights_only=False)
    for counts in written["loops"]["fit_loop"]["epoch_loop.batch_progress"].values():
        if isinstance(counts, dict):
            counts["ready"] += 1  # as fae wrote a save at the start of a batch before
    torch.save(written, last)
    resumed = fae_here("fit", *FISHER, *TINY, *budget, "--ckpt_path", str(last), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "changes what fixes the run's data stream" not in resumed.stderr  # the same settings: no word
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["global_step"] == b["global_step"] == 15
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
    best = [sorted(p.name for p in (tmp_path / run / "checkpoints").glob("best-*")) for run in ("whole", "parts")]
    assert best[0] == best[1] and len(best[0]) == 1  # the same validations, after the same batches
    assert rows_of(tmp_path / "parts" / "metrics.csv") == rows_of(tmp_path / "whole" / "metrics.csv")


@pytest.mark.multiprocess
def test_a_second_live_run_in_the_same_folder_is_refused_and_ctrl_c_saves_the_first(tmp_path, fae_here):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("FAE_RUN_DIR", None)
    often = ["--checkpoint.last_every_minutes", "0.002"]  # last.ckpt mid-epoch, every 0.12 s
    command = [sys.executable, "-m", "fae.cli", "fit", *QUICK, *TINY, *often, "--trainer.max_epochs", "1000",
               "--run_dir", "r"]  # fmt: skip
    live = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        last = tmp_path / "r" / "checkpoints" / "last.ckpt"
        while not last.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        first = step_of(last)  # complete, though being replaced
        assert 0 < first < 63  # written mid-epoch (an epoch is 63 batches)
        second = fae_here("fit", *QUICK, *TINY, "--run_dir", "r", "--ckpt_path", "last", cwd=tmp_path)
        one_line_error(second, "the run folder r is in use by a live run (pid ")
    finally:
        live.send_signal(signal.SIGINT)
        stderr = live.communicate(timeout=120)[1]
    assert live.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(f"fae: stopped by SIGINT at step {step_of(last)}; ")
    assert step_of(last) > first


@pytest.mark.slow
def test_checkpoints_are_written_atomically_and_a_corrupt_one_is_named(tmp_path, fae_here, trained_run):
    last = trained_run("vae", "r") / "checkpoints" / "last.ckpt"
    good = last.read_bytes()

    def small_files() -> None:  # a full disk, as far as the checkpoint is concerned
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, len(good) // 2))

    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("FAE_RUN_DIR", None)
    full = subprocess.run([sys.executable, "-m", "fae.cli", "fit", *QUICK, *TINY, "--trainer.max_steps", "128",
                           "--ckpt_path", str(last)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          preexec_fn=small_files, timeout=300)  # fmt: skip
    one_line_error(full, "could not write checkpoint ")
    # the write that crosses the limit is cut short, or the next one refused (EFBIG): where depends on the layout
    assert "(the write was cut short; " in full.stderr or "(File too large; " in full.stderr
    assert "MiB free on its disk); no existing checkpoint was changed" in full.stderr
    assert last.read_bytes() == good and not list(last.parent.glob(".*partial*"))

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 3])
    for subcommand in ("test", "fit"):
        out = fae_here(subcommand, *QUICK, *TINY, "--ckpt_path", str(truncated), cwd=tmp_path)
        one_line_error(out, f"checkpoint {truncated} cannot be read, it is truncated or corrupt")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_vae", "digits_fisher", "digits_wae_gan"])
def test_a_non_finite_loss_stops_every_family_with_the_last_good_checkpoint_kept(tmp_path, config, fae_here):
    run_fae = fae_here
    poison = ["--trainer.callbacks+=tests.callbacks.PoisonFrom", "--trainer.callbacks.step", "70"]
    out = run_fae("fit", "--config", str(CONFIGS / "quickstart" / f"{config}.yaml"), *TINY, *poison,
                  "--trainer.max_steps", "100", "--run_dir", "r", cwd=tmp_path)  # fmt: skip
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    one_line_error(out, "non-finite loss term ")
    assert "at step 70 (epoch 1); that optimizer step was not applied, nor any after it" in out.stderr
    assert f"last saved state: {last})" in out.stderr and step_of(last) == 63  # the epoch's end, kept


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, diverge, message",
    [
        (
            "digits_vae",
            ["LearningRateFrom", "--trainer.callbacks.lr", "1e4"],
            "non-finite reconstructions in val at step 20",
        ),
        ("digits_fisher", ["PoisonWeightAt"], "non-finite weights (encoder."),
        ("digits_wae_gan", ["PoisonWeightAt"], "non-finite weights (encoder."),
    ],
)
def test_a_run_whose_weights_diverge_stops_in_one_line_with_the_last_good_checkpoint(
    tmp_path, config, diverge, message, fae_here
):
    """Finite gradients that make the model diverge (a learning rate far too high, a weight gone infinite)
    cannot be skipped: under `skip` too, the next validation stops in one line, and last.ckpt stays the
    last good one (written at step 10, before the divergence from step 12)."""
    callback = [f"--trainer.callbacks+=tests.callbacks.{diverge[0]}", "--trainer.callbacks.step", "12", *diverge[1:]]
    out = fae_here("fit", "--config", str(CONFIGS / "quickstart" / f"{config}.yaml"), *TINY, *callback,
                   "--model.on_nonfinite", "skip", "--trainer.max_steps", "40", "--trainer.val_check_interval", "10",
                   "--trainer.limit_val_batches", "2", "--run_dir", "r", cwd=tmp_path)  # fmt: skip
    one_line_error(out, message)
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert f"last saved state: {last}" in out.stderr and step_of(last) == 10
    state = torch.load(last, weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("config, term", [("digits_vae", "loss, nll, kl"), ("digits_fisher", "loss, decoder_score"),
                                          ("digits_wae_gan", "disc_loss")])  # fmt: skip
def test_under_stop_a_learning_rate_far_too_high_stops_in_one_line_before_any_bad_update(
    tmp_path, config, term, fae_here
):
    """lr 1e4 from step 12 under `stop` (the default): the first non-finite term stops the run in one line,
    no update from it applied, last.ckpt the validation's of step 10, every weight finite."""
    diverge = ["--trainer.callbacks+=tests.callbacks.LearningRateFrom", "--trainer.callbacks.step", "12",
               "--trainer.callbacks.lr", "1e4"]  # fmt: skip
    out = fae_here("fit", "--config", str(CONFIGS / "quickstart" / f"{config}.yaml"), *TINY, *diverge,
                   "--trainer.max_steps", "40", "--trainer.val_check_interval", "10", "--trainer.limit_val_batches",
                   "2", "--run_dir", "r", cwd=tmp_path)  # fmt: skip
    one_line_error(out, f"non-finite loss term {term}")
    assert "that optimizer step was not applied, nor any after it" in out.stderr
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert f"last saved state: {last}" in out.stderr and step_of(last) == 10
    state = torch.load(last, weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_skipping_non_finite_steps_gives_up_after_a_bound(tmp_path, fae_here):
    run_fae = fae_here
    poison = ["--trainer.callbacks+=tests.callbacks.PoisonFrom", "--trainer.callbacks.step", "5"]
    out = run_fae("fit", *QUICK, *TINY, *poison, "--model.on_nonfinite", "skip", "--model.max_consecutive_skips", "7",
                  "--trainer.max_steps", "100", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # poisoned from step 5: steps 5..11 are 7 skips in a row (a skipped batch still counts as a step)
    expected = "fae: error: 7 steps in a row skipped, the last for a non-finite loss term loss, nll, kl at step 11"
    assert out.stderr.strip().splitlines()[-1].startswith(expected), out.stderr[-800:]


@pytest.mark.slow
def test_mistakes_are_one_line_errors_and_leave_nothing_behind(tmp_path, fae_here):
    run_fae = fae_here
    (tmp_path / "afile").write_text("")
    cases = {
        ("--model.decoder_scale", "1e300", "--model.likelihood", "gaussian"): "decoder_scale must be in [1e-6, 1e6]",
        ("--model.latent_dim", "0"): "VAE: latent_dim must be > 0, got 0",
        ("--data.batch_size", "0"): "batch_size and eval_batch_size must be >= 1, got 0",
        ("--data.num_workers", "-1"): "num_workers must be >= 0",
        ("--trainer.val_check_interval", "0"): "trainer.val_check_interval must be > 0",
        ("--trainer.max_steps", "0"): "nothing to train with trainer.max_steps=0",
        ("--trainer.devices", "-2"): "trainer: `devices` selected with `CPUAccelerator` should be an int > 0",
        ("--trainer.strategy", "nope"): "trainer: You selected an invalid strategy name",
        ("--run_dir", ""): "--run_dir is empty",
        ("--sweep.sigmas", "[]", "--sweep.nus", "[]"): "the sweep has no level",
        # raised when training starts, after the loggers: the run folder is removed
        ("--model.optimizer.lr", "-1"): "model.optimizer: Invalid learning rate: -1",
        ("--model.width", "0"): "VAE: width must be > 0, got 0",
        ("--model.width", "100000"): "not enough memory to build the nets",  # 720 GB of weights
        ("--trainer.max_epochs", "-5"): "trainer.max_epochs must be >= -1 (-1: no limit), got -5",
        ("--sweep.nus", "[1.5]"): "BinaryMask: nu must be a probability in [0, 1], got 1.5",
        ("--runs_dir", "afile/runs"): "cannot make the run folder afile/runs: a file is in the way",
        # raised by Lightning once the data is known, after the loggers started: the folder is removed
        ("--trainer.val_check_interval", "1000", "--trainer.logger", "null"): "`val_check_interval` (1000) must be",
    }
    for extra, message in cases.items():
        one_line_error(run_fae("fit", *QUICK, *TINY, *extra, cwd=tmp_path), message)
    prior = run_fae("fit", *FISHER, *TINY, "--model.prior", "polynomial", "--model.prior_degree", "3", cwd=tmp_path)
    one_line_error(prior, "prior_degree must be even")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run folder, no W&B run left
    report = run_fae("report", str(tmp_path), "--out", str(tmp_path / "afile"), cwd=tmp_path)
    assert report.returncode == 2 and "fae: error: " in report.stderr and "Traceback" not in report.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_nodes_under_torchrun_share_one_run_folder_written_by_rank_zero(tmp_path, fae_here):
    """torchrun with 2 nodes of 1 process each on this machine (gloo), the run folder on 'shared storage'."""
    port = str(free_port())
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("FAE_RUN_DIR", None)
    fit = ["fit", *QUICK, *TINY, "--trainer.max_steps", "40", "--trainer.limit_val_batches", "2",
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
           "--trainer.strategy", "ddp", "--run_dir", "shared/run"]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "-m",
                "fae.cli",
                *fit,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    run = tmp_path / "shared" / "run"
    assert step_of(run / "checkpoints" / "last.ckpt") == 40
    assert steps_of(run / "metrics.csv", "train/loss") == list(range(4, 40, 5))  # one writer: each row once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # nothing written elsewhere
    for launcher in ({"WORLD_SIZE": "2", "RANK": "1"}, {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}):  # torchrun, srun
        alone = fae_here(*fit[:-2], cwd=tmp_path, env=launcher)
        one_line_error(alone, "with several nodes, or under torchrun or srun, every process must write to one run")


@pytest.mark.slow
def test_results_cannot_be_mixed_up_by_a_folder_checkpoint_or_report_given_by_hand(tmp_path, fae_here, trained_run):
    run = trained_run("vae", "a")
    last = run / "checkpoints" / "last.ckpt"
    cases = [
        (
            ("fit", *FISHER, *TINY, "--trainer.max_steps", "100", "--ckpt_path", str(last)),
            f"{last} holds a VAE, the config a FisherAE: use the config it was trained with",
        ),
        (
            ("test", *QUICK, *TINY, "--run_dir", str(tmp_path / "a"), "--ckpt_path", str(last), "--run_dir", str(run)),
            None,
        ),  # its own run: fine
        (
            ("fit", *QUICK, *TINY, "--trainer.max_steps", "10", "--checkpoint.dirpath", str(run / "checkpoints")),
            f"checkpoint.dirpath {run / 'checkpoints'} already holds another run's checkpoints",
        ),
        (("report", str(run), "--out", str(run)), f"--out {run} holds a run's results (metrics.csv)"),
    ]
    for args, message in cases:
        out = fae_here(*args, cwd=tmp_path)
        if message is None:
            assert out.returncode == 0, out.stderr[-2000:]
        else:
            one_line_error(out, message)
    other = trained_run("wae_gan", "b")
    wrong = fae_here("test", *QUICK, *TINY, "--run_dir", str(other), "--ckpt_path", str(last), cwd=tmp_path)
    one_line_error(wrong, f"{last} is a checkpoint of the run {run}, not of {other}")
    wider = fae_here("test", *QUICK, *TINY, "--model.width", "16", "--ckpt_path", str(last),
                     "--sweep.enabled", "false", cwd=tmp_path)  # fmt: skip
    assert wider.returncode == 0, wider.stderr[-2000:]
    assert f"fae: the model is built as {last} records it: model.width 16 -> 4" in wider.stderr

    # a checkpoint written when each net took its own latent_dim and width still evaluates, to the same numbers
    state = torch.load(last, weights_only=False)
    sizes = {key: state["hyper_parameters"].pop(key) for key in ("latent_dim", "width", "image_shape")}
    old_nets = {"latent_dim": sizes["latent_dim"], "width": sizes["width"], "norm": "batch"}
    old_encoder = {**old_nets, "gaussian": True}
    state["hyper_parameters"]["encoder"] = {"class_path": "fae.nets.MNISTEncoder", "init_args": old_encoder}
    state["hyper_parameters"]["decoder"] = {"class_path": "fae.nets.MNISTDecoder", "init_args": old_nets}
    torch.save(state, run / "checkpoints" / "older-form.ckpt")
    older = fae_here("test", *QUICK, *TINY, "--ckpt_path", str(run / "checkpoints" / "older-form.ckpt"),
                     "--sweep.enabled", "false", cwd=tmp_path)  # fmt: skip
    assert older.returncode == 0, older.stderr[-2000:]

    def recon_bce_of(out):  # the test error an evaluation's printed run folder holds
        folder = Path(re.search(r"done; run folder (\S+)", out.stdout).group(1))
        rows = [row for row in rows_of(folder / "metrics.csv") if row.get("test/recon_bce")]
        return float(rows[-1]["test/recon_bce"])

    assert recon_bce_of(older) == recon_bce_of(wider)

    flipped = bytearray(last.read_bytes())  # a flipped byte inside a tensor: the zip checksum finds it
    flipped[len(flipped) // 2 : len(flipped) // 2 + 4] = b"\xff\xfe\xfd\xfc"
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    one_line_error(fae_here("test", *QUICK, *TINY, "--ckpt_path", str(tmp_path / "flipped.ckpt"), cwd=tmp_path),
                   f"checkpoint {tmp_path / 'flipped.ckpt'} is corrupt (")  # fmt: skip
    weights = torch.load(last, weights_only=False)
    del weights["optimizer_states"]
    torch.save(weights, tmp_path / "weights.ckpt")
    one_line_error(fae_here("fit", *QUICK, *TINY, "--trainer.max_steps", "100", "--ckpt_path",
                            str(tmp_path / "weights.ckpt"), cwd=tmp_path),
                   f"{tmp_path / 'weights.ckpt'} holds weights only")  # fmt: skip
    torch.save({"state_dict": weights["state_dict"]}, tmp_path / "bare.ckpt")
    one_line_error(fae_here("test", *QUICK, *TINY, "--ckpt_path", str(tmp_path / "bare.ckpt"), cwd=tmp_path),
                   f"{tmp_path / 'bare.ckpt'} is not a Lightning checkpoint")  # fmt: skip
    ddp = fae_here("fit", "--config", str(CONFIGS / "quickstart" / "digits_wae_gan.yaml"), *TINY,
                   "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)  # fmt: skip
    one_line_error(ddp, "the WAEGAN's optimizer steps each use part of the parameters")


@pytest.mark.slow
def test_a_run_that_saved_no_checkpoint_starts_again_with_ckpt_path_last(tmp_path, fae_here):
    run = tmp_path / "k"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,4,0.9\n0,9,0.8\n")  # killed before a checkpoint
    refused = fae_here("fit", *QUICK, *TINY, "--trainer.max_steps", "10", "--run_dir", str(run), cwd=tmp_path)
    one_line_error(refused, f"{run} holds the metrics of a run that saved no checkpoint: start it again there")
    again = fae_here("fit", *QUICK, *TINY, "--trainer.max_steps", "10", "--run_dir", str(run), "--ckpt_path", "last",
                     cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps_of(run / "metrics.csv", "train/loss") == [4, 9]  # the new run's rows only
    assert "no last checkpoint" not in again.stderr  # no alias reaches Lightning: it starts afresh
    assert "ckpt_path: null" in next(run.glob("config*.yaml")).read_text()
    (kept,) = run.glob("metrics-superseded-*.csv")
    assert [r["train/loss"] for r in rows_of(kept)] == ["0.9", "0.8"]


@pytest.mark.slow
def test_a_signal_outside_training_exits_non_zero_with_one_line(tmp_path, fae_here, trained_run):
    run = trained_run("vae", "r")
    stop = ["--trainer.callbacks+=tests.callbacks.SignalAtTestStart"]
    out = fae_here("test", *QUICK, *TINY, *stop, "--ckpt_path", "last", "--run_dir", "r", cwd=tmp_path)
    assert out.returncode == 143, out.stderr[-2000:]
    assert (
        out.stderr.strip().splitlines()[-1]
        == "fae: stopped by SIGTERM during `fae test`; nothing was saved at the stop"
    )
    assert not list(run.glob("test-*"))  # the stopped evaluation left no folder


@pytest.mark.slow
def test_a_resumed_fit_loads_its_checkpoint_once(tmp_path, fae_here, trained_run, monkeypatch):
    """The planner, the model's rebuild and Lightning's restore share one read of the checkpoint."""
    run = trained_run("vae", "r")
    last = run / "checkpoints" / "last.ckpt"
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or original(f, *a, **k))
    out = fae_here("fit", *QUICK, *TINY, "--trainer.max_steps", "8", "--ckpt_path", str(last), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert loads.count(str(last)) == 1, loads  # before the change: up to five reads of it
    assert step_of(last) == 8


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_every_family_trains_on_fashion_mnist_from_its_config(tmp_path, family, fae_here, mnist_root):
    if not (mnist_root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.skip(f"real Fashion-MNIST not available: {mnist_root} holds no FashionMNIST/raw/")
    out = fae_here("fit", "--config", str(CONFIGS / f"fashion_mnist_{family}.yaml"), *TINY, "--data.data_dir",
                   str(mnist_root), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--run_dir", "r",
                   cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert (
        "class_path: fae.data.FashionMNISTDataModule" in config and step_of(tmp_path / "r/checkpoints/last.ckpt") == 3
    )
