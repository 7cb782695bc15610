"""Generation: every family with a prior samples (prior draw -> decoder mean), a grid of samples is
written at each validation, and `fae sample` writes a checkpoint's samples to a PNG grid or an array,
never over an existing file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fae.errors import UserError
from fae.evaluation.samples import generate, load_model
from fae.models import VAE, WAEGAN, FisherAE
from fae.models.ae import AE
from fae.nets import MNISTDecoder, MNISTEncoder

from .conftest import CONFIGS

NETS = dict(encoder=MNISTEncoder, decoder=MNISTDecoder, latent_dim=8, width=4, grid_images=0)


@pytest.mark.parametrize("family", [VAE, FisherAE, WAEGAN])
def test_a_sample_is_the_decoder_mean_of_a_prior_draw(family):
    model = family(**NETS).eval()
    samples = model.sample(5, generator=torch.Generator().manual_seed(3))
    z = model.sample_prior(5, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (5, 1, 28, 28) and torch.equal(samples, model.decode(z))
    assert torch.equal(samples, model.sample(5, generator=torch.Generator().manual_seed(3)))  # seeded: the same
    if family is WAEGAN:  # its prior N(0, sigma_z^2 I)
        assert torch.equal(z, model.prior_std * torch.randn(5, 8, generator=torch.Generator().manual_seed(3)))


def test_a_family_without_a_prior_says_it_cannot_sample():
    model = AE(**NETS)
    assert not model.can_sample
    with pytest.raises(UserError, match="AE has no prior to sample from"):
        model.sample(2)


def test_svgd_samples_the_polynomial_prior_and_is_refused_for_a_gaussian_one():
    fisher = FisherAE(**NETS, prior="polynomial").eval()
    images = generate(fisher, 6, sampler="svgd", svgd_steps=20)
    assert images.shape == (6, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(UserError, match="--sampler svgd samples the learned polynomial prior; this VAE has"):
        generate(VAE(**NETS), 2, sampler="svgd")


def test_validation_writes_a_sample_grid_and_fae_sample_writes_a_checkpoints_samples(tmp_path, fae_here):
    run = tmp_path / "run"
    fit = fae_here("fit", "--config", str(CONFIGS / "quickstart" / "digits_vae.yaml"), "--model.width", "4",
                   "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                   "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--run_dir", str(run), cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert list((run / "images").glob("val_samples_step*.png"))  # beside the reconstructions
    last = run / "checkpoints" / "last.ckpt"
    out = fae_here("sample", str(last), "--n", "10", "--out", str(tmp_path / "s.npy"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    array = np.load(tmp_path / "s.npy")
    expected = generate(load_model(last), 10)  # seed 0: the same draws
    assert array.shape == (10, 1, 28, 28) and array.dtype == np.float32
    np.testing.assert_allclose(array, expected.numpy(), atol=1e-6)
    again = fae_here("sample", str(last), "--out", str(tmp_path / "s.npy"), cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(
        f"fae: error: {tmp_path / 's.npy'} exists: give another --out"
    )
    assert np.array_equal(np.load(tmp_path / "s.npy"), array)  # the earlier result is untouched
    png = fae_here("sample", str(last), "--out", str(tmp_path / "grid.png"), "--n", "16", cwd=tmp_path)
    assert png.returncode == 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_validation_fits_a_gaussian_to_its_codes_and_fitted_samples_draw_from_it(tmp_path, fae_here):
    """The fit is the mean and covariance of the validation images' codes (a slow reference: the codes of
    that batch through encode); it is saved in checkpoints, `--sampler fitted` draws from it, and a
    checkpoint from before the fit loads and says in one line that it has none."""
    from fae.data import DigitsDataModule

    run = tmp_path / "run"
    fit = fae_here("fit", "--config", str(CONFIGS / "quickstart" / "digits_vae.yaml"), "--model.width", "4",
                   "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                   "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--run_dir", str(run),
                   cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    model = load_model(last)
    data = DigitsDataModule()
    data.setup("fit")
    codes = model.encode(data.to_float(data.splits["val"][:128])).double()  # 2 validation batches of 64
    assert model.code_count.item() == 128 and int(model.code_step) == 2  # the validation at step 2
    torch.testing.assert_close(model.code_mean, codes.mean(0))
    torch.testing.assert_close(model.code_cov, torch.cov(codes.T))
    z = model.sample_fitted(20000, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(z.mean(0), codes.mean(0), atol=0.05 * codes.std(0).max().item(), rtol=0)
    torch.testing.assert_close(
        torch.cov(z.T), torch.cov(codes.T), atol=0.05 * torch.cov(codes.T).abs().max().item(), rtol=0
    )
    out = fae_here(
        "sample", str(last), "--sampler", "fitted", "--out", str(tmp_path / "f.npy"), "--n", "4", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    expected = model.decode(model.sample_fitted(4, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), expected.detach().numpy(), atol=1e-6)
    stale = torch.load(last, weights_only=False)
    stale["state_dict"]["code_step"] = torch.tensor(1)  # as if the last validation came a step before the save
    torch.save(stale, tmp_path / "stale.ckpt")
    out = fae_here("sample", str(tmp_path / "stale.ckpt"), "--sampler", "fitted", "--out", str(tmp_path / "st.png"),
                   cwd=tmp_path)  # fmt: skip
    assert (
        out.returncode == 0
        and "the codes were fitted at the validation of step 1; this checkpoint is at step 2" in (out.stdout)
    )
    old = torch.load(last, weights_only=False)
    for name in ("code_mean", "code_cov", "code_count", "code_step"):
        del old["state_dict"][name]
    torch.save(old, tmp_path / "old.ckpt")
    assert not load_model(tmp_path / "old.ckpt").can_sample_fitted
    refused = fae_here("sample", str(tmp_path / "old.ckpt"), "--sampler", "fitted", "--out", str(tmp_path / "o.png"),
                       cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert "has no fit of its codes" in refused.stderr.strip().splitlines()[-1]
