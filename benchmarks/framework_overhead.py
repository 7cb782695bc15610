"""What fae itself costs per training step: `fae fit` against a bare PyTorch loop, per family, paired step by step.

fae:   `fae fit --config configs/quickstart/digits_<family>.yaml --model.width W` run in this process
       exactly as a user runs it (run folder, W&B offline, CSV log, checkpoint callback, progress bar,
       metrics, the non-finite checks), with one callback appended (`--trainer.callbacks+=`).
bare:  the same model, built a second time from the same config, with its own Adam (fused, as fae builds
       it), trained by a loop written here: a random batch of the same 4000 digits, the family's
       objective (`model_step`, as fae calls it), backward, step; for the WAE-GAN the discriminator's
       update first, as fae does. No Lightning, no logging, no checks.
floor: Lightning's own loop around the bare step: a LightningModule whose training_step is the bare
       step (manual optimisation), in a Trainer without logger, checkpoints, progress bar or callbacks,
       paired with a bare loop the same way. What fae adds is fae - floor; the floor is Lightning's.

The callback takes one bare step at the start of every fae batch, so the two alternate step by step
and the machine's drift (which moves a step's time by 10-30% between runs here) falls on both alike:
a fae step is the time from the end of one bare step to the start of the next (the whole fae batch:
loading, hooks, step, logging), a bare step the time it takes. Medians over `--steps` steps after
`--warmup`, printed per family at the paper's width (64) and at width 8, where a step is short and
the overhead shows, as `ratio fae/bare <family>:` with the milliseconds fae adds, and
`ratio lightning/bare <family>:` for the floor. Targets (issue 23): at most 1.03 at width 64 and 1.05
at width 8. On a GPU a step is ~50-100x shorter while the Python per step is not, so its share grows
there: `--accelerator cuda` measures it on a GPU (benchmarks/gpu_check.sh runs it where a GPU is lent;
each step's ends then wait for the GPU's queue, on both sides alike).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from fae.cli import main
from fae.cli.lightning import FaeCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
FAMILIES = ("vae", "fisher", "wae_gan")


class BareLoop:
    """A copy of a family's model trained without Lightning, one step at a time."""

    def __init__(self, family: str, width: int, device: torch.device) -> None:
        config = ["--config", str(CONFIGS / f"digits_{family}.yaml"), "--model.width", str(width)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli = FaeCLI(args=config, run=False)
        self.family, self.model, self.data = family, cli.model.train().to(device), cli.datamodule
        self.device = device
        self.data.setup()
        self.images = self.data.splits["train"]
        if family == "wae_gan":
            self.optimizer = torch.optim.Adam(
                self.model.autoencoder_parameters(), lr=1e-3, betas=(0.5, 0.999), fused=True
            )
            self.discriminator_optimizer = torch.optim.Adam(self.model.discriminator.parameters(), lr=5e-4, fused=True)
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True)

    def batch(self) -> torch.Tensor:
        """A random batch of 64, moved and converted as fae's data module does (uint8 over, floats there)."""
        images = self.images[torch.randint(len(self.images), (64,))]
        return self.data.to_float(images.to(self.device, non_blocking=True))

    def step(self) -> None:
        x = self.batch()
        if self.family == "wae_gan":  # one encoding, two updates, as the family's training_step
            codes = self.model.encode(x)
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            self.model.discriminator_terms(codes.detach())["disc_loss"].mean().backward()
            self.discriminator_optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.objective(x, codes)["loss"].mean().backward()
            self.optimizer.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.model.model_step(x)["loss"].mean().backward()
        self.optimizer.step()


class Floor(L.LightningModule):
    """Lightning's loop around a bare step: the step of `loop`, through Lightning's optimizers."""

    def __init__(self, loop: BareLoop) -> None:
        super().__init__()
        self.loop, self.net, self.automatic_optimization = loop, loop.model, False

    def training_step(self, x, batch_idx: int) -> None:
        loop, model = self.loop, self.loop.model
        if loop.family == "wae_gan":
            opt, opt_disc = self.optimizers()
            codes = model.encode(x)
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(model.discriminator_terms(codes.detach())["disc_loss"].mean())
            opt_disc.step()
            opt.zero_grad(set_to_none=True)
            self.manual_backward(model.objective(x, codes)["loss"].mean())
            opt.step()
            return
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(model.model_step(x)["loss"].mean())
        opt.step()

    def configure_optimizers(self):
        loop = self.loop
        return [loop.optimizer, loop.discriminator_optimizer] if loop.family == "wae_gan" else loop.optimizer


