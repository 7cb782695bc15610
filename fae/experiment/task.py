"""One run of an experiment as a submitit job: `fae fit` (resuming the run's checkpoint when its folder
has one), then `fae test`, the same on a workstation and on a SLURM node.

The job is idempotent: everything it knows lives in the run's folder and status file, so running it
again (a restart, a SLURM requeue) continues the work where it stopped: a finished test is reused, a
fit that finished (its status says so, or `fae fit` finds the checkpoint at the budget) goes straight
to its test, any other fit resumes with `--ckpt_path last` (or starts when the folder has no
checkpoint). The job reads a checkpoint itself only when a fit it did not record is refused, so on
its way it imports neither torch nor Lightning.

Stops, each with the run's state written to its status file:
  - SIGTERM or SIGINT (`fae experiment` stopping its runs, a preemption, scancel): the `fae` command
    gets SIGTERM and stops as it always does (a fit saves last.ckpt after its batch); the job ends
    with `Interrupted`, and the next start resumes it;
  - USR2, submitit's warning before a SLURM time limit (or a preemption notice): the same stop, then
    `checkpoint()` hands submitit this job again, which requeues it (`scontrol requeue`);
  - a crash (any other non-zero exit) is retried once, saying so; a mistake in the command (exit 2,
    fae's one-line errors) is not, as it would fail again; either ends with `RunFailed`.

The `fae` commands run in processes of their own, as a user would type them. On SLURM the job is the
scheduler's unit: the command's environment drops the SLURM_* variables, so that Lightning launches
its own processes for DDP across the task's GPUs instead of expecting one SLURM task per device.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from fae.experiment.spec import Run
from fae.experiment.state import checkpoint_step, finished, read_status, settings_of, take_lock, write_status

STOP_CODES = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT"}
USAGE_ERROR = 2  # fae's exit status for a one-line error of the user's


class Interrupted(Exception):
    """The run was stopped by a signal; its folder holds what the next start resumes."""


class RunFailed(Exception):
    """A `fae` command of the run failed (after its retry, for a crash)."""


@dataclasses.dataclass
class RunTask(Checkpointable):
    """Fit then test one run of an experiment (module docstring)."""

    run: Run
    batches: int
    val_every: int
    cwd: str
    gpus: int = 0  # the GPUs of the fit: 0 keeps the config's accelerator; 2 or more train with DDP
    threads: int = 1  # OMP_NUM_THREADS of each command (0: the CPUs this job may use)
    signal_delay_s: int = 120  # how long before the end a warning signal comes: the stop must fit in it
    quiet: bool = True  # no progress bars in the run's log
    program: tuple[str, ...] = (sys.executable, "-m", "fae.cli")  # how to call `fae` (the submitting Python's)

    def __call__(self) -> str:
        self._child: subprocess.Popen | None = None
        self._stopped_by: str | None = None
        self._log_start = 0
        handlers = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # `fae experiment` starts jobs with it blocked
        lock = self._lock = take_lock(self.run)
        if lock is None:
            return f"{self.run.key}: another process runs it; left to that process"
        try:
            if finished(self.run):
                return f"{self.run.key}: done earlier, reused"
            settings = settings_of(self.run, self.batches, self.val_every)
            write_status(self.run, state="running", host=socket.gethostname(), pid=os.getpid(), job=job_id(),
                         settings=settings)  # fmt: skip
            return self._fit_and_test()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.close(lock)

    # --- the work ------------------------------------------------------------------------------

    def _fit_and_test(self) -> str:
        trained = (self.run.run_dir / "checkpoints" / "last.ckpt").is_file()
        if not trained or read_status(self.run).get("fitted", 0) < self.batches:
            self._command("fit", self.fit_args())
            write_status(self.run, fitted=self.batches)
        self._command("test", self.test_args())
        status = write_status(self.run, state="done", line="fit and test finished")
        fit, test = (status.get(f"{name}_seconds", 0.0) / 60 for name in ("fit", "test"))
        return f"{self.run.key}: fit {fit:.1f} min, test {test:.1f} min"

    def fit_args(self) -> list[str]:
        args = ["fit", "--config", str(self.run.config), *self.run.flags, *self.common_args()]
        args += ["--run_dir", str(self.run.run_dir), "--ckpt_path", "last"]
        args += ["--trainer.max_steps", str(self.batches), "--trainer.max_epochs", "-1"]
        args += ["--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", str(self.val_every)]
        if self.gpus:
            args += ["--trainer.accelerator", "gpu", "--trainer.devices", str(self.gpus)]
        return args

    def test_args(self) -> list[str]:
        last = self.run.run_dir / "checkpoints" / "last.ckpt"
        args = [
            "test",
            "--config",
            str(self.run.config),
            *self.run.flags,
            *self.common_args(),
            "--ckpt_path",
            str(last),
        ]
        if self.gpus:  # the sweep on one device: its numbers do not depend on how many trained the model
            args += ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
        return args

    def common_args(self) -> list[str]:
        return ["--trainer.enable_progress_bar", "false"] if self.quiet else []

    def _command(self, name: str, args: list[str]) -> None:
        """Run `fae ARGS` to its end; a crash is retried once (resuming, for a fit)."""
        for attempt in (1, 2):
            code = self._fae(args)
            if code == 0:
                return
            if code in STOP_CODES or self._stopped_by:
                signal_name = self._stopped_by or STOP_CODES[code]
                write_status(self.run, state="interrupted", line=f"`fae {name}` stopped by {signal_name}")
                raise Interrupted(f"{self.run.key}: `fae {name}` stopped by {signal_name}; the next start resumes it")
            reason = last_line(self.run.log, self._log_start)
            if name == "fit" and code == USAGE_ERROR and (checkpoint_step(self.run) or 0) >= self.batches:
                self._say("its checkpoint is at the budget already: trained")  # a fit that ended unrecorded
                return
            if code == USAGE_ERROR or attempt == 2:
                line = f"`fae {name}` failed (exit {code}): {reason}"
                write_status(self.run, state="failed", line=line)
                raise RunFailed(f"{self.run.key}: {line}; see {self.run.log}")
            self._say(f"`fae {name}` crashed (exit {code}: {reason}); retrying it once")

    def _fae(self, args: list[str]) -> int:
        """Run `fae ARGS` with the run's log as its output; its exit status. The time it took adds to the
        run's `<command>_seconds` (a resumed fit's segments add up)."""
        if self._stopped_by:  # a signal came between two commands
            return 128 + signal.SIGTERM
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        threads = str(self.threads or max(1, len(os.sched_getaffinity(0)) // max(1, self.gpus)))  # per process
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env.pop("FAE_RUN_DIR", None)
        start = time.time()
        try:
            with open(self.run.log, "a") as log:
                self._log_start = log.tell()
                log.write(f"$ fae {' '.join(args)}\n")
                log.flush()
                # the lock goes with the command: it stays held while any process works on the run
                self._child = subprocess.Popen(
                    [*self.program, *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.cwd,
                    pass_fds=(self._lock,),
                    preexec_fn=ignore_warning_signal,
                )
                if self._stopped_by:  # a signal came while the command started
                    self._child.send_signal(signal.SIGTERM)
                return wait(self._child)
        finally:
            key = f"{args[0]}_seconds"
            write_status(self.run, **{key: read_status(self.run).get(key, 0.0) + time.time() - start})

    def _say(self, line: str) -> None:
        print(f"fae experiment: {self.run.key}: {line}", flush=True)
        with open(self.run.log, "a") as log:
            log.write(f"fae experiment: {line}\n")

    # --- signals -------------------------------------------------------------------------------

    def _forward(self, signum: int, frame) -> None:
        """SIGTERM/SIGINT: the running command stops as `fae` stops (SIGTERM), and no other starts."""
        self._stopped_by = self._stopped_by or signal.Signals(signum).name
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """submitit's USR2 handler (a time limit near, or a preemption): stop the command, its
        checkpoint saved, and hand submitit this job again to requeue."""
        self._stopped_by = self._stopped_by or "USR2"
        child = getattr(self, "_child", None)
        if child is not None and not exited(child.pid):
            child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + max(10.0, 0.8 * self.signal_delay_s)
            while not exited(child.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        if getattr(self, "_lock", None) is not None and not finished(self.run):  # work of this job's
            line = "stopped by the warning signal (USR2); submitit requeues it unless its requeues are used up"
            write_status(self.run, state="interrupted", line=line)
        return DelayedSubmission(dataclasses.replace(self))

    def __getstate__(self) -> dict:  # the live process and lock stay with this job
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def wait(child: subprocess.Popen, timeout: float | None = None) -> int | None:
    """The child's exit status, waiting in short polls so that signal handlers run (and may wait on it
    too) meanwhile; None when `timeout` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
    return child.poll()


def exited(pid: int) -> bool:
    """Whether the child `pid` has ended, leaving it to be reaped by whoever waits on it (WNOWAIT): a
    signal handler must not reap, or wait on the Popen, while the main thread may hold its wait lock."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def ignore_warning_signal() -> None:
    """In a `fae` command's process, before it starts: SLURM sends the warning signal (USR2) to every
    process of the job step, and its default action would kill the command before it saves; the job
    stops the command with SIGTERM instead. The ignore is inherited by the command's DDP processes."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def job_id() -> str | None:
    """The submitit job (SLURM's array job and task, or the local job) of this process, for the status file."""
    from submitit import JobEnvironment

    try:
        return JobEnvironment().job_id
    except (RuntimeError, KeyError):  # not in a submitit job (a job called by hand)
        return None


def last_line(log: Path, start: int = 0) -> str:
    """The last `fae: error:` line the command wrote to the log from `start` (else its last line): why it failed."""
    try:
        with open(log, errors="replace") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("fae: error:")]
    text = (errors or lines or ["no output"])[-1]
    return text[:300]
