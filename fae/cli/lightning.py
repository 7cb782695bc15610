"""The Lightning commands, `fae fit | validate | test | predict`: LightningCLI on fae's run folders.

Arguments are the `__init__` signatures of the model, the data module and the Trainer (`fae fit
--help`, `--print_config`); jsonargparse rejects an unknown key or a wrong type before anything is
built. What fae adds to LightningCLI, in the order it happens:

  - before anything is seeded or built, the run is planned (fae.plan: its folder, its checkpoint, or a
    refusal in one line), and a model is rebuilt as its checkpoint records it (differences named in
    one line);
  - before the classes are instantiated, the run folder is made and locked (fae.runs) and becomes the
    Trainer's root and the checkpoints' folder; Lightning's worker processes receive it through
    FAE_RUN_DIR;
  - the data module's image shape is linked to the model, which builds its nets from it (stated once);
  - every Trainer logs RUN/metrics.csv (fae.metrics_log.RunCSVLogger) beside the config's loggers, writes
    checkpoints atomically (fae.checkpoint), and redraws its progress bar every few batches;
  - `--checkpoint.*` configures fae.checkpoint.Checkpoint, `--sweep.*` the robustness sweep that
    `fae test` runs (fae.evaluation.RobustnessSweep);
  - when a command ends, the files it wrote are listed.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from fae.checkpoint import AtomicCheckpointIO, Checkpoint, CheckpointFacts, checkpoint_facts, forget_checkpoints
from fae.data.base import InMemoryImageDataModule
from fae.errors import UserError
from fae.evaluation import RobustnessSweep
from fae.metrics_log import RunCSVLogger
from fae.models.base import AutoEncoder
from fae.plan import Plan, Request, checkpoint_run_dir, folder_to_lock, import_class, plan
from fae.runs import (
    METRICS_NAME,
    RUN_DIR_ENV,
    RunLock,
    global_rank_from_env,
    make_run_folder,
    several_processes_from_env,
)
from fae.tracking import flat_config, run_config

# the bar is redrawn every 10 batches: W&B captures every redraw (benchmarks/framework_overhead.py)
PROGRESS_BAR_REFRESH_STEPS = 10
# Lightning advertises a cloud logger at every start; fae's output stays about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")
)
# ... and trips a deprecated torch pytree call at every run, which is nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class SaveConfig(SaveConfigCallback):
    """config.yaml in the run folder and, for every other logger (W&B), the whole resolved config as
    the run's hyperparameters: model, data, trainer, seed, sweep, checkpoint, as {flag: value}."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        config = flat_config(self.config.as_dict())
        for logger in trainer.loggers:
            if not isinstance(logger, RunCSVLogger):  # the CSV logger's copy is config.yaml
                logger.log_hyperparams(config)


