"""The VAE: its loss is the negative ELBO, it reconstructs from the encoder mean, and it learns real digits."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fae.data import DigitsDataModule
from fae.models import VAE
from fae.nets import MNISTDecoder, MNISTEncoder
from fae.objectives import bernoulli_nll, kl_to_standard_normal

from .helpers import QUIET


def small_vae(width: int = 4, **kwargs) -> VAE:
    return VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=width, **kwargs)


def test_loss_is_negative_elbo_with_one_reparameterised_sample():
    torch.manual_seed(0)
    vae = small_vae().eval()
    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(1)
    terms = vae.model_step(x)
    torch.manual_seed(1)
    mu, logvar = vae.encoder(x).chunk(2, 1)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    nll = bernoulli_nll(vae.decoder(z), x)
    torch.testing.assert_close(terms["nll"], nll)
    torch.testing.assert_close(terms["kl"], kl_to_standard_normal(mu, logvar))
    torch.testing.assert_close(terms["loss"], nll + terms["kl"])


def test_reconstruct_decodes_the_encoder_mean():
    vae = small_vae().eval()
    x = torch.rand(5, 1, 28, 28)
    mu = vae.encoder(x)[:, :8]
    torch.testing.assert_close(vae.reconstruct(x), torch.sigmoid(vae.decoder(mu)))
    assert torch.equal(vae.reconstruct(x), vae.reconstruct(x))  # no sampling


def test_gaussian_likelihood_with_learned_scale_is_a_parameter():
    vae = small_vae(likelihood="gaussian", decoder_scale=0.5, learn_decoder_scale=True)
    assert any(p is vae.likelihood.log_scale for p in vae.parameters())
    torch.testing.assert_close(vae.likelihood.log_scale.exp(), torch.tensor(0.5))


def test_the_model_states_the_sizes_once_and_builds_both_nets_from_them():
    vae = VAE(MNISTEncoder, MNISTDecoder, latent_dim=6, width=4)
    assert vae.encoder.latent_dim == vae.decoder.latent_dim == vae.prior.latent_dim == 6
    assert vae.encoder.gaussian  # two heads, the family's choice
    assert vae.encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 12)
    first = next(m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    assert first.out_channels == last.in_channels == 4  # the width, in both nets


@pytest.mark.slow
def test_training_on_real_digits_lowers_loss_and_reconstruction_error():
    L.seed_everything(0)
    vae = small_vae(width=8, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), grid_images=0)
    dm = DigitsDataModule(batch_size=64)
    before = L.Trainer(**QUIET).validate(vae, datamodule=dm, verbose=False)[0]
    L.Trainer(max_steps=200, limit_val_batches=0, **QUIET).fit(vae, datamodule=dm)
    after = L.Trainer(**QUIET).validate(vae, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < 0.6 * before["val/loss"]  # about 545 nats at initialisation
    assert after["val/recon_bce"] < 0.5 * before["val/recon_bce"]
    assert after["val/kl"] > 3.0  # the posterior has not collapsed to the prior
