"""Generation: every family with a prior samples (prior draw -> decoder mean), a grid of samples is
written at each validation, and `fae sample` writes a checkpoint's samples to a PNG grid or an array,
never over an existing file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fae.errors import UserError
from fae.evaluation.samples import check_memory, generate
from fae.models import VAE, WAEGAN, FisherAE
from fae.models.ae import AE
from fae.models.load import load_model
from fae.nets import MNISTDecoder, MNISTEncoder

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
    with pytest.raises(UserError, match=r"polynomial prior; this VAE has a Gaussian prior \(StandardNormal\), sampled"):
        generate(VAE(**NETS), 2, sampler="svgd")
    with pytest.raises(UserError, match=r"polynomial prior; this WAEGAN has a Gaussian prior \(N\(0, sigma_z\^2 I\)\)"):
        generate(WAEGAN(**NETS), 2, sampler="svgd")
    with pytest.raises(UserError, match="polynomial prior; this AE has no prior .it reconstructs.: --sampler fitted"):
        generate(AE(**NETS), 2, sampler="svgd")
    with pytest.raises(UserError, match=r"--n 10000000000000: 10000000000000 images of \(1, 28, 28\) need .* GiB"):
        check_memory(10**13, (1, 28, 28))


@pytest.mark.slow
def test_validation_writes_a_sample_grid_and_fae_sample_writes_a_checkpoints_samples(tmp_path, fae_here, trained_run):
    run = trained_run("vae")
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
    for device, message in {
        "cuda:99": "this machine has",
        "tpu": "give cpu or cuda",
        "cpu:x": "give cpu or cuda",
    }.items():
        wrong = fae_here("sample", str(last), "--out", str(tmp_path / "d.png"), "--device", device, cwd=tmp_path)
        assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith(
            f"fae: error: --device {device}: {message}"
        ), wrong.stderr[-1000:]
    assert not (tmp_path / "d.png").exists()


@pytest.mark.slow
def test_validation_fits_a_gaussian_to_its_codes_and_fitted_samples_draw_from_it(tmp_path, fae_here, trained_run):
    """The fit is the mean and covariance of the validation images' codes (a slow reference: the codes of
    those batches through encode); it is saved in checkpoints, `--sampler fitted` draws from it, and a
    checkpoint from before the fit loads and says in one line that it has none."""
    from fae.data import DigitsDataModule

    last = trained_run("vae") / "checkpoints" / "last.ckpt"  # validations of 2 batches at steps 3 and 6
    model = load_model(last)
    data = DigitsDataModule()
    data.setup("fit")
    codes = model.encode(data.to_float(data.splits["val"][:128])).double()  # 2 validation batches of 64
    assert model.code_fit.count.item() == 128 and int(model.code_fit.step) == 6  # the validation at step 6
    torch.testing.assert_close(model.code_fit.mean, codes.mean(0))
    torch.testing.assert_close(model.code_fit.cov, torch.cov(codes.T))
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
    stale["state_dict"]["code_fit.step"] = torch.tensor(5)  # as if the last validation came a step before the save
    torch.save(stale, tmp_path / "stale.ckpt")
    out = fae_here("sample", str(tmp_path / "stale.ckpt"), "--sampler", "fitted", "--out", str(tmp_path / "st.png"),
                   cwd=tmp_path)  # fmt: skip
    assert (
        out.returncode == 0
        and "the codes were fitted at the validation of step 5; this checkpoint is at step 6" in (out.stdout)
    )
    old = torch.load(last, weights_only=False)
    for name in ("mean", "cov", "count", "step"):
        del old["state_dict"][f"code_fit.{name}"]
    torch.save(old, tmp_path / "old.ckpt")
    assert not load_model(tmp_path / "old.ckpt").code_fit.fitted
    refused = fae_here("sample", str(tmp_path / "old.ckpt"), "--sampler", "fitted", "--out", str(tmp_path / "o.png"),
                       cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert "has no fit of its codes" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_validation_keeps_its_codes_and_fae_sample_draws_from_a_mixture_fitted_to_them(tmp_path, fae_here, trained_run):
    """The mixture's EM data are the validation images' codes (the same slow reference), saved in checkpoints;
    `--sampler gmm --components K` decodes the mixture's draws, as a PNG grid or an array."""
    from fae.data import DigitsDataModule

    last = trained_run("vae") / "checkpoints" / "last.ckpt"  # the demo's config (configs/quickstart), a short run
    model = load_model(last)
    data = DigitsDataModule()
    data.setup("fit")
    codes = model.encode(data.to_float(data.splits["val"][:128]))  # the 2 validation batches of the step-6 validation
    torch.testing.assert_close(model.code_mixture.codes, codes)
    assert int(model.code_mixture.step) == 6
    out = fae_here("sample", str(last), "--sampler", "gmm", "--components", "3", "--n", "4",
                   "--out", str(tmp_path / "g.npy"), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    expected = model.decode(model.sample_mixture(4, 3, generator=torch.Generator().manual_seed(0)))
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), expected.detach().numpy(), atol=1e-6)
    grid = fae_here("sample", str(last), "--sampler", "gmm", "--out", str(tmp_path / "g.png"), cwd=tmp_path)
    assert grid.returncode == 0 and (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", grid.stderr[-2000:]
    refused = fae_here("sample", str(last), "--sampler", "gmm", "--components", "500", "--out", str(tmp_path / "x.png"),
                       cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2 and not (tmp_path / "x.png").exists()
    assert "a mixture of 500 Gaussians needs 500 codes or more; this VAE kept 128" in refused.stderr.splitlines()[-1]


def old_form(checkpoint: dict) -> dict:
    """A checkpoint as an earlier fae wrote it: each net with its own latent_dim and width (and the
    encoder its heads), the fit of the codes under its first names."""
    hparams = checkpoint["hyper_parameters"]
    sizes = {"latent_dim": hparams.pop("latent_dim"), "width": hparams.pop("width")}
    hparams.pop("image_shape")
    for net, extra in (("encoder", {"gaussian": True}), ("decoder", {})):
        spec = hparams[net]
        spec = {"class_path": spec} if isinstance(spec, str) else spec
        hparams[net] = {**spec, "init_args": {**spec.get("init_args", {}), **sizes, **extra}}
    state = checkpoint["state_dict"]
    for name in ("mean", "cov", "count", "step"):
        state[f"code_{name}"] = state.pop(f"code_fit.{name}")
    for name in ("_extra_state", "step"):  # no mixture sampler yet
        del state[f"code_mixture.{name}"]
    return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_fae_sample_takes_every_checkpoint_fae_test_takes_an_old_form_one_too(tmp_path, fae_here, trained_run, family):
    """Both read checkpoints with one reader (fae.checkpoint.checkpoint_facts): an old-form checkpoint loads
    into the same model, which samples the same images."""
    last = trained_run(family) / "checkpoints" / "last.ckpt"
    old = tmp_path / "old.ckpt"
    torch.save(old_form(torch.load(last, weights_only=False)), old)
    for sampler in ("inverse_cdf", "fitted"):
        images = [tmp_path / f"{name}-{sampler}.npy" for name in ("new", "old")]
        for ckpt, out in zip((last, old), images, strict=True):
            done = fae_here("sample", str(ckpt), "--n", "5", "--sampler", sampler, "--out", str(out), cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-2000:]
        assert np.array_equal(np.load(images[0]), np.load(images[1])), sampler
    for name, tensor in load_model(last).state_dict().items():
        if not name.startswith("code_mixture."):  # the old form keeps no codes
            assert torch.equal(load_model(old).state_dict()[name], tensor), name
    assert load_model(old).code_mixture.codes.shape == (0, 8)
    refused = fae_here("sample", str(old), "--sampler", "gmm", "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert refused.returncode == 2 and "keeps no validation codes to fit a mixture to" in refused.stderr
