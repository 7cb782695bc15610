"""`fae experiment`: an experiment's runs on submitit, on this machine or as one SLURM job array, then
the experiment's table, its `fae report` and, when asked, their copies for docs/results.

Locally, N runs at a time on submitit's local executor, each job a `fae.experiment.task.RunTask`
(the same job a SLURM node runs). The scheduler here is a loop in the main thread, so that SIGTERM
and Ctrl-C reach it: it stops starting runs and sends SIGTERM to every job, whose `fae` command stops
as `fae` stops (a fit saves last.ckpt), then exits with 128 + the signal's number. The jobs start with
SIGINT kept from submitit's controller process, which would otherwise answer a terminal's Ctrl-C by
killing its job within a second; the job and its `fae` command handle SIGINT themselves. (It starts
with SIGINT blocked, not ignored, so that a Ctrl-C in that moment still reaches this loop afterwards.)

On SLURM, one job array for the runs still to do (neither done, nor queued or running in a job the
scheduler still holds), with submitit's warning signal before the time limit and requeue; the job
of each run is recorded in OUT/jobs.json, which `--status` reads back with sacct (or squeue).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time as clock
from pathlib import Path
from typing import Literal

from fae.errors import UserError
from fae.experiment.spec import Experiment, Run, Slurm, read_experiment, seed_major, with_overrides
from fae.experiment.state import STATES, RunState, finished, other_settings, run_state, time_left
from fae.experiment.table import finish, report_results, write_table
from fae.experiment.task import RunTask
from fae.files import write_text

LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor stops a job at its time limit: none here
SUBMITIT_DIR = ".submitit"  # submitit's pickles and the jobs' own logs, under OUT


def experiment(
    spec: Path,
    executor: Literal["local", "slurm"] = "local",
    out: Path | None = None,
    data_dir: Path | None = None,
    jobs: int | None = None,
    status: bool = False,
    publish: Path | None = None,
    partition: str | None = None,
    time: str | None = None,
    gpus_per_task: int | None = None,
    cpus_per_task: int | None = None,
    mem_gb: float | None = None,
    account: str | None = None,
    qos: str | None = None,
    array_parallelism: int | None = None,
) -> None:
    """Train an experiment's variants at one budget over its seeds, test each, and compare them in one table.

    An experiment file (experiments/*.yaml) names the variants (a config and flags each), the seeds, the
    budget in batches, the table's columns and, optionally, a slurm: block (see fae.experiment.spec). Every
    run is `fae fit` into OUT/VARIANT/seedS (resuming it when the folder has a checkpoint) and `fae test`;
    a start reuses finished runs, resumes interrupted ones and tries failed ones again. Then OUT/table.md
    (and .csv) and `fae report --group_by parent` in OUT/report.

    Args:
        spec: the experiment file, e.g. experiments/mnist_ablation.yaml.
        executor: where the runs go: this machine (submitit's local executor), or one SLURM job array.
        out: the experiment's folder: its runs, table and report (default runs/<the file's stem>).
        data_dir: passed to every run as --data.data_dir (default: the configs').
        jobs: runs at a time on this machine (default: one per GPU, else one per CPU core, one thread each).
        status: show what is done, running, queued, failed, interrupted and missing, write the table from
            what is done, and start nothing (with --publish: the report of the runs done, published).
        publish: copy the tables and the report's figures here (small files, for docs/results/).
        partition: SLURM partition (over the file's slurm: block, as are the options below).
        time: SLURM time limit of each run's job: minutes, or D-HH:MM:SS.
        gpus_per_task: GPUs of each run (0: CPU only; 2 or more: DDP across them).
        cpus_per_task: CPUs of each run.
        mem_gb: memory of each run, in GB.
        account: SLURM account.
        qos: SLURM quality of service.
        array_parallelism: runs of the job array at a time (default: all).
    """
    plan = read_experiment(spec)
    out = Path(out or Path("runs") / plan.name).resolve()
    runs = plan.grid(out, Path(data_dir).resolve() if data_dir else None)
    overrides = dict(partition=partition, time=time, gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task,
                     mem_gb=mem_gb, account=account, qos=qos, array_parallelism=array_parallelism)  # fmt: skip
    print(f"experiment {plan.name}: {len(runs)} runs of {plan.batches} batches in {out}", flush=True)
    check_settings(runs, plan)
    if status:
        return show_status(plan, runs, out, Path(publish) if publish is not None else None)
    if executor == "slurm":
        states = submit_to_slurm(plan, runs, out, with_overrides(plan.slurm, **overrides))
        if any(s.state != "done" for s in states):
            return  # the table and the report come once every run is done: `fae experiment ... --status`
    else:
        run_locally(plan, runs, out, jobs)
    finish(plan, runs, out, publish)


def check_settings(runs: list[Run], plan: Experiment) -> None:
    """A UserError when a run's folder holds a run of other settings: its results are never reused, resumed
    or tabulated under this experiment's labels."""
    for run in runs:
        differ = other_settings(run, plan.batches, plan.val_every)
        if differ:
            raise UserError(
                f"{run.run_dir} holds a run of other settings ({differ}): give this experiment its own --out, or "
                "restore the experiment file it was run with"
            )


# --- on this machine ---------------------------------------------------------------------------


def default_jobs() -> tuple[int, int]:
    """(runs at a time, GPUs): one run per visible GPU, else one per CPU core."""
    import torch

    gpus = torch.cuda.device_count()
    return (gpus or len(os.sched_getaffinity(0))), gpus


def runs_to_do(runs: list[Run], out: Path) -> list[Run]:
    """The runs a start on this machine takes, seed-major, each with a line saying why (or why not)."""
    todo = []
    for state in current_states(seed_major(runs), out):  # a run queued on SLURM is not run here too
        if state.state == "done":
            print(f"experiment: {state.run.key}: done earlier, reused", flush=True)
        elif state.state in ("running", "queued"):
            print(f"experiment: {state.run.key}: left to {state.detail}, which runs it", flush=True)
        else:
            if state.state != "missing":
                verb = "trying it again" if state.state == "failed" else "resuming it"
                print(f"experiment: {state.run.key}: {state.state} ({state.detail}); {verb}", flush=True)
            todo.append(state.run)
    return todo


def run_locally(plan: Experiment, runs: list[Run], out: Path, jobs: int | None) -> None:
    """Every run not done, `jobs` at a time, as submitit local jobs; see the module docstring for stops."""
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    slots, gpus = default_jobs()
    LocalRuns(plan, out, jobs or slots, gpus).run(runs_to_do(runs, out))


class LocalRuns:
    """Runs on this machine, one submitit local executor per slot (each slot its GPU, when there are)."""

    def __init__(self, plan: Experiment, out: Path, slots: int, gpus: int) -> None:
        import submitit

        self.plan, self.slots, self.gpus = plan, slots, gpus
        self.threads = 1 if not gpus else max(1, len(os.sched_getaffinity(0)) // slots)
        self.executors = []
        folder = out / SUBMITIT_DIR / f"local-{clock.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # this start's
        for slot in range(slots):
            executor = submitit.LocalExecutor(folder=folder)
            visible = [slot % gpus] if gpus else ()
            executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=min(gpus, 1), visible_gpus=visible)
            self.executors.append(executor)
        self.live: dict[int, tuple[Run, object]] = {}  # slot -> its run and job
        self.stop: list[str] = []  # the signals received

    def on_signal(self, signum: int, frame) -> None:
        self.stop.append(signal.Signals(signum).name)
        if len(self.stop) == 1:
            print(f"experiment: {self.stop[0]} received: stopping every run (each saves last.ckpt first)", flush=True)
        for _, job in self.live.values():
            stop_job(job)

    def run(self, todo: list[Run]) -> None:
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        stopped, left = 0, 0
        try:
            while todo or self.live:
                while todo and not self.stop and len(self.live) < self.slots:
                    self.start(todo.pop(0))
                if self.stop and todo:
                    left += len(todo)
                    todo.clear()
                for slot, (run, job) in list(self.live.items()):
                    if job.done():
                        del self.live[slot]
                        line = outcome(run, job)
                        stopped += "stopped by" in line
                        print(f"experiment: {line}", flush=True)
                clock.sleep(0.2)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.stop:
            print(
                f"fae experiment: stopped by {self.stop[0]}: {stopped} runs stopped with their state saved"
                f"{f', {left} not started' if left else ''}; the same command resumes them",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(128 + getattr(signal, self.stop[0]))

    def start(self, run: Run) -> None:
        slot = next(s for s in range(self.slots) if s not in self.live)
        gpus = min(self.gpus, 1)
        task = RunTask(run, self.plan.batches, self.plan.val_every, cwd=os.getcwd(), gpus=gpus, threads=self.threads)
        job = submit_sigint_blocked(self.executors[slot], task)
        self.live[slot] = (run, job)
        if self.stop:  # a signal came while it started
            stop_job(job)


def submit_sigint_blocked(executor, task: RunTask):
    """executor.submit(task), its controller process started with SIGINT blocked (module docstring): the
    controller inherits the mask, the job unblocks it, and a Ctrl-C meanwhile reaches this process after."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return executor.submit(task)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def stop_job(job) -> None:
    """SIGTERM to a local job's controller process, which forwards it to the job."""
    process = getattr(job, "_process", None)  # submitit's LocalJob keeps its Popen there
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)


def outcome(run: Run, job) -> str:
    """The one line of a finished job: its result, or why it ended without one."""
    try:
        return job.result()
    except Exception as err:  # the job's exception, carried back by submitit with its traceback
        text = str(err).strip().splitlines()
        for name in ("Interrupted", "RunFailed"):
            line = next((t for t in reversed(text) if t.startswith(f"fae.experiment.task.{name}: ")), None)
            if line is not None:
                return line.split(": ", 1)[1]
        return (
            f"{run.key}: its job ended without a result ({text[-1] if text else 'no output'}); see {job.paths.stderr}"
        )


# --- on SLURM ----------------------------------------------------------------------------------


def submit_to_slurm(plan: Experiment, runs: list[Run], out: Path, slurm: Slurm) -> list[RunState]:
    """One job array for the runs still to do; the runs' states as they were before it."""
    import submitit

    states = current_states(runs, out)
    todo = [s.run for s in states if s.state in ("failed", "interrupted", "missing")]
    for state in states:
        if state.state not in ("missing",):
            print(f"experiment: {state.run.key}: {state.state}{f' ({state.detail})' if state.detail else ''}")
    if not todo:
        return states
    parameters = slurm.sbatch_parameters(job_name=f"fae-{plan.name}")
    try:
        executor = submitit.SlurmExecutor(folder=out / SUBMITIT_DIR, max_num_timeout=slurm.max_requeues)
    except RuntimeError:
        raise UserError("--executor slurm: `srun` is not on PATH: run `fae experiment` on a SLURM login node") from None
    executor.update_parameters(**parameters)
    tasks = [
        RunTask(
            run,
            plan.batches,
            plan.val_every,
            cwd=os.getcwd(),
            gpus=slurm.gpus_per_task,
            threads=slurm.cpus_per_task or 0,
            signal_delay_s=slurm.signal_delay_s,
        )  # fmt: skip
        for run in todo
    ]
    try:
        submitted = executor.submit_array(tasks)
    except (subprocess.CalledProcessError, OSError, submitit.core.utils.FailedSubmissionError) as err:
        raise UserError(f"sbatch refused the job array: {' '.join(str(err).split())[:300]}") from None
    record_jobs(out, {run.key: job.job_id for run, job in zip(todo, submitted, strict=True)})
    array = submitted[0].job_id.split("_")[0]
    at_a_time = min(len(todo), slurm.array_parallelism or len(todo))
    print(
        f"experiment: submitted {len(todo)} runs as SLURM job {array}"
        f"{f' (an array, {at_a_time} at a time)' if len(todo) > 1 else ''}, each {slurm.time} min at most, "
        f"requeued after a warning signal {slurm.signal_delay_s} s before its limit. Follow it with "
        f"`squeue -j {array}` and `fae experiment {plan.path} --out {out} --status`; the same command as this one "
        "writes the table and the report once every run is done",
        flush=True,
    )
    return states


def jobs_file(out: Path) -> Path:
    return out / "jobs.json"


def read_jobs(out: Path) -> dict[str, str]:
    """The newest SLURM job of each run sent to SLURM (run key -> job id)."""
    try:
        return json.loads(jobs_file(out).read_text())
    except (OSError, ValueError):
        return {}


def record_jobs(out: Path, jobs: dict[str, str]) -> None:
    recorded = {**read_jobs(out), **jobs}
    out.mkdir(parents=True, exist_ok=True)
    write_text(jobs_file(out), json.dumps(recorded, indent=1) + "\n")


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """The scheduler's state of each job (sacct through submitit, else squeue); a UserError when a job
    was recorded and neither answers, since a run might then be sent twice."""
    if not job_ids:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher(delay_s=0)
    for job_id in job_ids:
        watcher.register_job(job_id)
    if shutil.which("sacct") is not None:
        watcher.update()
        states = {job_id: watcher.get_state(job_id, mode="cache") for job_id in job_ids}
        if any(state != "UNKNOWN" for state in states.values()):
            return states
    if shutil.which("squeue") is not None:  # jobs that squeue does not list have ended
        try:
            answer = subprocess.run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join({j.split("_")[0] for j in job_ids})],
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
        except (subprocess.SubprocessError, OSError) as err:
            raise UserError(f"cannot read the states of this experiment's SLURM jobs (squeue: {err})") from None
        if answer.returncode != 0 and "invalid job id" not in answer.stderr.lower():  # that one: all have ended
            raise UserError(f"cannot read the states of this experiment's SLURM jobs: squeue: {answer.stderr.strip()}")
        text = answer.stdout if answer.returncode == 0 else ""
        listed = watcher.read_info("JobID|State\n" + text)
        return {job_id: listed.get(job_id, {}).get("State", "ENDED") for job_id in job_ids}
    raise UserError(
        "cannot read the states of this experiment's SLURM jobs: neither sacct nor squeue answers here; run this "
        "on the cluster's login node"
    )


def current_states(runs: list[Run], out: Path) -> list[RunState]:
    recorded = read_jobs(out)
    unfinished = [recorded[run.key] for run in runs if run.key in recorded and not finished(run)]
    scheduled = scheduler_states(unfinished)
    return [run_state(run, recorded.get(run.key), scheduled.get(recorded.get(run.key, ""))) for run in runs]


# --- status and results ------------------------------------------------------------------------


def show_status(plan: Experiment, runs: list[Run], out: Path, publish: Path | None) -> None:
    """A line per run saying what is known of it, and the table of the runs done (with `publish`, their
    report too, both copied there)."""
    states = current_states(runs, out)
    counts = {name: sum(s.state == name for s in states) for name in STATES}
    print("experiment: " + ", ".join(f"{n} {name}" for name, n in counts.items() if n), flush=True)
    width = max(len(run.key) for run in runs)
    for state in states:
        detail = state.detail
        if state.state == "running" and state.step is not None:
            detail += f"; last.ckpt at step {state.step} of {plan.batches}"
        print(f"  {state.run.key:<{width}}  {state.state:<11}  {detail}".rstrip(), flush=True)
    if (left := time_left(states, plan.batches)) and left > 0:
        print(
            f"experiment: about {left / 3600:.1f} h of run time left at the pace of the runs done (each run its "
            "variant's mean fit and test time; runs at a time divide it)",
            flush=True,
        )
    if counts["done"]:
        print(f"experiment: wrote {write_table(runs, plan, out)} from the runs done", flush=True)
        if publish is not None:
            report_results(runs, out, publish)
    elif publish is not None:
        print(f"experiment: no run is done: nothing was published to {publish}", flush=True)
