"""Where a command's run goes: the one place that turns what a user asked for (the subcommand, the
checkpoint, the run-folder options) into a `Plan` (the run folder, the checkpoint, whether a run
starts again, the training run an evaluation belongs to) or refuses it with one line (UserError).

`plan(request)` reads what folders and checkpoints hold (checkpoint facts, fae.checkpoint) and
changes nothing: the CLI carries the plan out (it makes and locks the folder, fae.cli.lightning). The
rules it applies are those docs/runs.md states for users; tests/test_plan.py checks each.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from pathlib import Path

from fae.checkpoint import CheckpointFacts, checkpoint_facts
from fae.errors import UserError
from fae.runs import METRICS_NAME, holds_results

ALIASES = ("last", "best")


@dataclass(frozen=True)
class Request:
    """What a command was asked, as the planner needs it."""

    subcommand: str  # fit, validate, test or predict
    ckpt_path: str | None = None  # a .ckpt file, or "last"/"best" of run_dir
    run_dir: str | None = None  # --run_dir (or FAE_RUN_DIR): this exact folder
    runs_dir: str = "runs"  # where new run folders are made
    run_name: str | None = None  # a new folder's name (default: config_name)
    config_name: str = "run"  # the stem of the last --config
    allow_untrained: bool = False
    checkpoint_dirpath: str | None = None  # --checkpoint.dirpath, if given
    max_steps: int | None = None
    max_epochs: int | None = None
    model_class_path: str | None = None  # the config's family
    rank_zero: bool = True  # this process is global rank zero (or alone)
    several_processes: bool = False  # one of several nodes, or launched by torchrun/srun
    now: str = ""  # the timestamp in new folders' names


@dataclass(frozen=True)
class Plan:
    """Where a command runs. With `new`, `run_dir` is a fresh folder's name, made by the CLI with a numeric
    suffix when another command of the same second took it; otherwise `run_dir` is used exactly (made if
    it does not exist yet)."""

    run_dir: Path
    new: bool
    ckpt: Path | None = None  # the checkpoint to resume from or to evaluate
    restart: bool = False  # a run started again in its folder: its earlier metrics rows move aside
    evaluates: Path | None = None  # the training run an evaluation belongs to
    checkpoint_dirpath: Path | None = None  # where checkpoints go; None: RUN/checkpoints of the folder as made
    config_name: str = "config.yaml"  # a resume's config goes beside the first, never over it
    note: str | None = None  # a line to print


def plan(request: Request) -> Plan:
    """The plan of `request`, or a UserError saying in one line why it is refused (module docstring)."""
    explicit = request.run_dir
    if explicit == "":
        raise UserError("--run_dir is empty: give a folder, or omit it for a new one under --runs_dir")
    if request.several_processes and not explicit:
        raise UserError(
            "with several nodes, or under torchrun or srun, every process must write to one run folder: give "
            "--run_dir on storage that every node sees"
        )
    if not request.rank_zero:  # a worker of a run that rank zero has planned and checked
        ckpt = request.ckpt_path
        if ckpt in ALIASES:
            ckpt = resolve_alias(ckpt, Path(explicit), fit=request.subcommand == "fit")
        ckpt = Path(ckpt) if ckpt else None
        evaluated = ckpt.parent if ckpt is not None and request.subcommand != "fit" else None
        dirpath = Path(request.checkpoint_dirpath) if request.checkpoint_dirpath else evaluated  # as rank zero's
        return Plan(Path(explicit), new=False, ckpt=ckpt, checkpoint_dirpath=dirpath)
    if request.subcommand == "fit":
        result = plan_training(request)
    else:
        result = plan_evaluation(request)
    if result.ckpt is not None:
        check_family(checkpoint_facts(result.ckpt), request.model_class_path)
    return result


def folder_to_lock(request: Request) -> Path | None:
    """The existing folder a training run must hold before it is planned: what a live run holds changes
    under the planner's checks. The resumed run's folder, or the explicit --run_dir."""
    if request.subcommand != "fit" or not request.rank_zero:
        return None
    if request.run_dir:
        folder = Path(request.run_dir)
    elif request.ckpt_path and request.ckpt_path not in ALIASES and Path(request.ckpt_path).is_file():
        folder = resumed_folder(Path(request.ckpt_path))
    else:
        folder = None
    return folder if folder is not None and folder.is_dir() else None


def checkpoint_run_dir(ckpt: Path) -> Path | None:
    """The run folder a checkpoint belongs to: RUN for RUN/checkpoints/*.ckpt and for RUN/hpc_ckpt_*.ckpt
    (Lightning's SLURM requeue checkpoints)."""
    ckpt = ckpt.resolve()
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return ckpt.parent if ckpt.name.startswith("hpc_ckpt_") else None


def resumed_folder(ckpt: Path) -> Path | None:
    """The folder a resume from `ckpt` continues in: its run's, for a last.ckpt or a requeue checkpoint."""
    return checkpoint_run_dir(ckpt) if ckpt.name.startswith(("last", "hpc_ckpt_")) else None


def resolve_alias(alias: str, run_dir: Path | None, fit: bool) -> Path | None:
    """`last` or `best` as a checkpoint of run_dir (`last` under fit: None when it has none yet)."""
    if run_dir is None:
        raise UserError(f"--ckpt_path {alias} needs --run_dir RUN: the run whose checkpoint to use")
    last = run_dir / "checkpoints" / "last.ckpt"
    if alias == "last":  # the newest state: last.ckpt, or a SLURM requeue checkpoint written after it
        candidates = [path for path in (last, *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))) if path.is_file()]
        if candidates:
            return max(candidates, key=lambda path: (checkpoint_facts(path).step, path == last))
        if fit:
            return None
    if not last.is_file():
        raise UserError(f"--ckpt_path {alias}: {last} does not exist, {run_dir} has no trained checkpoint")
    best = checkpoint_facts(last).best_model_path
    if not best or not Path(best).is_file():
        raise UserError(f"{last} records no best checkpoint that still exists: give --ckpt_path a .ckpt file")
    return Path(best)


def new_folder(request: Request, suffix: str = "") -> Plan:
    name = request.run_name or request.config_name
    return Plan(Path(request.runs_dir) / f"{name}{suffix}-{request.now}", new=True)


def plan_training(request: Request) -> Plan:
    """The folder of a `fit` and the checkpoint it resumes from; refuses to mix two runs' results."""
    explicit = Path(request.run_dir) if request.run_dir else None
    ckpt = Path(request.ckpt_path) if request.ckpt_path and request.ckpt_path not in ALIASES else None
    restart = False  # `--ckpt_path last` in a folder without a checkpoint: (re)start the run there
    if request.ckpt_path in ALIASES:
        ckpt = resolve_alias(request.ckpt_path, explicit, fit=True)
        if ckpt is None and any(explicit.glob("checkpoints/*.ckpt")):
            raise UserError(f"{explicit} has checkpoints but no last.ckpt: give --ckpt_path one of them")
        restart = ckpt is None
    facts = checkpoint_facts(ckpt, resume=True) if ckpt is not None else None
    if facts is not None:
        check_budget_left(facts, request.max_steps, request.max_epochs)
    run_dir = explicit or (resumed_folder(ckpt) if ckpt is not None else None)
    if run_dir is None:  # a new run (from `ckpt`, when given, as from a pretrained state)
        result = replace(new_folder(request), ckpt=ckpt)
    elif restart:
        note = None
        if (run_dir / METRICS_NAME).is_file():
            note = (
                f"fae: {run_dir} holds no checkpoint: starting its run again (its earlier rows of metrics.csv "
                "move to metrics-superseded-*.csv)"
            )
        result = Plan(run_dir, new=False, restart=True, note=note)
    else:
        check_folder_takes(run_dir, facts)
        result = Plan(run_dir, new=False, ckpt=ckpt)
    check_checkpoint_dirpath(request.checkpoint_dirpath, ckpt)
    resumed = not result.new and (result.run_dir / "config.yaml").is_file()
    return Plan(
        result.run_dir,
        new=result.new,
        ckpt=result.ckpt,
        restart=result.restart,
        checkpoint_dirpath=Path(request.checkpoint_dirpath) if request.checkpoint_dirpath else None,
        config_name=f"config-resumed-{request.now}.yaml" if resumed else "config.yaml",
        note=result.note,
    )


def check_folder_takes(run_dir: Path, facts: CheckpointFacts | None) -> None:
    """A folder holding a run's results takes only a resume of its own newest checkpoint."""
    if not holds_results(run_dir):
        return
    last = run_dir / "checkpoints" / "last.ckpt"
    if facts is None and not any(run_dir.glob("checkpoints/*.ckpt")):
        raise UserError(
            f"{run_dir} holds the metrics of a run that saved no checkpoint: start it again there with "
            "--ckpt_path last (its rows are kept aside), or start a new run in a new folder (omit --run_dir)"
        )
    if facts is None:
        raise UserError(
            f"{run_dir} already holds a run: resume it with --ckpt_path {last} (or last), or start a new run in a "
            "new folder (omit --run_dir)"
        )
    if checkpoint_run_dir(facts.path) != run_dir.resolve():
        raise UserError(
            f"{run_dir} already holds a run, and {facts.path} is not one of its checkpoints: continue from it in a "
            "new folder (omit --run_dir), or resume this folder's own last.ckpt"
        )
    newest = checkpoint_facts(last).step if last.is_file() else -1
    if newest > facts.step:
        raise UserError(
            f"{last} holds step {newest}, newer than {facts.path.name} (step {facts.step}): resuming here would "
            "overwrite it; continue from the older checkpoint in a new folder (omit --run_dir)"
        )


def check_budget_left(facts: CheckpointFacts, max_steps: int | None, max_epochs: int | None) -> None:
    """A resumed fit must have something left to train: its checkpoint is below max_steps and max_epochs."""
    if max_steps is not None and max_steps >= 0 and facts.step >= max_steps:
        raise UserError(
            f"{facts.path} is at step {facts.step}, not below trainer.max_steps={max_steps}: raise it to train on"
        )
    if max_epochs is not None and max_epochs >= 0 and facts.epochs_done >= max_epochs:
        raise UserError(
            f"{facts.path} has {facts.epochs_done} epochs done, not below trainer.max_epochs={max_epochs}: raise it"
        )


def check_checkpoint_dirpath(dirpath: str | None, ckpt: Path | None) -> None:
    """A --checkpoint.dirpath given by hand may hold checkpoints only of the run it resumes."""
    if not dirpath or not any(Path(dirpath).glob("*.ckpt")):
        return
    if ckpt is None or ckpt.resolve().parent != Path(dirpath).resolve():
        raise UserError(
            f"checkpoint.dirpath {dirpath} already holds another run's checkpoints: give this run its own (or leave "
            "it unset: RUN/checkpoints)"
        )


def plan_evaluation(request: Request) -> Plan:
    """An evaluation's own folder, inside the run it evaluates, and its checkpoint."""
    explicit = Path(request.run_dir) if request.run_dir else None
    ckpt = Path(request.ckpt_path) if request.ckpt_path and request.ckpt_path not in ALIASES else None
    if request.ckpt_path in ALIASES:
        ckpt = resolve_alias(request.ckpt_path, explicit, fit=False)
    elif ckpt is None and not request.allow_untrained:
        raise UserError(
            f"`fae {request.subcommand}` needs a trained model: give --ckpt_path RUN/checkpoints/last.ckpt (or "
            "last/best with --run_dir RUN); --allow_untrained true evaluates an untrained model on purpose"
        )
    elif ckpt is not None:
        checkpoint_facts(ckpt)  # readable, or one line naming it
    owner = checkpoint_run_dir(ckpt) if ckpt else None
    if explicit and owner and holds_results(explicit) and explicit.resolve() != owner:
        raise UserError(
            f"{ckpt} is a checkpoint of the run {owner}, not of {explicit}: omit --run_dir (the evaluation is filed "
            "under its own run)"
        )
    evaluates = owner or explicit
    parent = explicit or owner
    if parent is not None:
        run_dir = parent / f"{request.subcommand}-{request.now}"
    else:
        run_dir = new_folder(request, suffix=f"-{request.subcommand}").run_dir
    dirpath = request.checkpoint_dirpath or (ckpt.parent if ckpt else None)  # evaluations point at what they read
    return Plan(
        run_dir, new=True, ckpt=ckpt, evaluates=evaluates, checkpoint_dirpath=Path(dirpath) if dirpath else None
    )


def check_family(facts: CheckpointFacts, configured: str | None) -> None:
    """A checkpoint is resumed or evaluated by the family that wrote it."""
    if configured and facts.class_path and import_class(facts.class_path) != import_class(configured):
        raise UserError(
            f"{facts.path} holds a {facts.family}, the config a {configured.rsplit('.', 1)[-1]}: use the config it "
            "was trained with (config.yaml in its run folder)"
        )


def import_class(class_path: str) -> object:
    """The class a dotted path names, or the path itself when it names none (compared as text then)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, class_path)
    except (ImportError, ValueError):
        return class_path