class FaeCLI(LightningCLI):
    """LightningCLI with planned run folders, an always-on CSV log and checkpoints (module docstring)."""

    def __init__(self, args=None, run: bool = True) -> None:
        self.lock: RunLock | None = None
        self.plan: Plan | None = None
        self.run_dir: Path | None = None
        self.trained_seed: int | None = None  # an evaluation's: its training run's seed
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
            # parse errors raise (fae.cli.failures prints them as one line) instead of printing the usage
            parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in self.subcommands()}},
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
            "--experiment",
            type=str | None,
            default=None,
            help="The experiment this run belongs to: its W&B group (`fae experiment` sets it).",
        )
        parser.add_argument(
            "--variant",
            type=str | None,
            default=None,
            help="The run's variant in its experiment: its W&B name is <variant>/seed<seed>, and a tag.",
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

    # --- before anything is seeded or built: the plan ------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Plan the run (fae.plan), holding its folder first when it exists, and rebuild the model as the
        checkpoint records it (its weights need that architecture)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        check_settings(config, subcommand)
        request = request_of(config, subcommand)
        folder = folder_to_lock(request)
        if folder is not None:
            self.lock = RunLock(folder, subcommand)
        self.plan = plan(request)
        forget_checkpoints(keep=self.plan.ckpt)  # the one to load stays for Lightning's restore
        config.ckpt_path = str(self.plan.ckpt) if self.plan.ckpt is not None else None  # no alias reaches Lightning
        if self.plan.ckpt is not None:
            self.rebuild_model(checkpoint_facts(self.plan.ckpt), subcommand)
            config = self.config[subcommand]  # the rebuilt config, a new object
        if subcommand == "fit" and self.plan.ckpt is not None and not self.plan.new and global_rank_from_env() == 0:
            changed = stream_changes(run_config(self.plan.run_dir), config.as_dict())
            if changed:
                print(f"fae: this resume changes what fixes the run's data stream against its config.yaml "
                      f"({', '.join(changed)}): it goes on, but its weights will no longer be those of an "
                      "uninterrupted run", file=sys.stderr)  # fmt: skip
        trained = run_config(self.plan.evaluates) if subcommand != "fit" and self.plan.evaluates else {}
        for key in ("experiment", "variant"):  # an evaluation is of its training run's experiment and variant
            if config.get(key) is None and trained.get(key):
                config[key] = trained[key]
        self.trained_seed = trained.get("seed_everything") if subcommand != "fit" else None

    def rebuild_model(self, facts: CheckpointFacts, subcommand: str) -> None:
        """As LightningCLI._parse_ckpt_path, on the checkpoint's hyperparameters in today's form; the
        settings of the config that the checkpoint overrides are named in one line."""
        given = self.config[subcommand].model.clone()
        if facts.hparams or facts.class_path:
            model = (
                {"class_path": facts.class_path, "dict_kwargs": facts.hparams} if facts.class_path else facts.hparams
            )
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        used = self.config[subcommand].model
        before, after = flat_config(given.as_dict(), "model."), flat_config(used.as_dict(), "model.")
        linked = "model.image_shape"  # the data's at instantiation, whatever the checkpoint says
        changed = [
            f"{k} {before[k]} -> {v}" for k, v in after.items() if k in before and before[k] != v and k != linked
        ]
        if changed and global_rank_from_env() == 0:
            print(f"fae: the model is built as {facts.path} records it: {', '.join(changed)}", file=sys.stderr)

    # --- before the classes are built: the run folder ----------------------------------------------
    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # FaeCLI(args, run=False): the objects only, no run folder
            check_settings(self.config, None)
            self.run_dir = Path(self.config.get("run_dir") or Path(self.config.runs_dir) / "unused")
            return
        config, plan = self.config[self.subcommand], self.plan
        if global_rank_from_env() == 0:
            self.run_dir = make_run_folder(plan.run_dir, unique=plan.new)
            if self.lock is None:  # claim the folder: one live run at a time
                self.lock = RunLock(self.run_dir, self.subcommand)
            self.save_config_kwargs["config_filename"] = plan.config_name  # a resume's beside the first
            if plan.note:
                rank_zero_info(plan.note)
        else:  # a worker of rank zero's run: its folder exists
            self.run_dir = plan.run_dir
        os.environ[RUN_DIR_ENV] = str(self.run_dir)  # Lightning's worker processes inherit it
        config.trainer.default_root_dir = str(self.run_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(plan.checkpoint_dirpath or self.run_dir / "checkpoints")

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
            # Lightning's bar redraws every step and W&B captures each redraw; a bar of your own wins
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, MisconfigurationException) as err:  # e.g. devices, strategy
            raise UserError(f"trainer: {' '.join(str(err).split())}") from None
        loggers = [logger for logger in trainer.loggers if not isinstance(logger, RunCSVLogger)]
        plan, config = self.plan, self.config[self.subcommand] if self.subcommand else self.config
        training = self.subcommand in ("fit", None)
        for logger in loggers:
            if hasattr(logger, "set_run_folder"):
                logger.set_run_folder(
                    self.run_dir,
                    plan.evaluates if plan else None,
                    job_type="train" if training else self.subcommand,
                    resume=bool(plan and plan.ckpt is not None and not plan.new),  # continues its folder's run
                    experiment=config.get("experiment"),
                    variant=config.get("variant"),
                    seed=config.get("seed_everything") if training else self.trained_seed,
                    summarize_into=checkpoint_run_dir(plan.ckpt) if plan and plan.ckpt and not training else None,
                )
        trainer.loggers = [RunCSVLogger(self.run_dir, supersede_all=bool(plan and plan.restart)), *loggers]
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
        if (self.run_dir / METRICS_NAME).is_file():
            lines.append(f"  metrics:     {self.run_dir / METRICS_NAME}")
        callback = self.trainer.checkpoint_callback
        if subcommand == "fit" and callback is not None:
            last, best = Path(callback.last_model_path or ""), Path(callback.best_model_path or "")
            step = getattr(callback, "last_saved_step", None)
            if last.is_file():
                lines.append(f"  last:        {last}" + (f" (step {step})" if step is not None else ""))
            if best.is_file():
                lines.append(f"  best:        {best} (by {callback.monitor})")
        for name in ("robustness.json", "robustness.csv"):
            if (self.run_dir / name).is_file():
                lines.append(f"  robustness:  {self.run_dir / name}")
        images = sorted((self.run_dir / "images").glob("*.png")) if (self.run_dir / "images").is_dir() else []
        if images:
            lines.append(f"  images:      {self.run_dir / 'images'} ({len(images)} files)")
        print("\n".join(lines), flush=True)


# what fixes the batches a run trains on, besides the data module's arguments (those that do not: NOT_STREAM)
STREAM = ("seed_everything", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes",
          "trainer.limit_train_batches")  # fmt: skip
NOT_STREAM = ("data.num_workers", "data.eval_batch_size", "data.data_dir", "data.download")


def stream_changes(recorded: dict, now: dict) -> list[str]:
    """The settings of `now` that fix the data stream and differ from a run's recorded config.yaml."""
    if not recorded:
        return []
    before, after = flat_config(recorded), flat_config(now)
    keys = [
        k for k in {**before, **after} if (k in STREAM or k == "data" or k.startswith("data.")) and k not in NOT_STREAM
    ]
    return [f"{k} {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k)]


def request_of(config, subcommand: str) -> Request:
    """The planner's request from a parsed config (fae.plan)."""
    configs = config.get("config") or []
    trainer = config.trainer
    return Request(
        subcommand=subcommand,
        ckpt_path=config.get("ckpt_path"),
        run_dir=config.get("run_dir") if config.get("run_dir") is not None else os.environ.get(RUN_DIR_ENV),
        runs_dir=config.runs_dir,
        run_name=config.get("run_name"),
        config_name=Path(str(configs[-1])).stem if configs else "run",
        allow_untrained=bool(config.get("allow_untrained")),
        checkpoint_dirpath=config.checkpoint.dirpath,
        max_steps=trainer.get("max_steps"),
        max_epochs=trainer.get("max_epochs"),
        model_class_path=config.model.class_path,
        rank_zero=global_rank_from_env() == 0,
        several_processes=(trainer.get("num_nodes") or 1) > 1 or several_processes_from_env(),
        now=time.strftime("%Y%m%d-%H%M%S"),
    )


def check_settings(config, subcommand: str | None) -> None:
    """The settings fae refuses before planning: the model's image shape given by hand, and the Trainer's."""
    shape = config.model.init_args.get("image_shape")
    if shape is not None and tuple(shape) != inspect.signature(AutoEncoder).parameters["image_shape"].default:
        raise UserError(
            f"the model's image_shape {list(shape)} is the data's, not a setting: the CLI passes the data module's "
            "image shape to the nets (for CelebA set --data.image_size)"
        )
    check_trainer_settings(config.trainer, fit=subcommand == "fit")
    family = import_class(config.model.class_path)
    strategy = config.trainer.get("strategy")
    if getattr(family, "needs_unused_parameters", False) and isinstance(strategy, str) and strategy == "ddp":
        raise UserError(
            f"the {family.__name__}'s optimizer steps each use part of the parameters: under DDP use "
            "--trainer.strategy ddp_find_unused_parameters_true"
        )


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
