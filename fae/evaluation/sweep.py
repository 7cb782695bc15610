"""The paper's robustness sweep, run by `fae test` for any model family: it scores; what it found is
published by fae.evaluation.publish.

Models are trained on clean data; at test time every test image is corrupted by every corruption of
the sweep (by default additive Gaussian noise x + sigma N(0, I) at each of `sigmas` and binary
masking with probability nu at each of `nus`; any fae.data.Corruption in `corruptions`), the model
reconstructs decoder(encoder mean of the corrupted image), and the error is taken against the CLEAN
image (BCE for MNIST, MSE for CelebA: the data module's `recon_metric`). One pass over the test set:
each batch is corrupted at all levels on the device, so the data is read once. The noise is keyed by
(seed, kind, level, sample index) (fae.data.noise): every model sees the same corrupted images.

`PerSampleErrors` keeps one error per (level, test sample) and reduces across devices with max:
errors are >= 0 and a sample's error is the same on every device that saw it, so the duplicates
that a DistributedSampler pads the last batch with are counted once, and a sweep on several devices
equals the sweep on one.

With a feature network, the same pass scores sample quality (fae.evaluation.quality): FID of the
reconstructions at every level, and FID, KID, precision and recall of generated images (from the prior and
from the ex-post fits of the codes), as more rows of the same files.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric

from fae.data.base import Batch
from fae.data.noise import BinaryMask, Corruption, GaussianNoise
from fae.errors import UserError
from fae.evaluation.features import load_features
from fae.evaluation.publish import publish, publish_summary
from fae.evaluation.quality import QualityScores, first_visits
from fae.evaluation.results import REFERENCE_KIND, Row
from fae.images import reconstruction_grid
from fae.objectives import RECONSTRUCTION_ERRORS

# The authors' code sweeps 10 noise levels from 0.01 to 2; masking from 0.01 to about 0.9.
DEFAULT_SIGMAS = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0]
DEFAULT_NUS = [0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def errors_of(error_fn, recon: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(recon, the per-sample errors): a sample whose reconstruction is not finite (a model that diverges
    at a level) gets the error +inf (which the max-reduction across devices keeps, as it would not keep
    NaN), and the target in place of its reconstruction for the quality scores, whose rows at that level
    are then marked NaN; decided on the device, without a host read. BCE would refuse the NaN values in a
    traceback."""
    finite = torch.isfinite(recon).flatten(1).all(1)
    safe = torch.where(finite.view(-1, *[1] * (recon.dim() - 1)), recon, target)
    return safe, torch.where(finite, error_fn(safe, target), torch.inf)


@torch.no_grad()
def training_mean(data, device: torch.device) -> Tensor | None:
    """The training split's mean image (C, H, W) on `device`, summed in float64 a chunk at a time (CelebA's
    split as floats would not fit in memory); None for a data module without one."""
    images = getattr(data, "splits", {}).get("train") if data is not None and hasattr(data, "to_float") else None
    if images is None or len(images) == 0:
        return None
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    for start in range(0, len(images), 4096):
        total += data.to_float(images[start : start + 4096]).double().sum(0)
    return (total / len(images)).float().to(device)


