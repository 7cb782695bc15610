"""Where a run's results go: W&B that never hangs or crashes offline, image files in the run folder, and
the one picture of reconstructions (`reconstruction_grid`) that validation and the sweep both draw.

`WandbLogger` is Lightning's W&B logger with one decision added, its mode:
  - WANDB_MODE, when set, is honoured as W&B itself honours it;
  - otherwise `mode="auto"` logs online where credentials exist (WANDB_API_KEY or a netrc entry for
    the W&B host) and offline where they do not, saying so in one line with the command that syncs
    the run later;
  - an online start that fails (no network, a bad key) falls back to offline with one line, instead
    of stopping the training;
  - the run ends with the command that started it (`finish_wandb_run`), marked failed if it failed.
`flat_config` turns a resolved CLI config into {flag: value} (`data.batch_size`, `trainer.max_epochs`,
`seed_everything`, ...): what the CLI gives each logger as the run's hyperparameters, so that a W&B
dashboard can group, filter and sort runs by any setting (Lightning logs only the model's).
The local CSV copy of every metric is not here: the CLI (fae.cli) adds a CSVLogger to every run.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import yaml
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid, save_image


def flat_config(node, prefix: str = "") -> dict:
    """{dotted key: value} of a nested config, keys as the command line spells them: `class_path`
    kept under its parent's name, `init_args` levels dropped."""
    flat: dict = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("init_args", "dict_kwargs"):
                flat |= flat_config(value, prefix)
            elif key == "class_path":
                flat[prefix.rstrip(".") or key] = value
            else:
                flat |= flat_config(value, f"{prefix}{key}.")
    elif isinstance(node, list) and any(isinstance(item, dict) for item in node):
        for i, item in enumerate(node):
            flat |= flat_config(item, f"{prefix}{i}.")
    else:
        flat[prefix.rstrip(".")] = node
    return flat


def wandb_credentials_found() -> bool:
    """True when W&B could authenticate: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(mode: str) -> str:
    """The W&B mode a run will use: WANDB_MODE if set, else `mode`, with "auto" made concrete."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    if mode == "auto":
        return "online" if wandb_credentials_found() else "offline"
    return mode


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger whose mode is chosen so that a run never hangs or crashes for W&B."""

    def __init__(
        self,
        project: str = "fae",
        name: str | None = None,
        save_dir: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        entity: str | None = None,
        notes: str | None = None,
        mode: Literal["auto", "online", "offline", "disabled"] = "auto",
        log_model: bool = True,
        init_timeout: float = 30.0,
    ) -> None:
        """
        Args:
            project: W&B project; runs to be compared belong to one project.
            name: run name (the CLI sets it to the run folder's name when unset).
            save_dir: where W&B writes its files (the CLI sets it to the run folder when unset).
            group: W&B group, e.g. the experiment that several families' runs belong to.
            tags: W&B tags, e.g. the model family and the data set.
            entity: W&B user or team.
            notes: free text shown with the run.
            mode: "auto" = online with credentials, offline without; WANDB_MODE overrides it.
            log_model: the checkpoints (last and best) as a W&B artifact of the run at the end of training
                (offline too: uploaded by `wandb sync`); false leaves them out.
            init_timeout: seconds an online start may take before falling back to offline.
        """
        import wandb

        self.mode = resolve_wandb_mode(mode)
        self.init_timeout = init_timeout
        self.training_run: Path | None = None
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir or ".",
            group=group,
            tags=tags,
            entity=entity,
            notes=notes,
            log_model=log_model,
            mode=self.mode,
            settings=wandb.Settings(init_timeout=init_timeout, silent=True),
        )
        self._wandb_init.pop("anonymous", None)  # deprecated in wandb; passing None only warns

    def set_run_folder(
        self,
        run_dir: Path,
        evaluates: Path | None = None,
        job_type: str = "train",
        resume: bool = False,
        experiment: str | None = None,
        variant: str | None = None,
        seed: int | None = None,
    ) -> None:
        """Called by the CLI before the run starts: W&B files and the run name follow the run folder.
        - a training run is named after its folder; one of an experiment (`experiment`, `variant`) is
          named `<variant>/seed<seed>`, in the experiment's group, tagged with the variant;
        - a resumed training run (`resume`) continues the W&B run its folder logged;
        - an evaluation (`job_type` validate/test/predict) of a training run's checkpoint (`evaluates`,
          that run's folder) is named `<training run>/<evaluation>` and joins the training run's group;
          its summaries also go to the training run's row (`write_to_training_run`)."""
        if self._wandb_init.get("dir") in (None, "."):
            self._wandb_init["dir"] = self._save_dir = str(run_dir)
        trained = f"{variant}/seed{seed}" if variant else (evaluates.name if evaluates is not None else None)
        if self._wandb_init.get("name") is None:
            name = f"{trained}/{run_dir.name}" if evaluates is not None else trained or run_dir.name
            self._wandb_init["name"] = self._name = name
        self._wandb_init["job_type"] = job_type
        group = experiment or (training_group(evaluates) if evaluates is not None else None)
        if group:
            self._wandb_init["group"] = group
        if variant:
            self._wandb_init["tags"] = [*(self._wandb_init.get("tags") or []), variant]
        previous = wandb_run_ids(run_dir) if resume and job_type == "train" else []
        if previous:
            self._wandb_init.update(id=previous[-1], resume="allow")
        self.training_run = evaluates

    def write_to_training_run(self, values: dict[str, float]) -> str | None:
        """`values` (the test's summaries) into the summary of the W&B run of the training run this
        evaluation's checkpoint belongs to, resumed by its id (offline: a second folder of that id, which
        `wandb sync` merges), so that the runs table has one row per trained model with its robustness.
        Returns that run's id; None when the training run logged no W&B run. Never stops the command."""
        ids = wandb_run_ids(self.training_run) if self.training_run is not None else []
        if not ids or self.mode == "disabled":
            return None
        import wandb

        try:
            run = wandb.init(
                id=ids[-1],
                resume="allow",
                project=self._wandb_init.get("project"),
                entity=self._wandb_init.get("entity"),
                dir=str(self.training_run),
                mode=self.mode,
                reinit="create_new",
                settings=wandb.Settings(init_timeout=self.init_timeout, silent=True),
            )
            run.summary.update(values)
            run.finish()
        except Exception as err:  # wandb's own errors, of the network or the server
            rank_zero_warn(f"W&B: the test's summaries stay in the test run only ({type(err).__name__}: {err})")
        return ids[-1]

    @property
    @rank_zero_experiment
    def experiment(self):
        """Lightning's W&B run, started offline after one line when online is not possible."""
        if self._experiment is None:
            Path(self._save_dir).mkdir(parents=True, exist_ok=True)  # W&B wants its folder to exist
        if self._experiment is None and self.mode == "offline":
            why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no W&B credentials found"
            rank_zero_info(
                f"W&B: {why}, logging offline to {self._save_dir}/wandb; "
                f"sync later with `wandb sync {self._save_dir}/wandb/offline-run-*`"
            )
        try:
            return super().experiment
        except Exception as err:  # wandb raises its own errors for network and auth failures
            if self.mode != "online":
                raise
            rank_zero_warn(
                f"W&B: online start failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                f"logging offline instead. Sync later with `wandb sync {self._save_dir}/wandb/offline-run-*`"
            )
            self.mode = self._wandb_init["mode"] = "offline"
            return super().experiment


def finish_wandb_run(exit_code: int) -> None:
    """End the W&B run a command started, if any (its files complete, offline too), with the command's exit
    status (143 for a run stopped by SIGTERM): one command is one run, and a later command in the same
    process starts its own."""
    import sys

    wandb = sys.modules.get("wandb")  # imported only by a command that logged to W&B
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)


