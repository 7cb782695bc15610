"""Callbacks that tests pass to the `fae` CLI (`--trainer.callbacks+=tests.callbacks.SignalAt`) to act
at an exact step: a signal as a scheduler or Ctrl-C would send it, a NaN in the data."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send `signal_name` to this process once `step` batches are trained."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class SignalAfterBatches(L.Callback):
    """Send SIGTERM to this process once `batches` batches are trained in all (across epochs and resumes):
    with accumulated gradients, also inside an optimizer step's window."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx + 1 == self.batches and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


class PoisonFrom(L.Callback):
    """Put a NaN in every training batch from `step` on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            batch.x[0, 0, 0, 0] = float("nan")


class SignalAtTestStart(L.Callback):
    """Send `signal_name` to this process when `fae test` starts (outside training)."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        self.signal_name = signal_name

    def on_test_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), getattr(signal, self.signal_name))


class SignalAncestorAt(L.Callback):
    """Send `signal_name` to this process's ancestor `generations` up (1: its parent) once `step` batches
    are trained: a scheduler's or a user's signal to the job or the command that runs this one. With
    `once`, a file: only if it does not exist yet (it is made), so that a run started again goes on. With
    `group`, to every process of the ancestor's process group, as SLURM signals every process of a step."""

    def __init__(
        self, step: int, signal_name: str = "SIGTERM", generations: int = 1, once: str = "", group: bool = False
    ) -> None:
        self.step, self.signal_name, self.generations, self.once, self.group = (
            step,
            signal_name,
            generations,
            once,
            group,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            if self.once:
                try:
                    os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
            pid = os.getpid()
            for _ in range(self.generations):
                with open(f"/proc/{pid}/stat") as stat:  # pid (name) state ppid ...
                    pid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if self.group:
                os.killpg(os.getpgid(pid), getattr(signal, self.signal_name))
            else:
                os.kill(pid, getattr(signal, self.signal_name))


class LearningRateFrom(L.Callback):
    """Every optimizer's learning rate set to `lr` from `step` on: a run that diverges."""

    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr


class PoisonWeightAt(L.Callback):
    """A weight of the encoder set to infinity once `step` batches are trained (a step that diverged)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            next(pl_module.encoder.parameters()).data.view(-1)[0] = float("inf")


class SyncDebugAt(L.Callback):
    """Run training step `step` (from its batch's start to the next's) under
    torch.cuda.set_sync_debug_mode("error"): a host-device synchronisation in it raises."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        if trainer.global_step == self.step:
            torch.cuda.set_sync_debug_mode("error")
        elif trainer.global_step == self.step + 1:
            torch.cuda.set_sync_debug_mode("default")

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("default")


class DiskFullAt(L.Callback):
    """From the validation at `step` on, every image grid's write fails as on a full disk (ENOSPC), inside
    the PNG encoder's write, as the operating system would fail it; undone when the command ends (the
    tests run fae in their own process)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.original = None

    def on_validation_start(self, trainer, pl_module) -> None:
        import errno

        import fae.images

        if trainer.global_step >= self.step and self.original is None:

            def full(grid, file, **kwargs):
                file.write(b"\x89PNG")  # a part is written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")

            self.original, fae.images.save_image = fae.images.save_image, full

    def teardown(self, trainer, pl_module, stage) -> None:
        import fae.images

        if self.original is not None:
            fae.images.save_image, self.original = self.original, None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")


class KillRankAt(L.Callback):
    """SIGKILL the process of global rank `rank` once `step` batches are trained: a worker lost as to the
    kernel's OOM killer or a failed node, with no chance to say anything."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