def file_hash(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256: which network scored FID/KID."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class PerSampleErrors(Metric):
    """errors[l, i]: the error of test sample i at level l; `seen[i]` marks samples evaluated."""

    full_state_update = False

    def __init__(self, n_levels: int, n_samples: int) -> None:
        super().__init__()
        self.add_state("errors", torch.zeros(n_levels, n_samples), dist_reduce_fx="max")
        self.add_state("seen", torch.zeros(n_samples), dist_reduce_fx="max")

    def update(self, level: int, index: Tensor, error: Tensor) -> None:
        assert (error >= 0).all(), "the max-reduction across devices needs errors >= 0"
        self.errors[level, index] = error.to(self.errors.dtype)
        self.seen[index] = 1.0

    def compute(self) -> tuple[Tensor, Tensor, int]:
        """Per level: mean and standard deviation (over samples) of the error, and the sample count."""
        seen = self.seen > 0
        errors = self.errors[:, seen].double()  # (L, n)
        return errors.mean(1), errors.std(1, unbiased=True), int(seen.sum())


def check_quality_options(quality: str, kid_subset_size: int, prc_neighborhood: int, gmm_components: int) -> None:
    """One line naming the first of the sweep's quality options out of its range."""
    if quality not in ("auto", "on", "off"):
        raise UserError(f"--sweep.quality must be auto, on or off, got {quality!r}")
    if kid_subset_size < 2:
        raise UserError(f"--sweep.kid_subset_size must be >= 2 (KID compares pairs), got {kid_subset_size}")
    if prc_neighborhood < 1:
        raise UserError(f"--sweep.prc_neighborhood must be >= 1, got {prc_neighborhood}")
    if gmm_components < 1:
        raise UserError(f"--sweep.gmm_components must be >= 1, got {gmm_components}")


class RobustnessSweep(L.Callback):
    """Corrupts every test batch by every corruption and scores the reconstructions. `results` holds
    the rows; with loggers they are published to the log folder (the run's test folder under the CLI)
    and to the loggers (fae.evaluation.publish)."""

    def __init__(
        self,
        sigmas: list[float] | None = None,
        nus: list[float] | None = None,
        corruptions: list[Corruption] | None = None,
        seed: int = 0,
        grid_sigmas: list[float] | None = None,
        grid_nus: list[float] | None = None,
        grid_images: int = 32,
        enabled: bool = True,
        quality: Literal["auto", "on", "off"] = "auto",
        features: str | None = None,
        kid_subset_size: int = 1000,
        prc_neighborhood: int = 3,
        gmm_components: int = 10,
    ) -> None:
        """
        Args:
            sigmas: Gaussian noise levels, shorthand for GaussianNoise corruptions (default: 10 values
                from 0.01 to 2, as the authors' code).
            nus: masking probabilities, shorthand for BinaryMask corruptions (default: 0.01, 0.1, ..., 0.9).
            corruptions: more corruptions to sweep, any fae.data.Corruption (one per level), e.g.
                `--sweep.corruptions+=my.module.Kind --sweep.corruptions.level 2`; keyed by `seed`.
            seed: the noise seed; the same for every model so that all see the same images.
            grid_sigmas: noise levels at which to save a grid of reconstructions (default: none).
            grid_nus: masking levels at which to save a grid (default: 0.8, the paper's Figs 2 and 4).
            grid_images: test images in each grid (true images on odd rows, their reconstructions on even).
            enabled: run the sweep under `fae test`.
            quality: FID/KID, precision and recall (fae.evaluation.quality) beside the errors: "auto"
                scores them when a feature network is found (else says why not), "on" requires one, "off" not.
            features: the feature network's file: fae's MNIST classifier (`fae classifier --data_dir
                DIR` writes DIR/fae_mnist_classifier.pt, the default for MNIST data) or, for CelebA,
                FID's Inception weights (pt_inception-2015-12-05-6726825d.pth, or `fae inception`'s file).
            kid_subset_size: images per KID subset (100 subsets, drawn from a fixed seed).
            prc_neighborhood: k of precision and recall: an image's radius is its k-th neighbour's distance.
            gmm_components: the Gaussians of the mixture fitted by EM to the validation codes (gmm_samples).
        """
        self.sigmas = list(DEFAULT_SIGMAS if sigmas is None else sigmas)
        self.nus = list(DEFAULT_NUS if nus is None else nus)
        self.seed = seed
        self.enabled = enabled
        self.corruptions: list[Corruption] = [
            *(GaussianNoise(s, seed) for s in self.sigmas),
            *(BinaryMask(nu, seed) for nu in self.nus),
            *(corruption.seeded(seed) for corruption in corruptions or []),
        ]
        if enabled and not self.corruptions:
            raise UserError("the sweep has no level: give --sweep.sigmas or --sweep.nus, or --sweep.enabled false")
        self.grid_corruptions: list[Corruption] = [GaussianNoise(s, seed) for s in grid_sigmas or []] + [
            BinaryMask(nu, seed) for nu in ([0.8] if grid_nus is None else grid_nus)
        ]
        self.grid_images = grid_images
        check_quality_options(quality, kid_subset_size, prc_neighborhood, gmm_components)
        self.quality_mode, self.features, self.kid_subset_size = quality, features, kid_subset_size
        self.prc_neighborhood, self.gmm_components = prc_neighborhood, gmm_components
        self.quality: QualityScores | None = None
        self.features_hash, self.network = "", ""  # the feature network scoring FID/KID, in their rows
        self.results: list[Row] = []
        self.grids: dict[str, Tensor] = {}
        self.mean_image: Tensor | None = None  # the training set's, for the reference row

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        n_samples = len(trainer.test_dataloaders.dataset)
        self.mean_image = training_mean(trainer.datamodule, pl_module.device)
        levels = len(self.corruptions) + (self.mean_image is not None)  # the reference: one more "level"
        self.errors = PerSampleErrors(levels, n_samples).to(pl_module.device)
        self.quality = self.quality_scores(trainer, pl_module)
        if self.quality is not None:
            (self.order, self.first_visit), self.place = first_visits(trainer, pl_module, n_samples), 0
            samplers = {
                "samples": pl_module.sample_prior,
                "fitted_samples": pl_module.sample_fitted,
                "gmm_samples": lambda n, generator: pl_module.sample_mixture(n, self.gmm_components, generator),
            }
            self.draws = {  # z_i for test image i: the same draws on any number of devices
                kind: samplers[kind](n_samples, torch.Generator().manual_seed(self.seed))
                for kind in self.quality.sample_fid
            }

    def quality_scores(self, trainer: L.Trainer, pl_module: L.LightningModule) -> QualityScores | None:
        """The FID/KID metrics, or None (with one line saying why) when they are off or have no network.
        Fits the model's codes again with the tested weights (AutoEncoder.fit_codes) on the validation
        images, for the fitted samples."""
        if self.quality_mode == "off":
            return None
        file = self.features or getattr(trainer.datamodule, "feature_network", None)
        found = file is not None and Path(file).is_file()
        strategy = trainer.strategy  # every process decides alike, or some would wait for the others forever
        found_everywhere, found_somewhere = (
            strategy.reduce_boolean_decision(found),
            strategy.reduce_boolean_decision(found, all=False),
        )
        if found_somewhere and not found_everywhere:
            raise UserError(f"--sweep.features: {file} is missing on some nodes: put it on storage every node sees")
        if not found:
            data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "the test data"
            why = f"{file} not found" if file else f"{data} has no default network"
            fix = "train MNIST's with `fae classifier --data_dir DIR`, or give --sweep.features FILE"
            if self.quality_mode == "on" or self.features:
                raise UserError(f"--sweep.quality: no feature network for FID/KID ({why}): {fix}")
            rank_zero_info(f"fae: FID/KID not scored ({why}): {fix}, or pass --sweep.quality off")
            return None
        features = load_features(Path(file), pl_module.encoder.image_shape)
        self.features_hash, self.network = file_hash(Path(file)), features.name
        rank_zero_info(f"fae: sample quality through {features.name} ({file}, SHA-256 {self.features_hash}...)")
        levels = [(c.kind, c.level) for c in self.corruptions]
        data = trainer.datamodule
        if data is not None and hasattr(data, "val_dataloader") and hasattr(data, "to_float"):
            with trainer.precision_plugin.forward_context():  # the checkpoint's fit is of its last validation
                pl_module.fit_codes(data.to_float(images.to(pl_module.device)) for images, _ in data.val_dataloader())
        kept = len(pl_module.code_mixture.codes)
        if not pl_module.code_fit.fitted:
            rank_zero_info("fae: no fitted_samples rows: no validation images to fit the codes on, nor a fit saved")
        elif kept < max(2, self.gmm_components):
            rank_zero_info(f"fae: no gmm_samples rows: {kept} validation codes for {self.gmm_components} Gaussians")
        able = {
            "samples": pl_module.can_sample,
            "fitted_samples": pl_module.code_fit.fitted,
            "gmm_samples": kept >= max(2, self.gmm_components),
        }
        kinds = [kind for kind, can in able.items() if can]
        return QualityScores(features, levels, kinds, self.kid_subset_size, self.prc_neighborhood).to(pl_module.device)

    @torch.no_grad()
    def on_test_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx: int, dataloader_idx: int = 0):
        if not self.enabled:
            return
        error_fn = RECONSTRUCTION_ERRORS[pl_module.recon_metric]
        scored = self.quality_batch_start(trainer, pl_module, batch)
        for level, corruption in enumerate(self.corruptions):
            with trainer.precision_plugin.forward_context():  # the trainer's precision, as in test_step
                recon = pl_module.reconstruct(corruption(batch.target, batch.index))  # (B, C, H, W)
            recon, error = errors_of(error_fn, recon, batch.target)
            self.errors.update(level, batch.index, error)
            if scored is not None:
                self.quality.update_recon(level + 1, pl_module.to_unit_range(recon[scored]))
        if self.mean_image is not None:  # the reference: the training set's mean image for every test image
            reference = self.mean_image.expand_as(batch.target)
            self.errors.update(len(self.corruptions), batch.index, error_fn(reference, batch.target))
        if batch_idx == 0 and trainer.is_global_zero and self.grid_images > 0:
            clean, index = batch.target[: self.grid_images], batch.index[: self.grid_images]
            for corruption in self.grid_corruptions:
                recon = pl_module.reconstruct(corruption(clean, index))
                grid = reconstruction_grid(pl_module.to_unit_range(clean), pl_module.to_unit_range(recon))
                self.grids[f"reconstructions_{corruption.kind}_{corruption.level:g}"] = grid.cpu()

    def quality_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch) -> Tensor | None:
        """Scores this batch's clean images, their reconstructions and their samples; returns the places
        of the batch that count for FID/KID (first visits), or None when they are not scored."""
        if self.quality is None:
            return None
        places = slice(self.place, self.place + len(batch.index))
        assert torch.equal(self.order[places], batch.index), "the test batches do not follow the sampler's order"
        scored = self.first_visit[places]
        self.place += len(batch.index)
        clean, index = batch.target[scored], batch.index[scored]
        self.quality.update_real(pl_module.to_unit_range(clean), index)
        with trainer.precision_plugin.forward_context():
            recon = pl_module.reconstruct(clean)
            samples = {kind: pl_module.decode(draws[index]) for kind, draws in self.draws.items()}
        self.quality.update_recon(0, pl_module.to_unit_range(recon))
        for kind, images in samples.items():
            self.quality.update_samples(kind, pl_module.to_unit_range(images), index)
        return scored

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        folder = trainer.log_dir  # every rank calls it: it broadcasts
        self.results = self.error_rows(trainer, pl_module)
        n = self.results[0].n
        broken = {(r.kind, r.level) for r in self.results if not math.isfinite(r.mean)}
        for kind, level in sorted(broken):
            rank_zero_info(
                f"fae: the reconstructions at {kind} {level:g} are not finite for some test images: "
                "that level's rows are marked non-finite (inf, NaN for FID)"
            )
        if self.quality is not None and n < 2:
            rank_zero_info(f"fae: FID/KID not scored: they need 2 test images or more, {n} were tested")
        elif self.quality is not None:
            self.results += [
                replace(self.results[0], kind=kind, level=level, metric=metric, std=spread, features=self.features_hash,
                        network=self.network, mean=math.nan if (kind, level) in broken else value,
                        components=self.gmm_components if kind == "gmm_samples" else -1,
                        neighborhood=self.prc_neighborhood if metric in ("precision", "recall") else -1)
                for (kind, level, metric), (value, spread) in self.quality.compute().items()
            ]  # fmt: skip
        self.quality, self.draws = None, {}  # the feature network and the metrics' states go with them
        if trainer.is_global_zero and trainer.loggers:  # a Trainer without loggers writes no files
            publish(trainer, self.results, self.grids, Path(folder))
        self.errors.reset()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The test's summaries, once its own metrics are computed, into the training run's W&B row too."""
        if trainer.is_global_zero and trainer.loggers:
            publish_summary(trainer, self.results if self.enabled else [])

    def error_rows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Row]:
        """One row per corruption: the mean, spread and count of the errors (synchronised across devices); then
        the reference row, the training mean image's error, when the data has a training split."""
        means, stds, n = self.errors.compute()
        means, stds = means.reshape(-1), stds.reshape(-1)  # torchmetrics squeezes a sweep of one level to 0-d
        rows = [
            Row(
                model=type(pl_module).__name__,
                dataset=type(trainer.datamodule).__name__ if trainer.datamodule is not None else "",
                checkpoint=str(trainer.ckpt_path or ""),
                kind=corruption.kind,
                level=corruption.level,
                metric=pl_module.recon_metric,
                mean=float(mean),
                std=float(std) if math.isfinite(float(std)) else 0.0,
                n=n,
                split="test",
                noise_seed=self.seed,
            )
            for corruption, mean, std in zip(self.corruptions, means, stds, strict=False)  # then the reference's
        ]
        if self.mean_image is not None:
            rows.append(replace(rows[0], kind=REFERENCE_KIND, level=0.0, mean=float(means[-1]), std=float(stds[-1])))
        return rows
