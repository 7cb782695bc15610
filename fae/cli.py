"""The `fae` command: LightningCLI with fae's run folders, checkpoints and loggers.

    fae fit      --config configs/mnist_vae.yaml [--key value ...]
    fae validate --config ... --ckpt_path CKPT
    fae test     --config ... --ckpt_path CKPT
    fae predict  --config ... --ckpt_path CKPT
    fae report   RUN_DIR... [--out DIR]        (fae.evaluation.report)

Arguments are the `__init__` signatures of the model, the data module and the Trainer (see
`fae fit --help` and `--print_config`); jsonargparse rejects an unknown key or a wrong type before
anything is built. What fae adds to LightningCLI:

  - a run folder per invocation, RUNS_DIR/<run_name>-<timestamp> for `fit`, and
    <training run>/<subcommand>-<timestamp> for an evaluation of a checkpoint that lives in a run
    folder. It holds config.yaml, metrics.csv, checkpoints/, images/ and wandb/. Worker processes
    that DDP starts receive it through FAE_RUN_DIR; on several nodes set `--run_dir` explicitly;
  - every run writes its metrics to RUN/metrics.csv (a CSVLogger is always added), beside the loggers
    of the config (W&B by default, fae.tracking.WandbLogger);
  - checkpoints RUN/checkpoints/last.ckpt (the newest state, fae.checkpoint) and the best by
    `--checkpoint.monitor` (val/loss);
  - under `fae test`, the robustness sweep (`--sweep.*`, fae.evaluation.RobustnessSweep), written to
    robustness.json and robustness.csv in the test's folder;
  - user errors (fae.errors.UserError, a missing checkpoint) end the command with one line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_info

from fae.checkpoint import Checkpoint
from fae.data.base import InMemoryImageDataModule
from fae.errors import UserError, user_message
from fae.evaluation import RobustnessSweep
from fae.models.base import AutoEncoder

RUN_DIR_ENV = "FAE_RUN_DIR"
# Lightning advertises a cloud logger at every start; fae's output stays about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")
)
# ... and trips a deprecated torch pytree call at every run, which is nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
CHECKPOINT_ALIASES = {"last", "best", "hpc", "registry"}


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def new_run_dir(parent: Path, name: str) -> Path:
    """parent/name, made unique with a numeric suffix. Not created here: the loggers and the
    checkpoint callback create it when they first write, so a command that fails early leaves none."""
    path = parent / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = parent / f"{name}-{suffix}"
    return path


class FaeCLI(LightningCLI):
    """LightningCLI with run folders, an always-on CSV log and checkpoints; see the module docstring."""

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            model_class=AutoEncoder,
            subclass_mode_model=True,
            datamodule_class=InMemoryImageDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # evaluation differentiates (the posterior Fisher divergence, the Fisher objective):
            # torch.no_grad instead of inference mode, so that enable_grad can turn gradients back on
            trainer_defaults={"inference_mode": False},
            # parse errors raise (main() prints them as one line) instead of printing the whole usage
            parser_kwargs={
                "description": "fae: Fisher auto-encoders and their baselines. "
                "Also: `fae report RUN_DIR... [--out DIR]` compares the robustness sweeps of runs.",
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
            help=f"Use this exact run folder (default: a new one; {RUN_DIR_ENV} also sets it).",
        )
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(RobustnessSweep, "sweep")  # acts under `fae test` only
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    # --- before anything is built ----------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in CHECKPOINT_ALIASES and not Path(ckpt_path).is_file():
            raise UserError(f"checkpoint not found: {ckpt_path} (give the path of a .ckpt file)")
        self.run_dir = self.resolve_run_dir(config, ckpt_path)
        os.environ[RUN_DIR_ENV] = str(self.run_dir)  # DDP's worker processes inherit it
        config.trainer.default_root_dir = str(self.run_dir)
        if config.checkpoint.dirpath is None:  # evaluations keep pointing at the checkpoints they read
            is_file = bool(ckpt_path) and Path(ckpt_path).is_file()
            evaluated = Path(ckpt_path).parent if is_file and self.subcommand != "fit" else None
            config.checkpoint.dirpath = str(evaluated or self.run_dir / "checkpoints")

    def resolve_run_dir(self, config, ckpt_path: str | None) -> Path:
        explicit = config.get("run_dir") or os.environ.get(RUN_DIR_ENV)
        if explicit:
            return Path(explicit)
        if self.subcommand != "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
            return new_run_dir(Path(ckpt_path).parent.parent, f"{self.subcommand}-{timestamp()}")
        configs = config.get("config") or []
        name = config.get("run_name") or (Path(str(configs[-1])).stem if configs else "run")
        return new_run_dir(Path(config.runs_dir), f"{name}-{timestamp()}")

    def after_instantiate_classes(self) -> None:
        """Fail on missing data now, before loggers start a run (W&B would record an empty one)."""
        self.datamodule.check_available()

    # --- the trainer: CSV first (its folder is the run folder), then the config's loggers ----------
    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        loggers = [logger for logger in trainer.loggers if not isinstance(logger, CSVLogger)]
        for logger in loggers:
            if hasattr(logger, "set_run_folder"):
                logger.set_run_folder(self.run_dir)
        # The run folder already holds config.yaml and checkpoints/: CSVLogger's warning about a
        # non-empty folder is expected (it only ever rewrites its own metrics.csv).
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        csv: Logger = CSVLogger(save_dir=self.run_dir, name="", version="")
        trainer.loggers = [csv, *loggers]
        return trainer

    def after_fit(self) -> None:
        best = Path(self.trainer.checkpoint_callback.best_model_path or "").name or "none yet"
        rank_zero_info(
            f"fae: run folder {self.run_dir}\n"
            f"  metrics:     {self.run_dir / 'metrics.csv'}\n"
            f"  checkpoints: {self.run_dir / 'checkpoints' / 'last.ckpt'} (best by {self.checkpoint_monitor}: {best})"
        )

    @property
    def checkpoint_monitor(self) -> str:
        return self.config[self.subcommand].checkpoint.monitor


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
    if given is not None and "Got value" not in text:
        text += f", got {given!r}"
    return f"{'.'.join(keys)}: {text}" if keys else text


def main(args: list[str] | None = None) -> None:
    """Entry point of the `fae` console script."""
    inherited = os.environ.get(RUN_DIR_ENV)
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["report"]:
            from fae.evaluation.report import main as report_main

            return report_main(argv[1:])
        FaeCLI(args=args)
    except ArgumentError as err:
        subcommand = next((f" {a}" for a in argv if a in FaeCLI.subcommands()), "")
        print(f"fae: error: {summarize_parse_error(str(err))} (see `fae{subcommand} --help`)", file=sys.stderr)
        sys.exit(2)
    except UserError as err:
        print(f"fae: error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    finally:  # a later invocation in this process must not reuse this run's folder
        if inherited is None:
            os.environ.pop(RUN_DIR_ENV, None)


if __name__ == "__main__":
    main()
