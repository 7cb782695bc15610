"""What is known of one run of an experiment: done, running, queued, failed, interrupted or missing; and,
from the runs done, the run time the others still need (`time_left`).

Read from what outlives any process: the run folder (a finished test is a test-*/robustness.json; a
checkpoint is work to resume), the run's lock (OUT/VARIANT/seedS.lock, an flock the kernel releases
when the process that holds it dies, so no lock outlives its run), the run's status file
(OUT/VARIANT/seedS.json: the last attempt's outcome, written whole by a rename) and, for runs sent to
SLURM, the scheduler's state of the run's job.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass

from fae.experiment.spec import Run
from fae.files import write_text
from fae.runs import flock_holder, in_use, take_flock

ACTIVE = {  # SLURM job states in which a run's job will still run (sacct's names)
    "UNKNOWN": "queued",  # sacct does not list it (yet): a job just submitted, so it is not sent twice
    "PENDING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "RESIZING": "running",
    "SUSPENDED": "running",
    "STAGE_OUT": "running",
    "SIGNALING": "running",
}
STATES = ("done", "running", "queued", "failed", "interrupted", "missing")


def finished(run: Run) -> bool:
    """The run has a finished `fae test`."""
    return any(run.run_dir.glob("test-*/robustness.json"))


def read_status(run: Run) -> dict:
    try:
        return json.loads(run.status_file.read_text())
    except (OSError, ValueError):
        return {}


def write_status(run: Run, **changes) -> dict:
    """Update the run's status file: written to a temporary file and renamed, so a reader sees it whole."""
    status = {**read_status(run), **changes, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    run.status_file.parent.mkdir(parents=True, exist_ok=True)
    write_text(run.status_file, json.dumps(status, indent=1) + "\n")
    return status


def settings_of(run: Run, batches: int, val_every: int) -> dict:
    """What makes a run's results the ones its experiment names: its config, its flags (the data's folder
    aside: where the data lies changes nothing) and its budget. Recorded in its status file."""
    flags = list(run.flags)
    if "--data.data_dir" in flags:
        at = flags.index("--data.data_dir")
        del flags[at : at + 2]
    return {"config": str(run.config), "flags": flags, "batches": batches, "val_every": val_every}


def other_settings(run: Run, batches: int, val_every: int) -> str | None:
    """How the settings recorded for `run` differ from these (None when they agree, or none are recorded)."""
    recorded = read_status(run).get("settings")
    if not recorded:
        return None
    wanted = settings_of(run, batches, val_every)
    differ = [key for key in wanted if recorded.get(key) != wanted[key]]
    return ", ".join(f"{key} {recorded.get(key)!r} there, {wanted[key]!r} here" for key in differ) or None


def take_lock(run: Run) -> int | None:
    """The run's lock for this process (fae.runs.take_flock), or None when another live process holds it.
    Where the file system has no flock (some network mounts), the run goes unlocked, saying so: two
    processes of one experiment must then not share its folder."""
    run.lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        return take_flock(run.lock, f"run {run.key}", tries=5)
    except OSError as err:  # ENOLCK, EOPNOTSUPP: no locks on this mount
        print(f"fae experiment: cannot lock {run.lock} ({err.strerror}); running {run.key} unlocked", flush=True)
        return os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)


def holder(run: Run) -> str | None:
    """Who runs the run now (the lock's holder, or a `fae` command holding its folder), or None."""
    who = flock_holder(run.lock)
    if who is None and run.run_dir.is_dir() and in_use(run.run_dir):
        return "a fae command in its folder"
    return who


def checkpoint_step(run: Run) -> int | None:
    """The step of the run's newest checkpoint (last.ckpt), or None when it has none."""
    last = run.run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    from fae.checkpoint import checkpoint_facts

    with contextlib.suppress(Exception):  # an unreadable checkpoint: the run's fit says why
        return checkpoint_facts(last).step
    return None


@dataclass(frozen=True)
class RunState:
    run: Run
    state: str  # one of STATES
    detail: str = ""
    step: int | None = None  # of its last.ckpt, for a run running or interrupted


def run_state(run: Run, job: str | None = None, scheduled: str | None = None) -> RunState:
    """What is known of `run`; `scheduled` is the scheduler's state of its newest job `job`, if it has one."""
    if finished(run):
        return RunState(run, "done")
    who = holder(run)
    if who is not None:
        return RunState(run, "running", who, checkpoint_step(run))
    status = read_status(run)
    if scheduled in ACTIVE:
        return RunState(run, ACTIVE[scheduled], f"SLURM job {job} {scheduled}")
    if status.get("state") == "failed":
        return RunState(run, "failed", f"{status.get('line', '')}; see {run.log}")
    ended_early = scheduled not in (None, "COMPLETED") and status.get("state") != "interrupted"
    if ended_early:  # the job ended before its run said why (a bad setup line, out of memory, a node)
        return RunState(
            run, "failed", f"SLURM job {job} {scheduled}; see its log in {run.run_dir.parent.parent}/.submitit"
        )
    step = checkpoint_step(run)
    if step is not None:
        return RunState(run, "interrupted", f"last.ckpt at step {step}; the next start resumes it", step)
    if status.get("state") in ("running", "interrupted") or run.run_dir.exists():
        return RunState(run, "interrupted", "stopped before its first checkpoint; the next start trains it again")
    return RunState(run, "missing")


def time_left(states: list[RunState], batches: int) -> float | None:
    """Seconds of run time the unfinished runs still need at the pace of the finished ones (their status
    files' fit_seconds and test_seconds): each run its variant's mean over its finished runs, or the mean of
    every finished run for a variant with none; a started run's fit only past its last.ckpt (`step`). Failed runs
    are left out (they wait for a fix). None when no finished run recorded its times."""
    paces: dict[str, list[tuple[float, float]]] = {}
    for state in states:
        status = read_status(state.run) if state.state == "done" else {}
        if "fit_seconds" in status and "test_seconds" in status:
            paces.setdefault(state.run.variant, []).append((status["fit_seconds"], status["test_seconds"]))
    every = [pace for variant in paces.values() for pace in variant]
    if not every:
        return None
    left = 0.0
    for state in states:
        if state.state in ("done", "failed"):
            continue
        known = paces.get(state.run.variant, every)
        fit, test = (sum(pace[i] for pace in known) / len(known) for i in (0, 1))
        left += fit * max(0.0, 1 - (state.step or 0) / batches) + test
    return left
