"""How often a training step waits for the device: host-device synchronisations counted on one step
that logs nothing, per family, and where each comes from.

`fae fit --config configs/quickstart/digits_<family>.yaml` runs in this process as a user runs it
(progress bar, checkpoint callback, metrics, the non-finite checks), with logging every 1000 steps and
no validation, and one callback appended that counts from the start of batch `--step` to the start of
the next (the whole step: hooks, training_step, backward, the optimizer, callbacks, the loop's own
bookkeeping, the next batch's transfer). Counted, as the calls that make a host wait for a GPU:
  - the aten operators that read a device value back: `_local_scalar_dense` (`.item()`, and `bool`,
    `int`, `float` of a tensor), `is_nonzero`, `nonzero`, `equal` (seen by a TorchDispatchMode);
  - `Tensor.tolist`, `Tensor.cpu`, `Tensor.numpy` and `torch.cuda.synchronize`, wrapped here, since on a
    CPU tensor they dispatch nothing.
On this CPU every tensor is a host tensor, so calls that on a GPU stay on the host would count: those
are left out by their call stack, the data's before it reaches the model (the DataLoader, fae.data)
and torch.optim's (Adam keeps its step counters on the host unless `capturable`, and reads them
there). Each count is printed with the line of fae or Lightning that made it.

Prints `host syncs per step <family>: N` (target, issue 23: 0 for every family). `--accelerator cuda` counts
on a GPU, where tests/test_gpu.py also runs the step under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import os
import tempfile
import traceback
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fae.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FAMILIES = ("vae", "fisher", "wae_gan")
READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal"}  # aten operators that read a device value
WRAPPED = (("Tensor.tolist", torch.Tensor, "tolist"), ("Tensor.cpu", torch.Tensor, "cpu"),
           ("Tensor.numpy", torch.Tensor, "numpy"), ("torch.cuda.synchronize", torch.cuda, "synchronize"))  # fmt: skip
DATA_SIDE = (f"torch{os.sep}utils{os.sep}data", f"fae{os.sep}data{os.sep}")  # the data before the model
TORCH_INTERNALS = (  # the frames between a call and the code that made it
    f"torch{os.sep}_tensor.py", f"torch{os.sep}utils{os.sep}_python_dispatch", f"torch{os.sep}_compile.py",
    f"torch{os.sep}_dynamo{os.sep}", "host_syncs.py",
)  # fmt: skip
COUNTS: collections.Counter = collections.Counter()  # (what, where) -> calls
COUNTING = [False]


def caller() -> str | None:
    """The line of fae or Lightning that made the call (None when it stays on the host on a GPU)."""
    frames = traceback.extract_stack()[:-3]
    if any(part in frame.filename for frame in frames for part in DATA_SIDE):
        return None
    direct = next((f for f in reversed(frames) if not any(part in f.filename for part in TORCH_INTERNALS)), None)
    if direct is not None and f"torch{os.sep}optim{os.sep}" in direct.filename:
        return None  # an optimizer's host-side step counter
    for frame in reversed(frames):
        if f"{os.sep}fae{os.sep}" in frame.filename or f"{os.sep}lightning{os.sep}" in frame.filename:
            where = frame.filename.split(f"site-packages{os.sep}")[-1].split(f"{os.sep}main{os.sep}")[-1]
            return f"{where}:{frame.lineno} ({frame.name})"
    return "elsewhere"


def count(what: str) -> None:
    where = caller()
    if where is not None:
        COUNTS[(what, where)] += 1


class Reads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if COUNTING[0] and func._overloadpacket.__name__ in READS:
            count(f"aten.{func._overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def wrapped_reads():
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in WRAPPED]
    for (what, owner, name), (_, _, original) in zip(WRAPPED, originals, strict=True):

        def wrapper(*args, _original=original, _what=what, **kwargs):
            if COUNTING[0]:
                count(_what)
            return _original(*args, **kwargs)

        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


STEP = [5]


class CountOneStep(L.Callback):
    """Counts from the start of batch STEP to the start of the next."""

    def __init__(self) -> None:
        self.mode: Reads | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == STEP[0]:
            self.mode = Reads()
            self.mode.__enter__()
            COUNTING[0] = True
        elif self.mode is not None:
            COUNTING[0] = False
            self.mode.__exit__(None, None, None)
            self.mode = None


def syncs_of(family: str, width: int, folder: Path, accelerator: str) -> collections.Counter:
    COUNTS.clear()
    args = ["fit", "--config", str(CONFIGS / f"digits_{family}.yaml"), "--model.width", str(width),
            "--trainer.max_steps", str(STEP[0] + 2), "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1000",
            "--trainer.enable_model_summary", "false", "--trainer.accelerator", accelerator, "--trainer.devices", "1",
            "--trainer.callbacks+=__main__.CountOneStep", "--runs_dir", str(folder)]  # fmt: skip
    with wrapped_reads(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)
    return collections.Counter(COUNTS)


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--step", type=int, default=5, help="the step counted (it must log nothing)")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    STEP[0] = args.step
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # their lines go to the real stderr
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"host-device synchronisations in training step {args.step} (logs nothing), width {args.width}, "
          f"on {args.accelerator}:")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for family in args.families:
            counts = syncs_of(family, args.width, Path(tmp) / family, args.accelerator)
            for (what, where), n in sorted(counts.items(), key=lambda item: item[0][1]):
                print(f"  {family:8s} {n:3d} x {what:24s} {where}")
            print(f"host syncs per step {family}: {sum(counts.values())}")


if __name__ == "__main__":
    main_benchmark()