class RandomBatches(torch.utils.data.IterableDataset):
    """Batches as the bare loop draws them, endlessly."""

    def __init__(self, loop: BareLoop) -> None:
        self.loop = loop

    def __iter__(self):
        while True:
            yield self.loop.data.to_float(
                self.loop.images[torch.randint(len(self.loop.images), (64,))]
            )  # Lightning moves it


BARE: BareLoop | None = None  # set before each fae run
TIMES: dict[str, list[float]] = {"fae": [], "bare": []}


class PairedSteps(L.Callback):
    """At the start of every fae batch: the fae step just ended is timed, then one bare step."""

    def __init__(self) -> None:
        self.fae_start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        wait()
        now = time.perf_counter()
        if self.fae_start is not None:
            TIMES["fae"].append(now - self.fae_start)
        BARE.step()
        wait()
        self.fae_start = time.perf_counter()
        TIMES["bare"].append(self.fae_start - now)


def wait() -> None:
    """On a GPU, the queued kernels finished (at both ends of both steps alike), so that a step's time is its own."""
    if BARE is not None and BARE.device.type == "cuda":
        torch.cuda.synchronize()


def paired(family: str, width: int, steps: int, warmup: int, folder: Path, accelerator: str) -> tuple[float, float]:
    global BARE
    BARE = BareLoop(family, width, torch.device(accelerator))
    for times in TIMES.values():
        times.clear()
    args = ["fit", "--config", str(CONFIGS / f"digits_{family}.yaml"), "--model.width", str(width),
            "--trainer.max_steps", str(warmup + steps + 1), "--trainer.num_sanity_val_steps", "0",
            "--trainer.accelerator", accelerator, "--trainer.devices", "1",
            "--trainer.callbacks+=__main__.PairedSteps", "--runs_dir", str(folder)]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)
    return statistics.median(TIMES["fae"][warmup:]), statistics.median(TIMES["bare"][warmup:])


def floor(family: str, width: int, steps: int, warmup: int, folder: Path, accelerator: str) -> tuple[float, float]:
    global BARE
    device = torch.device(accelerator)
    BARE, inner = BareLoop(family, width, device), BareLoop(family, width, device)
    for times in TIMES.values():
        times.clear()
    trainer = L.Trainer(max_steps=warmup + steps + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[PairedSteps()],
                        accelerator=accelerator, devices=1, default_root_dir=folder)  # fmt: skip
    loader = torch.utils.data.DataLoader(RandomBatches(inner), batch_size=None)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(Floor(inner), loader)
    return statistics.median(TIMES["fae"][warmup:]), statistics.median(TIMES["bare"][warmup:])


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    where = torch.cuda.get_device_name() if args.accelerator == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"training step, batch 64, {where}; median of {args.steps} paired steps:")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # W&B's offline files and the run folders
        for width in args.widths:
            for family in args.families:
                fae, bare = paired(
                    family, width, args.steps, args.warmup, Path(tmp) / f"{family}-{width}", args.accelerator
                )
                low, low_bare = floor(family, width, args.steps, args.warmup, Path(tmp) / f"floor-{family}-{width}",
                                      args.accelerator)  # fmt: skip
                print(f"  {family:8s} width {width:3d}: fae {fae * 1e3:8.2f} ms, bare {bare * 1e3:8.2f} ms; "
                      f"Lightning's loop alone {low * 1e3:8.2f} ms, bare {low_bare * 1e3:8.2f} ms")  # fmt: skip
                suffix = "" if width == 64 else f" width {width}"
                print(f"ratio fae/bare {family}{suffix}: {fae / bare:.3f} (+{(fae - bare) * 1e3:.2f} ms)")
                print(f"ratio lightning/bare {family}{suffix}: {low / low_bare:.3f} (+{(low - low_bare) * 1e3:.2f} ms)")


if __name__ == "__main__":
    main_benchmark()
