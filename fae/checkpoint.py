"""Checkpoints a run can trust: read once, with a one-line error; written atomically; last.ckpt always
the newest state, saved every few minutes mid-epoch and when the run is stopped by a signal.

`checkpoint_facts(path)` is the one reader of what a command needs to know of a checkpoint (its step,
epochs, family, arguments in today's form, best checkpoint, whether it can be resumed): the planner,
the CLI's rebuild of the model and `fae sample` share it, and `read_checkpoint` hands the same loaded
file to the loader of its weights (Lightning's restore, fae.models.load), so that a command loads each
file version once. A checkpoint that cannot be read (missing, truncated, a flipped byte, not
Lightning's) is named in one line. `upgrade_hparams` reads the arguments of checkpoints written when
each net took its own sizes in today's form.

`AtomicCheckpointIO` (the CLI installs it on every Trainer) writes a checkpoint beside its destination
(`.<name>.partial-<pid>`), fsyncs it and renames it over the destination: the previous file stays whole
until the new one is complete, on any filesystem and when the disk fills (Lightning's own writer
stages the file in the temp folder and copies it across filesystems, truncating the destination
first).

`Checkpoint` is Lightning's ModelCheckpoint (same arguments) plus:
  - last.ckpt is always the newest state. Lightning 2.6 rewrites last.ckpt at a validation only when
    a top-k checkpoint is saved at the same step, and at the end of training only when none was ever
    written, so a run whose monitored metric stops improving keeps a stale last.ckpt
    (tests/test_checkpoint.py pins it). `Checkpoint` saves last.ckpt after each of
    Lightning's saving points and when training ends, unless it already holds that step;
  - `last_every_minutes`: last.ckpt is also written mid-epoch once that many minutes have passed
    since it was last written (at most that much work is lost to a crash);
  - preemption: SIGTERM (what schedulers and `kill` send) and SIGINT (Ctrl-C) let the current batch
    and its validation finish, then last.ckpt is written and the run stops with `Preempted` (the CLI
    exits with 128 + the signal's number, saying how to resume). A second SIGINT stops at once.
Both act at the start of a batch that begins an optimizer step (with accumulated gradients, the first
of a window: the gradients of a half-done window are in no checkpoint), where the state is exactly that
after the previous batch and its validation (what an uninterrupted run continues from), and the devices
decide together (one all-reduce per step). fae.loop_state writes Lightning's batch counters of such a
save, and of a save at an epoch's end under a step budget, as Lightning's restore expects them. Such a
save does not count as Lightning's save at its global step, so that a validation inside an accumulation
window still saves its top-k checkpoint; that validation's own last.ckpt holds a half-done window, as
Lightning writes it (a crash right after it loses that window's first gradients: choose
val_check_interval a multiple of accumulate_grad_batches). During training
fae's handlers replace Lightning's for SIGTERM and SIGINT: Lightning's would stop inside a validation;
ModelCheckpoint's save_on_exception is refused (it writes last.ckpt in the middle of the failed batch).
It relies on ModelCheckpoint's `_monitor_candidates`, `_save_last_checkpoint`, `_last_global_step_saved`
and `_should_save_on_train_epoch_end`, and on the fit loop's `batch_idx`; tests/test_checkpoint.py and
tests/test_runs.py pin the behaviour.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import signal
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from fae.errors import UserError, short_reason
from fae.loop_state import after_previous_batch, as_lightning_restores

_VERIFIED: set[tuple] = set()  # the version keys of checkpoints whose checksums passed
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError)
_LOADED: dict[tuple, dict] = {}  # file versions read for their facts, until their loader takes them
_FACTS: dict[tuple, CheckpointFacts] = {}


@dataclass(frozen=True)
class CheckpointFacts:
    """What a command needs to know of a checkpoint, read once per file version (`checkpoint_facts`)."""

    path: Path
    step: int  # the global step: batches trained
    epochs_done: int
    resumable: bool  # it holds the optimizer and loop state a resumed run needs, not only weights
    class_path: str | None  # the model family, as the CLI records it
    recorded_hparams: dict = field(repr=False)  # the family's arguments in today's form (`upgrade_hparams`)
    best_model_path: str | None = None  # the best-by-monitor checkpoint its run recorded

    @property
    def family(self) -> str:
        return (self.class_path or "model").rsplit(".", 1)[-1]

    @property
    def hparams(self) -> dict:
        """The family's arguments in today's form: a copy each time (a parser may change what it is given)."""
        return copy.deepcopy(self.recorded_hparams)


def version_key(path: Path) -> tuple:
    """What tells one version of a file from another: its path, and the inode, time and size of its contents
    (a checkpoint replaced by a rename is a new inode, even within a coarse clock's tick)."""
    stat = path.stat()
    return str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


def load_verified(path: Path) -> dict:
    """torch.load of a Lightning checkpoint, or one UserError naming the file when it cannot be read:
    missing, truncated, corrupt (every entry's CRC32 is checked: a flipped byte in a tensor is found),
    or not a Lightning checkpoint."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (give the path of a .ckpt file)")
    fix = "use another checkpoint, e.g. a best-*.ckpt beside it"
    key = version_key(path)
    try:
        with zipfile.ZipFile(path) as archive:
            # the checksums take a read of the whole file: once per file version, however often it is read
            damaged = None if key in _VERIFIED else archive.testzip()
    except zipfile.BadZipFile:
        reason = "not a whole archive"
        raise UserError(f"checkpoint {path} cannot be read, it is truncated or corrupt ({reason}): {fix}") from None
    except OSError:
        damaged = None  # torch.load says why below
    if damaged is not None:
        raise UserError(f"checkpoint {path} is corrupt ({damaged} fails its checksum): {fix}")
    try:
        # mmap: only what is read is paged in, so checking a large checkpoint costs little
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except UNREADABLE as err:
        reason = short_reason(err).split(". ")[0][:100]
        raise UserError(f"checkpoint {path} cannot be read, it is truncated or corrupt ({reason}): {fix}") from None
    lightning = isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
    if not lightning or "pytorch-lightning_version" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint: give a .ckpt written by `fae fit`")
    if not isinstance(checkpoint.get("global_step", 0), int):
        raise UserError(f"checkpoint {path} is corrupt (its global_step is not a number): {fix}")
    _VERIFIED.add(key)
    return checkpoint


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint (on the CPU), for the one reader that loads it (Lightning's restore, `fae
    sample`): the copy its facts were read from when there is one, so that a file version is loaded once."""
    path = Path(path)
    key = version_key(path) if path.is_file() else None
    cached = _LOADED.pop(key, None) if key else None
    for stale in [k for k in _LOADED if key and k[0] == key[0]]:  # an older version of this file: not wanted
        del _LOADED[stale]
    return cached if cached is not None else load_verified(path)


def checkpoint_facts(path: str | Path, resume: bool = False) -> CheckpointFacts:
    """The facts of a checkpoint, read once per file version; with `resume`, one that holds weights only
    is refused in one line (no run can continue from it)."""
    path = Path(path)
    key = version_key(path) if path.is_file() else None
    facts = _FACTS.get(key) if key else None
    if facts is None:
        checkpoint = load_verified(path)
        key = version_key(path)
        _LOADED[key] = checkpoint
        facts = _FACTS[key] = facts_of(path, checkpoint)
    if resume and not facts.resumable:
        raise UserError(
            f"{path} holds weights only (no optimizer or loop state), so no run can resume from it: evaluate it "
            "with `fae test`, or start a new run"
        )
    return facts


def facts_of(path: Path, checkpoint: dict) -> CheckpointFacts:
    hparams = upgrade_hparams(checkpoint.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    states = checkpoint.get("callbacks", {})
    best = [state.get("best_model_path") for key, state in states.items() if "Checkpoint" in key]
    return CheckpointFacts(
        path=path,
        step=int(checkpoint.get("global_step", 0)),
        epochs_done=int(progress.get("completed", checkpoint.get("epoch", 0))),
        resumable=bool(checkpoint.get("optimizer_states")),
        class_path=class_path,
        recorded_hparams=hparams,
        best_model_path=next((p for p in best if p), None),
    )


def forget_checkpoints(keep: Path | None = None) -> None:
    """Drop the checkpoints read for their facts but `keep`'s (the end of planning), or everything read
    (the end of a command)."""
    kept = {k: v for k, v in _LOADED.items() if keep is not None and k[0] == str(Path(keep).resolve())}
    _LOADED.clear()
    _LOADED.update(kept)
    if keep is None:
        _FACTS.clear()


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that never leave a partial file in place of a good one; see the module docstring."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if not isinstance(err, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
                raise
            reason = err.strerror if isinstance(err, OSError) and err.strerror else "the write was cut short"
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = f"the previous {path.name} is intact" if path.exists() else "no existing checkpoint was changed"
            raise UserError(
                f"could not write checkpoint {path} ({reason}; {free:.0f} MiB free on its disk); {kept}"
            ) from None
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        checkpoint = read_checkpoint(path)  # on the CPU: Lightning's restore asks for no map_location
        if isinstance(map_location, (str, torch.device)) and str(map_location) != "cpu":
            checkpoint = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.to(map_location))
        return checkpoint


class Preempted(SystemExit):
    """Training stopped by a signal after writing a resumable last.ckpt."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(128 + getattr(signal, signal_name))
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) with last.ckpt kept current, written every few minutes and on
    SIGTERM/SIGINT; see the module docstring."""

    _last_step_saved_as_last: int | None = None

    def __init__(self, *args: Any, last_every_minutes: float | None = 10.0, **kwargs: Any) -> None:
        """
        Args:
            last_every_minutes: write last.ckpt mid-epoch once this many minutes have passed since it
                was last written (None: only at Lightning's own saving points and the end).
            *args, **kwargs: ModelCheckpoint's arguments.
        """
        if kwargs.get("save_on_exception"):
            raise UserError(
                "checkpoint.save_on_exception is not supported: it writes last.ckpt in the middle of the failed "
                "batch; last.ckpt already holds the newest whole state (set checkpoint.last_every_minutes for more)"
            )
        super().__init__(*args, **kwargs)
        if last_every_minutes is not None and last_every_minutes <= 0:
            raise UserError(f"checkpoint.last_every_minutes must be > 0 (or null), got {last_every_minutes}")
        self.last_every_minutes = last_every_minutes
        self._last_written_at = time.monotonic()
        self._signal: dict = {}
        self._at_epoch_end = False
        self._previous_handlers: dict = {}

    @property
    def last_saved_step(self) -> int | None:
        """The global step last.ckpt holds, as this callback last wrote it (None: not written yet)."""
        return self._last_step_saved_as_last

    # --- last.ckpt: the newest state -------------------------------------------------------------
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_saved_as_last = trainer.global_step
            self._last_written_at = time.monotonic()

    def save_last_if_stale(self, trainer: L.Trainer) -> None:
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking or trainer.global_step == 0:
            return
        if self._last_step_saved_as_last != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # After each of Lightning's own saving points (a validation, or the epoch's end when validation runs
    # there): saving last.ckpt earlier would mark the step saved and make Lightning skip its top-k save.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not self._should_save_on_train_epoch_end(trainer):
            self.save_last_if_stale(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._at_epoch_end = True  # its saves hold the epoch's batches all stepped (on_save_checkpoint)
        try:
            super().on_train_epoch_end(trainer, pl_module)
            if self._should_save_on_train_epoch_end(trainer):
                self.save_last_if_stale(trainer)
        finally:
            self._at_epoch_end = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.save_last_if_stale(trainer)

    # --- Lightning's loop counters in fae's saves (fae.loop_state) ----------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        as_lightning_restores(checkpoint, trainer, self._at_epoch_end)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        after_previous_batch(checkpoint)  # before Lightning restores its loops from it

    # --- mid-epoch: every few minutes, and on a signal -------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_written_at = time.monotonic()
        self._signal = {}
        if self.save_last and threading.current_thread() is threading.main_thread():
            self._previous_handlers = {
                signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
            }

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            previous = self._previous_handlers.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self._signal.setdefault("name", signal.Signals(signum).name)
        rank_zero_info(f"fae: {self._signal['name']} received; saving last.ckpt after this batch, then stopping")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.save_last or trainer.sanity_checking or trainer.global_step == 0:
            return
        if trainer.fit_loop.epoch_loop.batch_idx % trainer.accumulate_grad_batches:
            return  # inside an accumulation window: its gradients are in no checkpoint; act at its end
        stop = bool(self._signal)
        due = self.last_every_minutes is not None and (
            time.monotonic() - self._last_written_at >= 60.0 * self.last_every_minutes
        )
        if trainer.world_size > 1:  # the devices act together (on one device: no tensor, no sync per step)
            decisions = torch.tensor([float(stop), float(due)], device=pl_module.device)
            stop, due = (trainer.strategy.reduce(decisions, reduce_op="max") > 0).tolist()
        if stop or due:
            saved_step = self._last_global_step_saved
            self.save_last_if_stale(trainer)
            # not one of Lightning's saving points: a validation at this global step (inside an accumulation
            # window) still saves its top-k, as in a run that never wrote last.ckpt here
            self._last_global_step_saved = saved_step
        if stop:
            last = self.last_model_path or str(Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}.ckpt")
            raise Preempted(self._signal.get("name", "SIGTERM"), trainer.global_step, last)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failure in training (a full disk, a lost process) carries the state that is safe, for its line
        (fae.cli.failures): `last_checkpoint`, (path, step) of last.ckpt, or None before the first."""
        if trainer.state.fn == "fit":
            last = Path(self.last_model_path or "")
            exception.last_checkpoint = (str(last), self.last_saved_step) if last.is_file() else None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
