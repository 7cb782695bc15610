"""Diagnostics that make a degenerate model visible: recon_mse, encoder_sigma, active_units and
decoder_scale, against direct computations, for every family that has them."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from fae.data import DigitsDataModule
from fae.models import VAE, WAEGAN, FisherAE
from fae.models import metrics as metrics_module
from fae.models.metrics import ActiveUnits, RelativeActiveUnits, active_units
from fae.nets import MNISTDecoder, MNISTEncoder

from .helpers import QUIET


def test_active_units_count_dimensions_whose_code_varies_across_the_batch():
    torch.manual_seed(0)
    scales = torch.tensor([0.0, 0.05, 0.09, 0.11, 0.3, 1.0])  # variance 0, 0.0025, 0.0081, 0.0121, 0.09, 1
    codes = torch.randn(4000, 6) * scales + torch.randn(6)
    slow = 0
    for j in range(6):
        column = [float(v) for v in codes[:, j]]
        mean = sum(column) / len(column)
        slow += sum((v - mean) ** 2 for v in column) / (len(column) - 1) > 0.01
    assert active_units(codes) == slow == 3
    metric = ActiveUnits(6)
    for chunk in codes.split(333):  # over a whole split, batch by batch
        metric.update(chunk)
    assert metric.compute() == slow


def test_relative_active_units_count_the_dimensions_that_carry_the_codes_variance_at_any_scale():
    torch.manual_seed(1)
    spread = torch.tensor([3.0, 2.0, 1.0, 0.12, 0.05, 0.001])  # standard deviations: variances 9 ... 1e-6
    codes = torch.randn(4000, 6) * spread
    variances = codes.var(0)
    slow = int((variances > 0.01 * variances.mean()).sum())  # above 1% of the mean variance
    assert slow == 3  # 9, 4 and 1, of a mean variance 2.34; 0.0144 is not 1% of it (but is above 0.01)
    for scale, absolute in ((1.0, 4), (0.01, 0)):  # the absolute count moves with the codes' scale
        relative, counted = RelativeActiveUnits(6), ActiveUnits(6)
        for chunk in (codes * scale).split(333):
            relative.update(chunk)
            counted.update(chunk)
        assert relative.compute() == slow and counted.compute() == absolute


def families():
    return {
        "vae": VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0),
        "fisher": FisherAE(
            MNISTEncoder,
            MNISTDecoder,
            latent_dim=8,
            width=4,
            learn_decoder_scale=True,
            decoder_scale=0.7,
            grid_images=0,
        ),
        "wae_gan": WAEGAN(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0),
    }


@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_validation_diagnostics_equal_direct_computations(family):
    torch.manual_seed(0)
    model = families()[family]
    dm = DigitsDataModule(eval_batch_size=128)
    metrics = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    model.eval()
    x = dm.to_float(dm.splits["val"])
    with torch.no_grad():
        recon = model.reconstruct(x)
        codes = model.encode(x)
    assert metrics["val/recon_mse"] == pytest.approx((recon - x).pow(2).mean().item(), rel=1e-5)
    assert metrics["val/active_units"] == (codes.var(0) > 0.01).sum().item()
    if family == "wae_gan":
        assert "val/encoder_sigma" not in metrics and "val/decoder_scale" not in metrics
        return
    with torch.no_grad():
        sigma = model.encode_gaussian(x)[1].exp()
    assert metrics["val/encoder_sigma"] == pytest.approx(sigma.mean().item(), rel=1e-5)
    if family == "fisher":
        assert metrics["val/decoder_scale"] == pytest.approx(0.7)
    else:  # a Bernoulli decoder has no scale
        assert "val/decoder_scale" not in metrics


@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_training_logs_the_diagnostics_every_step(tmp_path, family):
    model = families()[family]
    trainer = L.Trainer(
        max_steps=4, limit_val_batches=0, log_every_n_steps=1, **{**QUIET, "logger": CSVLogger(tmp_path)}
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    (path,) = tmp_path.glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(open(path)) if r.get("train/loss")]
    assert len(rows) == 4
    expected = {"train/recon_mse", "train/active_units"} | (set() if family == "wae_gan" else {"train/encoder_sigma"})
    expected |= {"train/decoder_scale"} if family == "fisher" else set()
    for row in rows:
        assert all(row.get(name) for name in expected), (expected, row)
        assert 0 <= float(row["train/active_units"]) <= 8 and 0 < float(row["train/recon_mse"]) < 1
    assert not any(row.get("train/decoder_scale") for row in rows) or family == "fisher"


class StepLosses(L.Callback):
    """Every training step's batch loss, as training_step returned it (automatic optimisation)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


@pytest.mark.parametrize("every", [3, 4])
def test_training_terms_are_computed_for_the_steps_the_loggers_write_and_match_them(tmp_path, every, monkeypatch):
    """fae logs train/<term> only on the steps whose metrics reach the loggers (`loggers_write_this_step`,
    Lightning's private decision): the rows are exactly those of logging every step, each step's own loss."""

    def train(folder):
        torch.manual_seed(0)
        model = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
        losses = StepLosses()
        trainer = L.Trainer(
            max_steps=10,
            limit_val_batches=0,
            log_every_n_steps=every,
            callbacks=[losses],
            **{**QUIET, "logger": CSVLogger(folder)},
        )
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
        (path,) = folder.glob("**/metrics.csv")
        rows = [r for r in csv.DictReader(open(path)) if r.get("train/loss")]
        return {int(r["step"]): float(r["train/loss"]) for r in rows}, losses

    gated, losses = train(tmp_path / "gated")
    assert sorted(gated) == list(range(every - 1, 10, every))
    for step, logged in gated.items():
        assert logged == pytest.approx(losses.losses[step], rel=1e-6), step
    monkeypatch.setattr(metrics_module, "loggers_write_this_step", lambda trainer: True)  # self.log on every step
    assert train(tmp_path / "every")[0] == gated
