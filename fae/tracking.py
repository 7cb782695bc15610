"""W&B for fae's runs: a logger that never hangs or crashes offline, and that names, groups and links
the runs so that a project compares them (one row per trained model).

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

import contextlib
import io
import netrc
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import yaml
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fae.runs import in_use


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
    """True when W&B could authenticate: WANDB_API_KEY or a netrc entry for the W&B host (looked up here,
    without importing wandb), else whatever `wandb.login(prompt=False, verify=False)` finds (a key in W&B's
    settings file, an identity token file); it asks no one and reaches no server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        entry = None
    if entry and entry[2]:
        return True
    try:
        import wandb

        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # wandb's own errors: no credentials it can use
        return False


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
        summarize_into: Path | None = None,
    ) -> None:
        """Called by the CLI before the run starts: W&B files and the run name follow the run folder.
        - a training run is named after its folder; one of an experiment (`experiment`, `variant`) is
          named `<variant>/seed<seed>`, in the experiment's group, tagged with the variant;
        - a resumed training run (`resume`) continues the W&B run its folder logged;
        - an evaluation (`job_type` validate/test/predict) filed under a training run (`evaluates`, its
          folder) is named `<training run>/<evaluation>` and joins the training run's group; its
          summaries also go to the row of the run whose checkpoint it evaluates (`summarize_into`,
          `write_to_training_run`)."""
        if self._wandb_init.get("dir") in (None, "."):
            self._wandb_init["dir"] = self._save_dir = str(run_dir)
        trained = run_label(variant, seed) or (evaluates.name if evaluates is not None else None)
        if self._wandb_init.get("name") is None:
            name = f"{trained}/{run_dir.name}" if evaluates is not None else trained or run_dir.name
            self._wandb_init["name"] = self._name = name
        self._wandb_init["job_type"] = job_type
        group = experiment or (training_group(evaluates) if evaluates is not None else None)
        if group:
            self._wandb_init["group"] = group
        tags = [*(self._wandb_init.get("tags") or []), *([variant] if variant else [])]
        self._wandb_init["tags"] = list(dict.fromkeys(tags))  # the config's (data set, family), the variant
        previous = wandb_run_ids(run_dir) if resume and job_type == "train" else []
        if previous:
            self._wandb_init.update(id=previous[-1], resume="allow")
        self.training_run = summarize_into

    def write_to_training_run(self, values: dict[str, float]) -> str | None:
        """`values` (the test's summaries) into the summary of the W&B run of the training run whose
        checkpoint this evaluation tested, resumed by its id in its own project and mode (an offline run
        gets a second folder of its id, which `wandb sync` merges; an online one that cannot be reached,
        too), so that the runs table has one row per trained model with its robustness. Returns that
        run's id; None when there is none to write to, or its training is still live. Never stops the
        command."""
        ids = wandb_run_ids(self.training_run) if self.training_run is not None else []
        if not ids or self.mode == "disabled":
            return None
        if in_use(self.training_run):  # two writers of one run: the test's summaries stay in the test run
            rank_zero_info(f"W&B: {self.training_run} is still training; the test's summaries stay in the test run")
            return None
        import wandb

        logged = training_logger_settings(self.training_run)
        offline = wandb_run_folders(self.training_run)[-1].name.startswith("offline-")  # how it logged last
        error = None
        for mode in dict.fromkeys(["offline" if offline else self.mode, "offline"]):
            try:
                quiet = dict(silent=True, console="off", x_disable_meta=True, x_disable_stats=True)  # the test's own
                run = wandb.init(
                    id=ids[-1],
                    resume="allow",
                    project=logged.get("project") or self._wandb_init.get("project"),
                    entity=logged.get("entity"),
                    dir=str(self.training_run),
                    mode=mode,
                    reinit="create_new",
                    settings=wandb.Settings(init_timeout=self.init_timeout, **quiet),
                )
                run.summary.update(values)
                run.finish()
                return ids[-1]
            except Exception as err:  # wandb's own errors, of the network or the server
                error = err
        rank_zero_warn(f"W&B: the test's summaries stay in the test run ({type(error).__name__}: {error})")
        return ids[-1]

    def finalize(self, status: str) -> None:
        """Lightning's end of a run, where the checkpoints become an artifact (`log_model`): a copy that
        cannot be staged (a full or read-only W&B data folder) is one warning, not a failed training."""
        try:
            super().finalize(status)
        except OSError as err:
            rank_zero_warn(f"W&B: the checkpoints were not logged as an artifact ({err}); they are in the run folder")

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


def wandb_run_folders(folder: Path) -> list[Path]:
    """The W&B run folders in folder/wandb (online and offline), the oldest first."""
    found = [(match.group(1), p) for p in (folder / "wandb").glob("*run-*") if (match := RUN_FOLDER.match(p.name))]
    return [p for _, p in sorted(found)]


def wandb_run_ids(folder: Path) -> list[str]:
    """The ids of the W&B runs logged in folder/wandb, the oldest first (a resumed run's once)."""
    return list(dict.fromkeys(RUN_FOLDER.match(p.name).group(2) for p in wandb_run_folders(folder)))


def run_label(variant: str | None, seed) -> str | None:
    """The W&B name of a run of an experiment: `<variant>/seed<seed>` (the variant alone without a seed)."""
    if not variant:
        return None
    return f"{variant}/seed{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else variant


def run_config(run_dir: Path) -> dict:
    """A run folder's config.yaml, as written by its first command ({} when there is none)."""
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def training_logger_settings(run_dir: Path) -> dict:
    """The init_args of the W&B logger in a run's config.yaml (empty when it had none)."""
    logger = (run_config(run_dir).get("trainer") or {}).get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if isinstance(entry, dict) and "Wandb" in str(entry.get("class_path", "")):
            return entry.get("init_args") or {}
    return {}


def training_group(run_dir: Path) -> str | None:
    """The W&B group a training run was logged in, from its config.yaml: its experiment's, or its logger's
    (None if it had none)."""
    return run_config(run_dir).get("experiment") or training_logger_settings(run_dir).get("group")
