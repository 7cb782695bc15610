"""The family interface: the example family of docs/develop.md (a new module of ~20 lines) trains through the
base class alone, a half-implemented family is refused when defined, and nets that break the net
contract are named in one line."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from torch import nn

from fae.data import DigitsDataModule
from fae.errors import UserError
from fae.models.base import AutoEncoder
from fae.nets import MNISTDecoder, MNISTEncoder

from .helpers import CONFIGS, QUIET


def documented_family() -> type:
    """The example family of docs/develop.md, which is fae/models/ae.py."""
    from fae.models.ae import AE

    text = (CONFIGS.parent / "docs" / "develop.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "class AE(" in block]
    assert code in (CONFIGS.parent / "fae" / "models" / "ae.py").read_text()
    return AE


def test_the_documented_family_trains_through_the_base_class_alone():
    L.seed_everything(0)
    model = documented_family()(MNISTEncoder, MNISTDecoder, latent_dim=8, width=8, grid_images=0)
    dm = DigitsDataModule(batch_size=64)
    trainer = L.Trainer(max_steps=60, limit_val_batches=4, val_check_interval=30, **QUIET)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/recon_bce"]
    trainer.fit(model, datamodule=dm)
    after = L.Trainer(limit_val_batches=4, **QUIET).validate(model, datamodule=dm, verbose=False)[0]
    assert after["val/recon_bce"] < 0.8 * before, (before, after)
    assert {"val/loss", "val/recon_mse", "val/active_units"} <= set(after)  # the base's metrics and diagnostics


def test_a_half_implemented_family_is_refused_when_defined():
    with pytest.raises(TypeError, match=r"model family Half is incomplete: define model_step\(\)"):

        class Half(AutoEncoder):
            terms = ("loss",)

            def encode(self, x):
                return self.encoder(x)

    with pytest.raises(TypeError, match=r"list its terms, 'loss' first"):

        class Unordered(AutoEncoder):
            terms = ("nll", "loss")
            encode = model_step = lambda self, x: x


def test_nets_that_break_the_contract_are_named_in_one_line():
    family = documented_family()
    with pytest.raises(UserError, match=r"the encoder Linear does not declare latent_dim, image_shape, gaussian"):
        family(lambda *sizes: nn.Linear(4, 4), MNISTDecoder, latent_dim=8, width=4)

    def small(latent_dim, width, image_shape):
        decoder = MNISTDecoder(latent_dim, width, image_shape)
        decoder.image_shape = (1, 14, 14)
        return decoder

    with pytest.raises(
        UserError,
        match=r"the decoder MNISTDecoder was asked for latent_dim 8 and image_shape "
        r"\(1, 28, 28\) but declares 8 and \(1, 14, 14\)",
    ):
        family(MNISTEncoder, small, latent_dim=8, width=4)
    with pytest.raises(UserError, match=r"the encoder MNISTEncoder was asked for latent_dim 8 and image_shape"):
        family(lambda d, w, shape, gaussian: MNISTEncoder(4, w, shape, gaussian), MNISTDecoder, latent_dim=8, width=4)
    with pytest.raises(UserError, match="the encoder MNISTEncoder was asked for a deterministic encoder"):
        family(lambda d, w, shape, gaussian: MNISTEncoder(d, w, shape, True), MNISTDecoder, latent_dim=8, width=4)
    with pytest.raises(UserError, match="the model's encoder is a built net \\(MNISTEncoder\\); give its class"):
        family(MNISTEncoder(8, 4), MNISTDecoder, latent_dim=8, width=4)
    model = family(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4)
    assert model.encode(torch.rand(2, 1, 28, 28)).shape == (2, 8)  # one head: the family's deterministic encoder


def test_the_reconstruction_error_and_pixel_range_come_from_the_data_module():
    from fae.models import VAE

    model = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0)
    assert model.recon_metric is None  # not stated in the model: the data's
    metrics = L.Trainer(limit_val_batches=1, **QUIET).validate(model, datamodule=DigitsDataModule(), verbose=False)[0]
    assert model.recon_metric == "bce" and "val/recon_bce" in metrics

    def tanh_decoder(latent_dim, width, image_shape):
        decoder = MNISTDecoder(latent_dim, width, image_shape)
        decoder.output_activation = "tanh"  # images in [-1, 1], digits in [0, 1]
        return decoder

    wrong = VAE(MNISTEncoder, tanh_decoder, latent_dim=8, width=4, likelihood="gaussian", grid_images=0)
    with pytest.raises(UserError, match=r"the data's pixels are in \[0.0, 1.0\] but the decoder's tanh output"):
        L.Trainer(limit_val_batches=1, **QUIET).validate(wrong, datamodule=DigitsDataModule(), verbose=False)


def test_a_non_finite_gradient_stops_or_skips_the_step_before_any_weight_moves():
    from fae.models import VAE

    for mode in ("stop", "skip"):
        torch.manual_seed(0)
        model = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0, on_nonfinite=mode)
        weight = model.decoder.layers[0].weight
        weight.register_hook(lambda grad: grad * float("nan"))  # a finite loss, a NaN gradient
        before = {k: v.clone() for k, v in model.named_parameters()}
        trainer = L.Trainer(max_steps=3, limit_val_batches=0, **QUIET)
        if mode == "stop":
            with pytest.raises(UserError, match=r"non-finite gradient of decoder.layers.0.weight at step 0"):
                trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
        else:
            trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
            assert model.nonfinite.skipped_steps == 3  # each step skipped: every gradient cleared, no update
        assert all(torch.equal(before[k], v) for k, v in model.named_parameters()), mode
