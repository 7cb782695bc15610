"""Run folders: what a folder holds, and that one live run owns it (the metrics a resumed run continues
are fae.metrics_log's). It imports no Lightning: `fae experiment`'s jobs read run folders with it.

  - `holds_results(folder)`: metrics or checkpoints of an earlier run are there (a new run may not
    start in it; only a resume of its own newest checkpoint may);
  - `RunLock`: an exclusive lock on RUN/.fae.lock (flock, released by the kernel when the process
    ends, however it ends), held by the process of global rank zero while the command runs; a second
    run in the same folder is refused in one line naming the holder (`take_flock`, `flock_holder`:
    the same lock for `fae experiment`'s runs);
  - `make_run_folder`: a run folder made afresh (or its parents), recorded so that a start that fails
    leaves nothing behind (`remove_failed_starts`);
  - `global_rank_from_env()`, `several_processes_from_env()`: the rank of this process, and whether
    it is one of several, before Lightning has set up, from the variables that its launchers, torchrun
    and SLURM set.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from fae.errors import UserError, make_folder

LOCK_NAME = ".fae.lock"
RUN_DIR_ENV = "FAE_RUN_DIR"  # the run folder, for the worker processes Lightning starts
METRICS_NAME = "metrics.csv"  # Lightning's CSVLogger's file (fae.metrics_log checks it)


def holds_results(folder: Path) -> bool:
    """True when `folder` holds an earlier run's metrics or checkpoints."""
    checkpoints = [*folder.glob("checkpoints/*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")]
    return (folder / METRICS_NAME).is_file() or bool(checkpoints)


# folders this process made, which a start that fails must not leave behind (remove_failed_starts)
CREATED: list[Path] = []


def make_run_folder(path: Path, unique: bool) -> Path:
    """Make the run folder `path` (with `unique`, as a new folder: `path-2`, `path-3`, ... when a command
    started in the same second took the name) or explain in one line why not; recorded, so that a
    start that fails removes what it made."""
    if not unique:
        top = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)  # the first folder made
        fix = "choose another --runs_dir or --run_dir"
        make_folder(path, "the run folder", fix)
        if not os.access(path, os.W_OK):
            raise UserError(f"cannot write in the run folder {path}: permission denied ({fix})")
        if top is not None:
            CREATED.append(top)
        return path
    make_run_folder(path.parent, unique=False)
    suffix = 1
    while True:  # created at once and exclusively: two commands never share one
        candidate = path if suffix == 1 else path.with_name(f"{path.name}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        except OSError as err:
            raise UserError(
                f"cannot make the run folder {candidate}: {err.strerror} (choose another --runs_dir)"
            ) from None
        CREATED.append(candidate)
        return candidate


def remove_failed_starts() -> None:
    """Remove the folders this command made, when it failed before writing any result into them."""
    for path in CREATED:
        results = [*path.rglob("*.ckpt"), *path.rglob(METRICS_NAME)] if path.is_dir() else [None]
        if not results:
            shutil.rmtree(path, ignore_errors=True)


def global_rank_from_env() -> int:
    """The global rank of this process as its launcher set it (0 when launched by hand): torchrun
    sets RANK, SLURM's srun SLURM_PROCID; Lightning's launcher sets NODE_RANK and LOCAL_RANK (its
    workers' ranks are NODE_RANK * devices + LOCAL_RANK, non-zero whenever either is)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:  # srun's tasks
        return int(os.environ["SLURM_PROCID"])
    node, local = int(os.environ.get("NODE_RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    return node * 1000 + local  # only zero-ness matters here


def several_processes_from_env() -> bool:
    """True when a launcher started this process as one of several (torchrun, srun)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 or int(os.environ.get("SLURM_NTASKS", 1)) > 1


NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}  # a file system without flock (some mounts)


class RunLock:
    """An exclusive lock of a run folder for the life of this process; see the module docstring."""

    def __init__(self, folder: Path, command: str) -> None:
        self.path = folder / LOCK_NAME
        try:
            self.fd = take_flock(self.path, f"`fae {command}`")
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise UserError(f"cannot write in the run folder {folder}: {err.strerror}") from None
            print(f"fae: note: the file system of {folder} has no file locks ({err.strerror}): running unlocked, so a "
                  "second live run in this folder would not be refused", file=sys.stderr)  # fmt: skip
            self.fd = -1
            return
        if self.fd is None:
            raise UserError(
                f"the run folder {folder} is in use by a live run ({flock_holder(self.path) or 'another process'}): "
                "wait for it to end, or give this run its own folder (omit --run_dir, or choose another)"
            )
        HELD.append(self)

    def release(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)  # closing releases the flock; the file stays (removing it would race)
            self.fd = None


HELD: list[RunLock] = []  # the locks this process holds, released when its command ends (release_all)


def in_use(folder: Path) -> bool:
    """Whether a live run holds the folder's lock (RunLock) now."""
    return flock_holder(folder / LOCK_NAME) is not None


def take_flock(path: Path, what: str, tries: int = 1) -> int | None:
    """An exclusive flock of `path` for this process (a file descriptor; closing it, or this process's
    death, releases it), its holder written in the file; None when a live process holds it after `tries`
    attempts 0.1 s apart (a probe, `flock_holder`, holds it for microseconds). OSError: the file cannot
    be opened, or this file system has no flock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == tries - 1:
                os.close(fd)
                return None
            time.sleep(0.1)
        except OSError:
            os.close(fd)
            raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, {what} since {time.ctime()}\n".encode(), 0)
    return fd


def flock_holder(path: Path) -> str | None:
    """Who holds `path`'s flock now, as its holder wrote it, or None when no live process does."""
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
    except OSError:  # no flock on this file system: nothing can be known
        return None
    finally:
        os.close(fd)  # and with it the shared lock


def release_all() -> None:
    while HELD:
        HELD.pop().release()