RUN_FOLDER = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([a-z0-9]+)(?:-\d+)?$")  # wandb/<its run folders>


def wandb_run_ids(folder: Path) -> list[str]:
    """The ids of the W&B runs logged in folder/wandb, the oldest first (a resumed run's once)."""
    found = sorted(match.groups() for p in (folder / "wandb").glob("*run-*") if (match := RUN_FOLDER.match(p.name)))
    return list(dict.fromkeys(run_id for _, run_id in found))


def training_group(run_dir: Path) -> str | None:
    """The W&B group a training run was logged in, from its config.yaml: its experiment's, or its logger's
    (None if it had none)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if config.get("experiment"):
        return config["experiment"]
    logger = (config.get("trainer") or {}).get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, dict) and "Wandb" in str(entry.get("class_path", "")):
            return (entry.get("init_args") or {}).get("group")
    return None


def interleave_rows(top: Tensor, bottom: Tensor, per_row: int) -> Tensor:
    """Rows of `per_row` images alternating top, bottom, top, ...: the paper's figure layout
    (true images on odd rows, reconstructions on even rows). Both (N, C, H, W) -> (2N, C, H, W)."""
    n = (len(top) // per_row) * per_row
    c, h, w = top.shape[1:]
    rows = torch.stack([top[:n].reshape(-1, per_row, c, h, w), bottom[:n].reshape(-1, per_row, c, h, w)], 1)
    return rows.reshape(-1, c, h, w)


def reconstruction_grid(images: Tensor, recon: Tensor, per_row: int = 8) -> Tensor:
    """The one picture of reconstructions, in validation and in the sweep: images (N, C, H, W) in [0, 1]
    on odd rows, their reconstructions on even rows, `per_row` a row -> (C, H', W')."""
    per_row = min(per_row, len(images))
    return make_grid(interleave_rows(images, recon, per_row), nrow=per_row, padding=1)


def sample_grid(samples: Tensor, per_row: int = 8) -> Tensor:
    """Generated images (N, C, H, W) in [0, 1], `per_row` a row -> (C, H', W')."""
    return make_grid(samples, nrow=min(per_row, len(samples)), padding=1)


@rank_zero_only
def save_grid(grid: Tensor, run_dir: str | Path, key: str, step: int) -> Path:
    """Write an image grid (C, H, W) in [0, 1] to RUN_DIR/images/<key>_step<step>.png."""
    path = Path(run_dir) / "images" / f"{key.replace('/', '_')}_step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def log_image_grid(trainer, key: str, grid: Tensor) -> None:
    """Send an image grid to every logger that takes images (W&B) and, as a PNG, to the log folder
    (the run folder under the CLI). A Trainer without loggers writes nothing."""
    if not trainer.loggers:
        return
    # not trainer.log_dir: it broadcasts across devices, and only rank zero logs images
    folder = getattr(trainer.loggers[0], "log_dir", None) or trainer.default_root_dir
    save_grid(grid, folder, key, trainer.global_step)
    for logger in trainer.loggers:
        if isinstance(logger, LightningWandbLogger):
            logger.log_image(key=key, images=[grid], step=trainer.global_step)
