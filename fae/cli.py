"""The `fae` command: LightningCLI with fae's run folders, checkpoints and loggers.

    fae fit      --config configs/mnist_vae.yaml [--key value ...]
    fae validate --config ... --ckpt_path CKPT
    fae test     --config ... --ckpt_path CKPT
    fae predict  --config ... --ckpt_path CKPT
    fae report   RUN_DIR... [--out DIR]        (fae.evaluation.report)
    fae sample   CKPT --out FILE.png|.npy      (fae.evaluation.samples)

Arguments are the `__init__` signatures of the model, the data module and the Trainer (see
`fae fit --help` and `--print_config`); jsonargparse rejects an unknown key or a wrong type before
anything is built. What fae adds to LightningCLI:

  - a run folder per training run, RUNS_DIR/<run_name>-<timestamp>, or `--run_dir` exactly. It holds
    config.yaml, metrics.csv, checkpoints/, images/ and wandb/, and is never shared or overwritten:
    a new run in a folder that holds an earlier run's results is refused, and so is a second live
    run (fae.runs.RunLock). `fae fit --ckpt_path RUN/checkpoints/last.ckpt` resumes in RUN, appending
    to its metrics.csv (fae.runs.RunCSVLogger); `--ckpt_path last` with `--run_dir RUN` resumes RUN
    if it has a checkpoint and (re)starts it otherwise (what a requeued job wants). A checkpoint of
    another family, a shared `--checkpoint.dirpath` and an evaluation filed under another run are
    refused; the model is rebuilt as the checkpoint records it (differences named in one line);
  - an evaluation (validate, test, predict) of a checkpoint gets its own folder,
    <training run>/<subcommand>-<timestamp> (or <--run_dir>/<subcommand>-<timestamp>), and needs a
    trained checkpoint (`--ckpt_path`, or `last`/`best` with `--run_dir`) unless `--allow_untrained`;
  - every run writes its metrics to RUN/metrics.csv (a CSV logger is always added), beside the
    loggers of the config (W&B by default, fae.tracking.WandbLogger);
  - checkpoints RUN/checkpoints/last.ckpt (the newest state, written every few minutes, on SIGTERM
    and SIGINT and at the end, atomically: fae.checkpoint) and the best by `--checkpoint.monitor`;
    a signal ends the command with status 128+signal and the line that resumes it (outside
    training, at once, with one line: `Stopped`);
  - the data module's image shape passed to the model, which builds both nets from it and its own
    latent_dim and width (stated once; a net given its own, or the model an image shape, is refused in
    one line); checkpoints from when the nets took their own sizes are read in today's form;
  - under `fae test`, the robustness sweep (`--sweep.*`, fae.evaluation.RobustnessSweep), written to
    robustness.json and robustness.csv in the test's folder, with the FID/KID of samples and
    reconstructions when a feature network is at hand (fae.evaluation.quality);
  - on several processes, only global rank zero writes into the run folder. Worker processes that
    Lightning starts receive the folder through FAE_RUN_DIR; under torchrun or on several nodes give
    `--run_dir` on storage every node sees;
  - user errors (fae.errors.UserError, a missing or corrupt checkpoint, Lightning's configuration
    errors) end the command with one line, before anything is written where possible; a start that
    fails leaves no run folder behind.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from fae.checkpoint import AtomicCheckpointIO, Checkpoint, Preempted, read_checkpoint
from fae.data.base import InMemoryImageDataModule
from fae.errors import UserError, make_folder, short_reason, user_message
from fae.evaluation import RobustnessSweep
from fae.models.base import AutoEncoder
from fae.runs import (
    METRICS_NAME,
    RunCSVLogger,
    RunLock,
    global_rank_from_env,
    holds_results,
    release_all,
    several_processes_from_env,
)
from fae.tracking import flat_config

RUN_DIR_ENV = "FAE_RUN_DIR"
# Lightning advertises a cloud logger at every start; fae's output stays about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")
)
# ... and trips a deprecated torch pytree call at every run, which is nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
EVALUATIONS = ("validate", "test", "predict")
# run folders this process made and that a failed start must not leave behind (see main)
_CREATED: list[Path] = []


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def new_run_dir(parent: Path, name: str) -> Path:
    """Make and return a new folder parent/name, made unique with a numeric suffix; created at once and
    exclusively, so that two commands started in the same second never share one."""
    make_run_dir(parent)
    suffix = 1
    while True:
        path = parent / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            path.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        except OSError as err:
            raise UserError(f"cannot make the run folder {path}: {err.strerror} (choose another --runs_dir)") from None
        _CREATED.append(path)
        return path


def make_run_dir(path: Path) -> None:
    """Create a new run folder (recorded, so that a failed start removes it) or explain in one line why not."""
    top = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)  # the first folder made
    fix = "choose another --runs_dir or --run_dir"
    make_folder(path, "the run folder", fix)
    if not os.access(path, os.W_OK):
        raise UserError(f"cannot write in the run folder {path}: permission denied ({fix})")
    if top is not None:
        _CREATED.append(top)


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def checkpoint_run_dir(ckpt: Path) -> Path | None:
    """The run folder a checkpoint belongs to: RUN for RUN/checkpoints/*.ckpt and for RUN/hpc_ckpt_*.ckpt
    (Lightning's SLURM requeue checkpoints)."""
    ckpt = ckpt.resolve()
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return ckpt.parent if ckpt.name.startswith("hpc_ckpt_") else None


def best_checkpoint(last: Path) -> Path:
    """The best-by-monitor checkpoint recorded in a run's last.ckpt."""
    states = read_checkpoint(last).get("callbacks", {})
    paths = [state.get("best_model_path") for key, state in states.items() if "Checkpoint" in key]
    best = next((path for path in paths if path), None)
    if not best or not Path(best).is_file():
        raise UserError(f"{last} records no best checkpoint that still exists: give --ckpt_path a .ckpt file")
    return Path(best)


PROGRESS_BAR_REFRESH_STEPS = 10  # the bar is redrawn every 10 batches


class SaveConfig(SaveConfigCallback):
    """config.yaml in the run folder and, for every other logger (W&B), the whole resolved config as
    the run's hyperparameters: model, data, trainer, seed, sweep, checkpoint, as {flag: value}."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = flat_config(self.config.as_dict())
        for logger in trainer.loggers:
            if not isinstance(logger, RunCSVLogger):  # the CSV logger's copy is config.yaml
                logger.log_hyperparams(config)


class FaeCLI(LightningCLI):
    """LightningCLI with run folders, an always-on CSV log and checkpoints; see the module docstring."""

    def __init__(self, args=None, run: bool = True) -> None:
        self.lock: RunLock | None = None
        self.run_dir: Path | None = None
        self.evaluates: Path | None = None  # the training run an evaluation's checkpoint belongs to
        self.restart = False  # a run started again in its folder: its earlier metrics rows all move aside
        super().__init__(
            model_class=AutoEncoder,
            subclass_mode_model=True,
            datamodule_class=InMemoryImageDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            # evaluation differentiates (the posterior Fisher divergence, the Fisher objective):
            # torch.no_grad instead of inference mode, so that enable_grad can turn gradients back on
            trainer_defaults={"inference_mode": False},
            # parse errors raise (main() prints them as one line) instead of printing the whole usage
            parser_kwargs={
                "description": "fae: Fisher auto-encoders and their baselines. "
                "Also: `fae report RUN_DIR... [--out DIR]` compares the robustness sweeps of runs; "
                "`fae sample CKPT --out FILE.png|.npy` writes images generated from a model's prior; "
                "`fae classifier --data_dir DIR` trains (once) the MNIST network of fae's FID/KID.",
                "exit_on_error": False,
                **{name: {"exit_on_error": False} for name in self.subcommands()},
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Name of the run folder (default: the config file's name).",
        )
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where new run folders are made.")
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help=f"Use this exact run folder ({RUN_DIR_ENV} also sets it); an evaluation goes in a subfolder.",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path: evaluate the untrained model on purpose.",
        )
        # the nets' image shape is the data's, stated once (a CelebA --data.image_size reaches both nets)
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(RobustnessSweep, "sweep")  # acts under `fae test` only
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
                # a resumed run writes over its own files; fae never starts a new run in a used folder
                "checkpoint.enable_version_counter": False,
            }
        )

    # --- before anything is built ----------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Lightning rebuilds the model as --ckpt_path records it (its weights need that architecture): a
        corrupt file is one line, a checkpoint of another family is refused, and settings of the model
        that the checkpoint overrides are named in one line."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        shape = config.model.init_args.get("image_shape")
        if shape is not None and tuple(shape) != inspect.signature(AutoEncoder).parameters["image_shape"].default:
            raise UserError(
                f"the model's image_shape {list(shape)} is the data's, not a setting: the CLI passes the data module's "
                "image shape to the nets (for CelebA set --data.image_size)"
            )
        ckpt_path = config.get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return super()._parse_ckpt_path()
        hparams = upgrade_hparams(read_checkpoint(ckpt_path).get("hyper_parameters") or {})
        given = config.model.clone()
        if hparams:  # as LightningCLI._parse_ckpt_path, on the checkpoint's hyperparameters in today's form
            hparams = (
                {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
                if "_class_path" in hparams
                else hparams
            )
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        used = self.config[subcommand].model
        if used.class_path != given.class_path:
            held, configured = used.class_path.rsplit(".", 1)[-1], given.class_path.rsplit(".", 1)[-1]
            raise UserError(
                f"{ckpt_path} holds a {held}, the config a {configured}: use the config it was trained with "
                "(config.yaml in its run folder)"
            )
        before, after = flat_config(given.as_dict(), "model."), flat_config(used.as_dict(), "model.")
        linked = "model.image_shape"  # the data's at instantiation, whatever the checkpoint says
        changed = [
            f"{k} {before.get(k)} -> {v}" for k, v in after.items() if k in before and before[k] != v and k != linked
        ]
        if changed and global_rank_from_env() == 0:
            print(f"fae: the model is built as {ckpt_path} records it: {', '.join(changed)}", file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # FaeCLI(args, run=False): the objects only, no run folder
            check_trainer_settings(self.config.trainer, fit=False)
            self.run_dir = Path(self.config.get("run_dir") or Path(self.config.runs_dir) / "unused")
            return
        config = self.config[self.subcommand]
        check_trainer_settings(config.trainer, fit=self.subcommand == "fit")
        if config.get("run_dir") == "":
            raise UserError("--run_dir is empty: give a folder, or omit it for a new one under --runs_dir")
        self.rank_zero = global_rank_from_env() == 0
        explicit = config.get("run_dir") or os.environ.get(RUN_DIR_ENV)
        several = (config.trainer.get("num_nodes") or 1) > 1 or several_processes_from_env()
        if several and not explicit:
            raise UserError(
                "with several nodes, or under torchrun or srun, every process must write to one run folder: give "
                "--run_dir on storage that every node sees"
            )
        if not self.rank_zero:  # a worker of a run that rank zero has set up and checked
            self.run_dir = Path(explicit)
            ckpt = config.get("ckpt_path")
            config.ckpt_path = self.resolve_alias(ckpt, Path(explicit)) if ckpt in ("last", "best") else ckpt
        elif self.subcommand == "fit":
            self.run_dir, config.ckpt_path = self.training_run_dir(config, explicit)
        else:
            self.run_dir, config.ckpt_path = self.evaluation_run_dir(config, explicit)
        dirpath = config.checkpoint.dirpath
        if self.rank_zero and self.subcommand == "fit" and dirpath and any(Path(dirpath).glob("*.ckpt")):
            resumed = config.ckpt_path and Path(config.ckpt_path).resolve().parent == Path(dirpath).resolve()
            if not resumed:
                raise UserError(
                    f"checkpoint.dirpath {dirpath} already holds another run's checkpoints: give this run its own "
                    "(or leave it unset: RUN/checkpoints)"
                )
        family = import_class(config.model.class_path)
        strategy = config.trainer.get("strategy")
        if getattr(family, "needs_unused_parameters", False) and isinstance(strategy, str) and strategy == "ddp":
            raise UserError(
                f"the {family.__name__}'s optimizer steps each use part of the parameters: under DDP use "
                "--trainer.strategy ddp_find_unused_parameters_true"
            )
        if self.rank_zero and self.lock is None:  # claim the folder: one live run at a time
            make_run_dir(self.run_dir)
            self.lock = RunLock(self.run_dir, self.subcommand)
        if (self.run_dir / "config.yaml").is_file():  # a resume: the run's first config stays as it was
            self.save_config_kwargs["config_filename"] = f"config-resumed-{timestamp()}.yaml"
        os.environ[RUN_DIR_ENV] = str(self.run_dir)  # Lightning's worker processes inherit it
        config.trainer.default_root_dir = str(self.run_dir)
        if config.checkpoint.dirpath is None:  # evaluations keep pointing at the checkpoints they read
            ckpt = config.ckpt_path
            evaluated = Path(ckpt).parent if ckpt and self.subcommand != "fit" else None
            config.checkpoint.dirpath = str(evaluated or self.run_dir / "checkpoints")

    def resolve_alias(self, alias: str, run_dir: Path | None) -> str | None:
        """`last` or `best` as a file of run_dir's checkpoints/ (`last` under fit: None if not there yet)."""
        if run_dir is None:
            raise UserError(f"--ckpt_path {alias} needs --run_dir RUN: the run whose checkpoint to use")
        last = run_dir / "checkpoints" / "last.ckpt"
        if alias == "last":  # the newest state: last.ckpt, or a SLURM requeue checkpoint written after it
            candidates = [path for path in (last, *run_dir.glob("hpc_ckpt_*.ckpt")) if path.is_file()]
            if candidates:
                return str(max(candidates, key=lambda path: (self.checkpoint_step(str(path)), path == last)))
            if self.subcommand == "fit":
                return None
        if not last.is_file():
            raise UserError(f"--ckpt_path {alias}: {last} does not exist, {run_dir} has no trained checkpoint")
        return str(best_checkpoint(last))

    def training_run_dir(self, config, explicit: str | None) -> tuple[Path, str | None]:
        """The folder of a `fit` and the checkpoint it resumes from; refuses to mix two runs' results."""
        ckpt = config.get("ckpt_path")
        if explicit and Path(explicit).is_dir():  # lock first: what a live run holds changes under our checks
            self.lock = RunLock(Path(explicit), self.subcommand)
        restart = False  # `--ckpt_path last` in a folder without a checkpoint: (re)start the run there
        if ckpt in ("last", "best"):
            ckpt = self.resolve_alias(ckpt, Path(explicit) if explicit else None)
            if ckpt is None and any(Path(explicit).glob("checkpoints/*.ckpt")):
                raise UserError(f"{explicit} has checkpoints but no last.ckpt: give --ckpt_path one of them")
            restart = ckpt is None
        step = -1 if ckpt is None else int(read_checkpoint(ckpt, resume=True).get("global_step", 0))
        if ckpt is not None:
            check_budget_left(ckpt, config.trainer)
        if explicit:
            run_dir = Path(explicit)
        elif ckpt and Path(ckpt).name.startswith(("last", "hpc_ckpt_")) and (owner := checkpoint_run_dir(Path(ckpt))):
            run_dir = owner  # resume a run in its own folder
            self.lock = RunLock(run_dir, self.subcommand)
        else:
            configs = config.get("config") or []
            name = config.get("run_name") or (Path(str(configs[-1])).stem if configs else "run")
            return new_run_dir(Path(config.runs_dir), f"{name}-{timestamp()}"), ckpt
        if restart:
            self.restart = True
            if (run_dir / METRICS_NAME).is_file():
                rank_zero_info(f"fae: {run_dir} holds no checkpoint: starting its run again (its earlier rows of "
                               "metrics.csv move to metrics-superseded-*.csv)")  # fmt: skip
            return run_dir, None
        if holds_results(run_dir):
            last = run_dir / "checkpoints" / "last.ckpt"
            if ckpt is None and not any(run_dir.glob("checkpoints/*.ckpt")):
                raise UserError(
                    f"{run_dir} holds the metrics of a run that saved no checkpoint: start it again there with "
                    "--ckpt_path last (its rows are kept aside), or start a new run in a new folder (omit --run_dir)"
                )
            if ckpt is None:
                raise UserError(
                    f"{run_dir} already holds a run: resume it with --ckpt_path {last} (or last), or start a "
                    "new run in a new folder (omit --run_dir)"
                )
            if checkpoint_run_dir(Path(ckpt)) != run_dir.resolve():
                raise UserError(
                    f"{run_dir} already holds a run, and {ckpt} is not one of its checkpoints: continue from it in "
                    "a new folder (omit --run_dir), or resume this folder's own last.ckpt"
                )
            newest = self.checkpoint_step(str(last)) if last.is_file() else -1
            if newest > step:
                raise UserError(
                    f"{last} holds step {newest}, newer than {Path(ckpt).name} (step {step}): resuming here would "
                    "overwrite it; continue from the older checkpoint in a new folder (omit --run_dir)"
                )
        return run_dir, ckpt

    def evaluation_run_dir(self, config, explicit: str | None) -> tuple[Path, str | None]:
        """An evaluation's own folder, inside the run it evaluates, and its checkpoint."""
        ckpt = config.get("ckpt_path")
        if ckpt in ("last", "best"):
            ckpt = self.resolve_alias(ckpt, Path(explicit) if explicit else None)
        elif ckpt is None and not config.get("allow_untrained"):
            raise UserError(
                f"`fae {self.subcommand}` needs a trained model: give --ckpt_path RUN/checkpoints/last.ckpt "
                "(or last/best with --run_dir RUN); --allow_untrained true evaluates an untrained model on purpose"
            )
        elif ckpt is not None:
            self.checkpoint_step(ckpt)  # readable, or one line naming it
        owner = checkpoint_run_dir(Path(ckpt)) if ckpt else None
        if explicit and owner and holds_results(Path(explicit)) and Path(explicit).resolve() != owner:
            raise UserError(
                f"{ckpt} is a checkpoint of the run {owner}, not of {explicit}: omit --run_dir (the evaluation is "
                "filed under its own run)"
            )
        self.evaluates = owner or (Path(explicit) if explicit else None)
        if explicit or owner:
            return new_run_dir(Path(explicit) if explicit else owner, f"{self.subcommand}-{timestamp()}"), ckpt
        configs = config.get("config") or []
        name = config.get("run_name") or (Path(str(configs[-1])).stem if configs else "run")
        return new_run_dir(Path(config.runs_dir), f"{name}-{self.subcommand}-{timestamp()}"), ckpt

    @staticmethod
    def checkpoint_step(ckpt: str | None) -> int:
        """The global step a checkpoint holds (-1 for none); one line if it is missing or unreadable."""
        return -1 if ckpt is None else int(read_checkpoint(ckpt).get("global_step", 0))

    def after_instantiate_classes(self) -> None:
        """Fail on missing data before anything is written (a failed start's new folder is removed)."""
        if self.subcommand is not None:
            self.datamodule.check_available()

    # --- the trainer: CSV first (its folder is the run folder), then the config's loggers ----------
    def instantiate_trainer(self, **kwargs) -> Trainer:
        settings = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer", {})
        callbacks = settings.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if settings.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            # Lightning's bar redraws every step, and W&B captures each redraw: at the paper's width that
            # cost 2-4% of a WAE-GAN step here (benchmarks/framework_overhead.py); a bar of your own wins
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, MisconfigurationException) as err:  # e.g. devices, strategy
            raise UserError(f"trainer: {' '.join(str(err).split())}") from None
        loggers = [logger for logger in trainer.loggers if not isinstance(logger, RunCSVLogger)]
        for logger in loggers:
            if hasattr(logger, "set_run_folder"):
                job = "train" if self.subcommand in ("fit", None) else self.subcommand
                logger.set_run_folder(self.run_dir, self.evaluates, job)
        trainer.loggers = [RunCSVLogger(self.run_dir, supersede_all=self.restart), *loggers]
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            if self.lock is not None:
                self.lock.release()

    def after_fit(self) -> None:
        self.print_written("fit")

    def after_validate(self) -> None:
        self.print_written("validate")

    def after_test(self) -> None:
        self.print_written("test")

    def print_written(self, subcommand: str) -> None:
        """The files this command wrote, as they are on disk."""
        if not self.trainer.is_global_zero:
            return
        lines = [f"fae: {subcommand} done; run folder {self.run_dir}"]
        metrics = self.run_dir / METRICS_NAME
        if metrics.is_file():
            lines.append(f"  metrics:     {metrics}")
        callback = self.trainer.checkpoint_callback
        if subcommand == "fit" and callback is not None:
            last, best = Path(callback.last_model_path or ""), Path(callback.best_model_path or "")
            if last.is_file():
                lines.append(f"  last:        {last} (step {self.checkpoint_step(str(last))})")
            if best.is_file():
                lines.append(f"  best:        {best} (by {callback.monitor})")
        for name in ("robustness.json", "robustness.csv"):
            if (self.run_dir / name).is_file():
                lines.append(f"  robustness:  {self.run_dir / name}")
        images = sorted((self.run_dir / "images").glob("*.png")) if (self.run_dir / "images").is_dir() else []
        if images:
            lines.append(f"  images:      {self.run_dir / 'images'} ({len(images)} files)")
        print("\n".join(lines), flush=True)


def check_budget_left(ckpt: str, trainer) -> None:
    """A resumed fit must have something left to train: its checkpoint is below max_steps and max_epochs."""
    checkpoint = read_checkpoint(ckpt)
    step = int(checkpoint.get("global_step", 0))
    epochs_done = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs_done = int(epochs_done.get("completed", checkpoint.get("epoch", 0)))
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        raise UserError(f"{ckpt} is at step {step}, not below trainer.max_steps={max_steps}: raise it to train on")
    if max_epochs is not None and max_epochs >= 0 and epochs_done >= max_epochs:
        raise UserError(f"{ckpt} has {epochs_done} epochs done, not below trainer.max_epochs={max_epochs}: raise it")


def check_trainer_settings(trainer, fit: bool) -> None:
    """Trainer values Lightning would reject only after starting (or with a traceback), as one line."""
    for key, lowest in (("max_epochs", -1), ("max_steps", -1), ("min_epochs", 0), ("min_steps", 0)):
        value = trainer.get(key)
        if value is not None and value < lowest:
            raise UserError(f"trainer.{key} must be >= {lowest} (-1: no limit), got {value}")
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch", "log_every_n_steps"):
        value = trainer.get(key)
        if value is not None and value < 1:
            raise UserError(f"trainer.{key} must be >= 1, got {value}")
    interval = trainer.get("val_check_interval")
    if interval is not None and interval <= 0:
        raise UserError(f"trainer.val_check_interval must be > 0 (batches, or a fraction of an epoch), got {interval}")
    if fit:
        nothing = [f"trainer.{k}={trainer.get(k)}" for k in ("max_epochs", "max_steps") if trainer.get(k) == 0]
        if trainer.get("limit_train_batches") in (0, 0.0):
            nothing.append("trainer.limit_train_batches=0")
        if nothing:
            raise UserError(f"nothing to train with {', '.join(nothing)}: give a positive budget")


_PARSE_NOISE = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Problem with given class_path",
)


def summarize_parse_error(message: str) -> str:
    """jsonargparse's nested report of a bad key or value, as one line: `key.path: what is wrong`."""
    keys, details, given = [], [], None
    for raw in message.splitlines():
        line = raw.strip().lstrip("-").strip()
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if match:
            keys.append(match.group(1))
            line = match.group(2)
        if not line or line.startswith(_PARSE_NOISE) or "NoneType" in line:
            continue
        if line.startswith("Given value:"):
            given = None if "NestedArg" in line else line.split(":", 1)[1].strip()
            continue
        details.append(line)
    text = "; ".join(details) or message.strip().splitlines()[0]
    net_option = re.search(r"Option '(latent_dim|width|image_shape|image_size|gaussian)' is not accepted", text)
    if net_option and ".".join(keys).endswith((".encoder", ".decoder")):
        return f"{'.'.join(keys)}.{net_option.group(1)}: {NET_OPTION_MOVED}"
    if given is not None and "Got value" not in text:
        text += f", got {given!r}"
    return f"{'.'.join(keys)}: {text}" if keys else text


def upgrade_hparams(hparams: dict) -> dict:
    """A checkpoint's model hyperparameters in today's form: those written when each net took its own
    latent_dim and width (and gaussian, image_size) have them moved to the model, where they are now
    stated once; the weights are the same. Lightning's instantiator marker is dropped."""
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    for net in ("encoder", "decoder"):
        spec = hparams.get(net)
        if isinstance(spec, dict) and isinstance(spec.get("init_args"), dict):
            args = dict(spec["init_args"])
            for key in ("latent_dim", "width"):
                if key in args:
                    hparams.setdefault(key, args.pop(key))
            args.pop("gaussian", None)  # the family's
            args.pop("image_size", None)  # the data's
            hparams[net] = {**spec, "init_args": args}
    return hparams


# a net's latent_dim, width, image shape and heads are the model's, stated once (fae.nets.contract)
NET_OPTION_MOVED = (
    "the nets take latent_dim, width and the image shape from the model: set --model.latent_dim and "
    "--model.width once (the image shape is the data's; a family chooses one head or two), and remove them "
    "from the nets' init_args (a config written before this change needs that edit)"
)


class Stopped(SystemExit):
    """The command was stopped by a signal outside training (before it, in a validation, in a test)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(128 + getattr(signal, signal_name))
        self.signal_name = signal_name


def stop_now(signum: int, frame) -> None:
    """SIGTERM/SIGINT outside training: stop at once (during training fae.checkpoint's handlers save first)."""
    raise Stopped(signal.Signals(signum).name)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `fae` console script."""
    inherited = os.environ.get(RUN_DIR_ENV)
    argv = sys.argv[1:] if args is None else args
    outside = argv[0] if argv[:1] in (["report"], ["sample"], ["classifier"]) else None  # beside LightningCLI's
    subcommand = outside or next((a for a in argv if a in FaeCLI.subcommands()), "")
    failed = True
    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.signal(s, stop_now) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
    try:
        if outside == "report":
            from fae.evaluation.report import main as report_main

            report_main(argv[1:])
        elif outside == "sample":
            from fae.evaluation.samples import main as sample_main

            sample_main(argv[1:])
        elif outside == "classifier":
            from fae.evaluation.features import main as classifier_main

            classifier_main(argv[1:])
        else:
            FaeCLI(args=args)
        failed = False
    except ArgumentError as err:
        fail(f"{summarize_parse_error(str(err))} (see `fae{' ' + subcommand if subcommand else ''} --help`)")
    except Preempted as stop:
        if global_rank_from_env() != 0:  # rank zero says it once
            sys.exit(stop.code)
        print(
            f"fae: stopped by {stop.signal_name} at step {stop.step}; {stop.checkpoint} holds that state. "
            f"Resume with: {resume_command(argv, stop.checkpoint)}",
            file=sys.stderr,
        )
        sys.exit(stop.code)
    except Stopped as stop:
        remove_failed_starts()
        if global_rank_from_env() == 0:
            where = f" during `fae {subcommand}`" if subcommand else ""
            print(f"fae: stopped by {stop.signal_name}{where}; nothing was saved at the stop", file=sys.stderr)
        sys.exit(stop.code)
    except Exception as err:
        user = find_user_error(err)
        if user is not None:
            fail(user_message(user))
        if "can't allocate memory" in str(err):  # also as quoted by jsonargparse from a net's constructor
            fail("not enough memory to build the nets: lower --model.width")
        if isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict"):
            fail(
                f"the checkpoint does not fit this model ({short_reason(err).strip()[:150]}): use the config it was "
                "trained with (config.yaml in its run folder)"
            )
        if isinstance(err, MisconfigurationException) or is_trainer_setting_error(err):
            fail(short_reason(err) if len(str(err)) > 400 else " ".join(str(err).split()))
        raise
    finally:
        release_all()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if failed:
            remove_failed_starts()
        _CREATED.clear()
        if inherited is None:  # a later invocation in this process must not reuse this run's folder
            os.environ.pop(RUN_DIR_ENV, None)


def is_trainer_setting_error(err: BaseException) -> bool:
    """Lightning's ValueErrors about a Trainer setting (their messages start with the `argument`),
    such as a val_check_interval beyond the epoch, which it can only tell once the data is known."""
    return isinstance(err, ValueError) and re.match(r"\s*`\w+`", str(err)) is not None


def fail(message: str) -> None:
    print(f"fae: error: {message}", file=sys.stderr)
    sys.exit(2)


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`: itself, one in its chain of causes, or the one jsonargparse folded
    into the message of its own error when a constructor raised it."""
    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    latest = UserError.latest
    return latest if latest is not None and str(latest) and str(latest) in str(err) else None


def remove_failed_starts() -> None:
    """Remove the folders this command made, when it failed before writing any result into them."""
    for path in _CREATED:
        results = [*path.rglob("*.ckpt"), *path.rglob(METRICS_NAME)] if path.is_dir() else [None]
        if not results:
            shutil.rmtree(path, ignore_errors=True)


def resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that resumes a stopped `fae fit`: the same arguments, --ckpt_path the checkpoint."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--ckpt_path", "--run_dir", "--run_name"):
            skip = True
            continue
        if not arg.startswith(("--ckpt_path=", "--run_dir=", "--run_name=")):
            kept.append(arg)
    return shlex.join(["fae", *kept, "--ckpt_path", checkpoint])


if __name__ == "__main__":
    main()
