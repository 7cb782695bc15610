"""Sample quality under `fae test`: FID, KID (torchmetrics) and precision and recall (torch-fidelity) of a
model's images against the test images.

The sets of images scored against the clean test images, all in one pass over the test set:
  - samples: z ~ p(z) decoded (the decoder mean), one per test image, z_i drawn from a generator
    seeded once, so sample i is the same on any number of devices; FID, KID, precision and recall;
  - fitted_samples: likewise from z ~ N(m, C), the Gaussian fitted to the validation images' codes
    with the tested weights (AutoEncoder.fit_codes, sample_fitted; every family, the AE too), and
    gmm_samples from the mixture of Gaussians fitted to them by EM (sample_mixture); the same scores;
  - reconstructions of the clean test images; FID;
  - reconstructions of the corrupted test images at each level of the sweep, as the authors score
    CelebA; FID.
The features are those of a feature network (fae.evaluation.features). The FID is Heusel et al.'s
||m_r - m_g||^2 + Tr(C_r + C_g - 2 (C_r C_g)^(1/2)) of the feature means and covariances; the KID
(Binkowski et al.) the unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets.
Precision and recall (Kynkaanniemi et al. 2019) split what the FID mixes, fidelity and coverage: each
image's k-nearest-neighbour ball in feature space (radius: the distance to its k-th neighbour in its own
set, k = 3 by default) covers a region; precision is the share of generated images inside some real
image's ball (samples that look real), recall the share of real images inside some generated image's
ball (the data the samples cover). Both depend on the number of images (here the test set's).

Several devices: a DistributedSampler pads the last batch with duplicates; `first_visits` keeps each
test image at its first place only, so that every image counts once and the scores equal those on
one device. The KID's subsets are drawn from a fixed seed after its features are put in test-image
order: the same subsets on any number of devices.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities.data import dim_zero_cat

from fae.evaluation.features import Frozen


class Passthrough(nn.Module):
    """Features computed once, handed to several torchmetrics scores: the identity, with their size."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class GeneratedScores(KernelInceptionDistance):
    """The scores of a set of generated images against the real ones from every image's features, kept
    in test-image order so that nothing depends on the number of devices: torchmetrics' KID, whose
    random subsets are drawn by a generator of its own seeded with `seed` (the global random streams
    are untouched), and precision and recall with `neighborhood` nearest neighbours (torch-fidelity's
    prc_features_to_metric). Each feature row carries its test-image index in an extra last column, and
    the rows are put in index order. With fewer images than `subset_size`: one KID subset of all of
    them, and a line says so."""

    def __init__(self, num_features: int, seed: int = 0, neighborhood: int = 3, **kwargs) -> None:
        with warnings.catch_warnings():  # its note that it keeps every feature: (d + 1) floats an image here
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            super().__init__(feature=Passthrough(num_features + 1), **kwargs)
        self.seed, self.neighborhood = seed, neighborhood

    def update(self, features: Tensor, real: bool, index: Tensor) -> None:  # type: ignore[override]
        # in float64: the cubic kernel of features of norm ~10 sums to ~1e10 over a subset
        super().update(torch.cat([features.double(), index[:, None].double()], dim=1), real)

    def compute(self) -> dict[str, tuple[float, float]]:
        """{"kid", "precision", "recall": (value, spread)}: the KID's spread over its subsets, 0 for the others."""
        real, fake = (dim_zero_cat(rows) for rows in (self.real_features, self.fake_features))
        real, fake = (rows[rows[:, -1].argsort()][:, :-1] for rows in (real, fake))
        kid, kid_std = self.kid(real, fake)
        scores = {"kid": (float(kid), float(kid_std))}
        if min(len(real), len(fake)) > self.neighborhood:  # in float64: distances of near neighbours, compared
            found = prc_features_to_metric(fake, real, prc_neighborhood=self.neighborhood, prc_batch_size=10000,
                                           save_cpu_ram=True, verbose=False)  # fmt: skip
            scores |= {name: (float(found[name]), 0.0) for name in ("precision", "recall")}
        else:
            rank_zero_info(f"fae: no precision and recall: {min(len(real), len(fake))} images, and each needs "
                           f"{self.neighborhood} neighbours (--sweep.prc_neighborhood)")  # fmt: skip
        return scores

    def kid(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and spread of the unbiased MMD^2 over the seeded subsets of the ordered features."""
        size, subsets = self.subset_size, self.subsets
        if min(len(real), len(fake)) < size:
            size, subsets = min(len(real), len(fake)), 1
            rank_zero_info(f"fae: KID on one subset of all {size} images (fewer than --sweep.kid_subset_size)")
        generator = torch.Generator().manual_seed(self.seed)
        draw = lambda rows: rows[torch.randperm(len(rows), generator=generator)[:size].to(rows.device)]  # noqa: E731
        scores = torch.stack(
            [poly_mmd(draw(real), draw(fake), self.degree, self.gamma, self.coef) for _ in range(subsets)]
        )
        return scores.mean(), scores.std(unbiased=False)


def first_visits(trainer: L.Trainer, pl_module: L.LightningModule, n_images: int) -> tuple[Tensor, Tensor]:
    """This device's test order (the image index at each place) and which places hold an image's first
    visit across all devices (bool): the duplicates a DistributedSampler pads with are False."""
    mine = torch.as_tensor(list(iter(trainer.test_dataloaders.sampler)), dtype=torch.long, device=pl_module.device)
    everyone = pl_module.all_gather(mine).reshape(trainer.world_size, -1)
    return mine, first_visit_mask(everyone, n_images)[trainer.global_rank]


def first_visit_mask(orders: Tensor, n_images: int) -> Tensor:
    """orders[r]: the image indices device r visits, in order (world, m) -> (world, m) bool, True at
    the first visit of each image in rank-major order."""
    everyone = orders.reshape(-1)
    places = torch.arange(len(everyone), device=everyone.device)
    first = torch.full((n_images,), len(everyone), device=everyone.device, dtype=torch.long)
    first.scatter_reduce_(0, everyone, places, reduce="amin")
    return (first[everyone] == places).reshape(orders.shape)


class QualityScores(nn.Module):
    """The quality metrics of one `fae test`: `update_*` take images in [0, 1] of the test images that
    count (first visits) and, for the ordered scores, their indices. `sample_kinds` name the sets of
    generated images: "samples" (the prior's), "fitted_samples" and "gmm_samples" (the fits of the codes')."""

    def __init__(
        self,
        features: Frozen,
        levels: list[tuple[str, float]],
        sample_kinds: list[str],
        kid_subset_size: int,
        neighborhood: int = 3,
    ) -> None:
        super().__init__()
        self.features = features
        self.levels = [("clean", 0.0), *levels]
        fid = lambda: FrechetInceptionDistance(feature=Passthrough(features.num_features))  # noqa: E731
        self.recon_fid = nn.ModuleList(fid() for _ in self.levels)
        self.sample_fid = nn.ModuleDict({kind: fid() for kind in sample_kinds})
        self.sample_scores = nn.ModuleDict(
            {
                kind: GeneratedScores(features.num_features, neighborhood=neighborhood, subset_size=kid_subset_size)
                for kind in sample_kinds
            }
        )

    def update_real(self, images: Tensor, index: Tensor) -> None:
        real = self.features(images).double()  # float64 scores (torchmetrics returns the features' dtype)
        for metric in [*self.recon_fid, *self.sample_fid.values()]:
            metric.update(real, real=True)
        for metric in self.sample_scores.values():
            metric.update(real, real=True, index=index)

    def update_recon(self, level: int, images: Tensor) -> None:
        """Reconstructions at level `level` of `self.levels` (0: of the clean images)."""
        self.recon_fid[level].update(self.features(images).double(), real=False)

    def update_samples(self, kind: str, images: Tensor, index: Tensor) -> None:
        fake = self.features(images).double()
        self.sample_fid[kind].update(fake, real=False)
        self.sample_scores[kind].update(fake, real=False, index=index)

    def compute(self) -> dict[tuple[str, float, str], tuple[float, float]]:
        """{(kind, level, metric): (value, standard deviation)}, synchronised across devices; the FID,
        precision and recall have no spread (0), the KID's is over its subsets."""
        scores = {
            (kind, level, "fid"): (float(metric.compute()), 0.0)
            for (kind, level), metric in zip(self.levels, self.recon_fid, strict=True)
        }
        for kind, fid in self.sample_fid.items():
            scores[(kind, 0.0, "fid")] = (float(fid.compute()), 0.0)
            for name, value in self.sample_scores[kind].compute().items():
                scores[(kind, 0.0, name)] = value
        return scores

    def reset(self) -> None:
        for metric in [*self.recon_fid, *self.sample_fid.values(), *self.sample_scores.values()]:
            metric.reset()
