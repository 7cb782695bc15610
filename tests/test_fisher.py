"""The FisherAE module: per-sample terms, numerical safety, and learning on real digits."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from fae.data import DigitsDataModule
from fae.errors import UserError
from fae.models import VAE, FisherAE
from fae.nets import MNISTDecoder, MNISTEncoder
from fae.objectives import fisher_terms, reconstruction_bce

from .helpers import QUIET


def small_fisher(**kwargs) -> FisherAE:
    return FisherAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0, **kwargs)


def terms_with_one_sample_changed(model: FisherAE, changed: int) -> tuple[dict, dict]:
    """Terms on a batch and on the same batch with sample `changed` replaced, from the same state and eps."""
    torch.manual_seed(0)
    x, eps = torch.rand(6, 1, 28, 28), torch.randn(6, 8)
    state = copy.deepcopy(model.state_dict())  # the running statistics move with every training call
    before = model.fisher_terms(x, eps)
    model.load_state_dict(state)
    x2 = x.clone()
    x2[changed] = torch.rand(1, 28, 28)
    return before, model.fisher_terms(x2, eps)


def warm_up_running_statistics(model: FisherAE) -> None:
    for _ in range(5):
        model.fisher_terms(torch.rand(16, 1, 28, 28))


def test_terms_are_per_sample_with_running_batchnorm():
    model = small_fisher(batchnorm="running").train()
    warm_up_running_statistics(model)
    before, after = terms_with_one_sample_changed(model, changed=5)
    for name in FisherAE.terms:
        torch.testing.assert_close(before[name][:5], after[name][:5], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(before[name][5], after[name][5])


def loss_jacobian_in_x(model: FisherAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """d L_i / d x_j for every pair: (B, B) norms of the per-pair gradient blocks, through the model's
    normalisation mode (what fisher_terms computes, with x kept in the graph)."""
    x = x.clone().requires_grad_(True)
    with model.normalisation(x, eps):
        mu, log_sigma = model.encode_gaussian(x)
        z = mu + log_sigma.exp() * eps
        mean = model.likelihood.mean(model.decoder(z))
        loss = fisher_terms(x, mu, log_sigma, eps, z, mean, model.likelihood.log_scale, -z)["loss"]
    rows = [torch.autograd.grad(loss[i], x, retain_graph=True)[0].flatten(1).norm(dim=1) for i in range(len(x))]
    return torch.stack(rows)  # (B, B): row i, column j = || d L_i / d x_j ||


@pytest.mark.parametrize("batchnorm", ["per_sample", "detached", "running"])
def test_per_sample_batchnorm_modes_have_no_cross_sample_derivatives(batchnorm):
    torch.manual_seed(0)
    model = small_fisher(batchnorm=batchnorm).train()
    warm_up_running_statistics(model)
    jacobian = loss_jacobian_in_x(model, torch.rand(5, 1, 28, 28), torch.randn(5, 8))
    off_diagonal = jacobian[~torch.eye(5, dtype=torch.bool)]
    assert (off_diagonal == 0).all() and (jacobian.diagonal() > 0).all()


def test_ordinary_batchnorm_has_cross_sample_derivatives():
    torch.manual_seed(0)
    model = small_fisher(batchnorm="batch").train()
    jacobian = loss_jacobian_in_x(model, torch.rand(5, 1, 28, 28), torch.randn(5, 8))
    assert (jacobian[~torch.eye(5, dtype=torch.bool)] > 1e-6).all()


@pytest.mark.parametrize("batchnorm", ["per_sample", "detached"])
def test_batch_statistics_modes_equal_one_sample_at_a_time_through_the_net_holding_them(batchnorm):
    """The contract of "per_sample" and "detached": each sample's terms are those of the test-time net
    whose BatchNorm statistics are this batch's (biased variance, as training-mode BatchNorm uses)."""
    torch.manual_seed(0)
    model = small_fisher(batchnorm=batchnorm, learn_decoder_scale=True).train()
    x, eps = torch.rand(6, 1, 28, 28), torch.randn(6, 8)
    reference = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {}

    def record(layer, inputs):  # the first call's input: the batch statistics' pass
        seen.setdefault(layer, inputs[0].detach().clone())

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    batch = model.fisher_terms(x, eps)
    for hook in hooks:
        hook.remove()
    for original, layer in zip(
        layers, [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)], strict=True
    ):
        h = seen[original]
        layer.running_mean = h.mean((0, 2, 3))
        layer.running_var = h.var((0, 2, 3), unbiased=False)
    reference.eval()
    for i in range(6):
        alone = reference.fisher_terms(x[i : i + 1], eps[i : i + 1])
        for name in FisherAE.terms:
            torch.testing.assert_close(alone[name][0], batch[name][i], rtol=1e-5, atol=1e-5)
    # and the values are ordinary training-mode BatchNorm's: the decoder score depends on no derivative
    ordinary = copy.deepcopy(reference).train()
    ordinary.batchnorm = "batch"
    torch.testing.assert_close(ordinary.fisher_terms(x, eps)["decoder_score"], batch["decoder_score"])


def test_per_sample_batchnorm_trains_the_weights_through_the_statistics_as_batchnorm_does():
    """A term with no derivative in x or z inside (the decoder score) has the weight gradient of ordinary
    training-mode BatchNorm under "per_sample"; "detached" drops the statistics' part of it."""
    torch.manual_seed(0)
    x, eps = torch.rand(8, 1, 28, 28), torch.randn(8, 8)
    gradients = {}
    for mode in ("per_sample", "batch", "detached"):
        torch.manual_seed(1)
        model = small_fisher(batchnorm=mode).train()
        score = model.fisher_terms(x, eps)["decoder_score"].sum()
        gradients[mode] = torch.cat([g.flatten() for g in torch.autograd.grad(score, list(model.encoder.parameters()))])
    torch.testing.assert_close(gradients["per_sample"], gradients["batch"], rtol=1e-4, atol=1e-4)
    assert (gradients["detached"] - gradients["batch"]).abs().max() > 1e-2 * gradients["batch"].abs().max()


@pytest.mark.parametrize("batchnorm", ["per_sample", "detached"])
def test_batch_statistics_modes_update_the_running_statistics_like_batchnorm(batchnorm):
    model = small_fisher(batchnorm=batchnorm).train()
    plain = copy.deepcopy(model)
    plain.batchnorm = "batch"
    x, eps = torch.rand(32, 1, 28, 28), torch.randn(32, 8)
    model.fisher_terms(x, eps)
    plain.fisher_terms(x, eps)
    for (name, a), b in zip(model.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert model.encoder.layers[3].num_batches_tracked == 1 and model.encoder.layers[3].training


def test_posterior_term_trains_the_decoder_only_when_asked():
    torch.manual_seed(0)
    x, eps = torch.rand(6, 1, 28, 28), torch.randn(6, 8)
    grads, values = {}, {}
    for trains in (True, False):
        torch.manual_seed(1)
        model = small_fisher(batchnorm="detached", posterior_trains_decoder=trains).train()
        terms = model.fisher_terms(x, eps)
        values[trains] = terms["posterior_fisher"].detach()
        grads[trains] = torch.autograd.grad(
            terms["posterior_fisher"].sum(), list(model.decoder.parameters()), allow_unused=True, retain_graph=True
        )
        encoder = torch.autograd.grad(terms["posterior_fisher"].sum(), list(model.encoder.parameters()))
        assert any(g.abs().sum() > 0 for g in encoder)  # the encoder is trained by the posterior term either way
    torch.testing.assert_close(values[True], values[False])  # the same values, other gradients
    assert any(g is not None and g.abs().sum() > 0 for g in grads[True])
    assert all(g is None or g.abs().sum() == 0 for g in grads[False])


def test_training_mode_batchnorm_couples_the_samples():
    model = small_fisher(batchnorm="batch").train()
    before, after = terms_with_one_sample_changed(model, changed=5)
    for name in ("decoder_score", "stability", "posterior_fisher"):
        assert not torch.allclose(before[name][:5], after[name][:5], rtol=1e-4, atol=1e-6)


def test_running_batchnorm_updates_the_running_statistics_like_batchnorm():
    model = small_fisher(batchnorm="running").train()
    layer = model.encoder.layers[3]  # the first BatchNorm
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        activations = model.encoder.layers[:3](x)
    model.fisher_terms(x)
    torch.testing.assert_close(layer.running_mean, 0.1 * activations.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * activations.var((0, 2, 3), unbiased=True))
    assert layer.num_batches_tracked == 1 and layer.training


def test_loss_gradient_reaches_every_parameter():
    model = small_fisher(prior="polynomial", learn_decoder_scale=True).train()
    model.fisher_terms(torch.rand(8, 1, 28, 28))["loss"].mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_non_finite_loss_stops_training_naming_term_and_step_with_weights_intact():
    model = small_fisher()
    weights = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights["before"] = copy.deepcopy(pl_module.state_dict())

    original = model.fisher_terms

    def poisoned(x, eps=None):
        if model.global_step >= 3:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return original(x, eps)

    model.fisher_terms = poisoned
    trainer = L.Trainer(max_steps=10, limit_val_batches=0, callbacks=[Snapshot()], **QUIET)
    with pytest.raises(UserError, match=r"non-finite loss term .*decoder_score.* at step 3 .*no weight was updated"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    for name, value in model.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, weights["before"][name]), name


@pytest.mark.parametrize("batchnorm", ["per_sample", "detached", "running", "batch"])
def test_non_finite_step_is_skipped_on_request(batchnorm):
    model = small_fisher(on_nonfinite="skip", batchnorm=batchnorm)
    original = model.fisher_terms
    states = []

    def poisoned(x, eps=None):
        if model.training and len(states) == 0 and model.global_step == 2:
            states.append(copy.deepcopy(model.state_dict()))
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return original(x, eps)

    class AfterPoisonedStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(states) == 1:
                states.append(copy.deepcopy(pl_module.state_dict()))

    model.fisher_terms = poisoned
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, callbacks=[AfterPoisonedStep()], **QUIET)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert model.nonfinite.skipped_steps == 1  # only the poisoned step: nothing non-finite leaked into later ones
    before, after = states
    for name, value in after.items():  # the skipped step changed no weight and no BatchNorm statistic
        assert torch.equal(value, before[name]), name
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_vae_logs_the_posterior_fisher_divergence_per_sample():
    vae = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4).eval()
    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(0)
    first = vae.posterior_fisher(x)
    x2 = x.clone()
    x2[5] = torch.rand(1, 28, 28)
    torch.manual_seed(0)
    second = vae.posterior_fisher(x2)
    torch.testing.assert_close(first[:5], second[:5])
    assert (first > 0).all()
    metrics = L.Trainer(**QUIET).validate(vae, datamodule=DigitsDataModule(), verbose=False)[0]
    assert metrics["val/posterior_fisher"] > 0


@pytest.mark.slow
def test_training_on_real_digits_beats_the_mean_image_clearly():
    """The shipped settings (per-sample BatchNorm, learned s from 0.5) learn digits, not the mean image."""
    L.seed_everything(0)
    model = FisherAE(
        MNISTEncoder,
        MNISTDecoder,
        latent_dim=8,
        width=8,
        learn_decoder_scale=True,
        decoder_scale=0.5,
        grid_images=0,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    val = dm.to_float(dm.splits["val"])
    mean_image = dm.to_float(dm.splits["train"]).mean(0, keepdim=True).expand_as(val)
    mean_bce = reconstruction_bce(mean_image, val).mean().item()  # about 0.265
    before = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    L.Trainer(max_steps=300, limit_val_batches=0, **QUIET).fit(model, datamodule=dm)
    after = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] - 0.1 * abs(before["val/loss"])
    assert after["val/recon_bce"] < 0.8 * mean_bce  # measured: 0.184 after 300 batches
    assert after["val/recon_mse"] < 0.6 * (mean_image - val).pow(2).mean().item()
    assert after["val/active_units"] >= 4
    assert model.likelihood.log_scale.exp() < 0.45  # the learned scale moves toward ||x - mu||^2 / d


def test_input_noise_and_a_floor_on_s_are_the_theorys_data_conditions():
    """input_noise tau trains on x + tau N(0, I) (evaluation on the clean x); decoder_scale_floor keeps a learned
    s at or above it by projection after each step, while its gradient still moves it above the floor."""
    from fae.errors import UserError
    from fae.models import VAE
    from fae.objectives import dequantise

    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(1)
    noisy = dequantise(x, 0.1, training=True)
    torch.manual_seed(1)
    assert torch.equal(noisy, x + 0.1 * torch.randn_like(x)) and torch.equal(dequantise(x, 0.1, training=False), x)
    model = small_fisher(input_noise=0.1).train()
    torch.manual_seed(2)
    terms = model.model_step(x)
    torch.manual_seed(2)
    expected = model.fisher_terms(x + 0.1 * torch.randn_like(x))
    torch.testing.assert_close(terms["loss"], expected["loss"])  # the same eps: one draw of the noise, then the rest

    floored = FisherAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0, learn_decoder_scale=True,
                       decoder_scale=0.5, decoder_scale_floor=0.3)  # fmt: skip
    optimizer = torch.optim.SGD([floored.likelihood.log_scale], lr=1.0)
    for _ in range(5):  # pulled down hard: a gradient of +1 on log s each step
        optimizer.zero_grad()
        floored.likelihood.log_scale.sum().backward()
        optimizer.step()
        floored.on_train_batch_end(None, None, 0)
    assert floored.decoder_scale().item() == pytest.approx(0.3)
    optimizer.zero_grad()
    (-floored.likelihood.log_scale).sum().backward()  # and back up: the projection keeps the gradient
    optimizer.step()
    floored.on_train_batch_end(None, None, 0)
    assert floored.decoder_scale().item() == pytest.approx(0.3 * math.e)
    for kwargs, message in [
        (dict(decoder_scale_floor=0.3), "decoder_scale_floor 0.3 needs a learned scale"),
        (dict(learn_decoder_scale=True, decoder_scale=0.2, decoder_scale_floor=0.3), "starting at or above it"),
        (dict(input_noise=-1.0), "input_noise must be >= 0"),
    ]:
        with pytest.raises(UserError, match=message):
            FisherAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0, **kwargs)
    with pytest.raises(UserError, match="a Bernoulli likelihood takes targets in"):
        VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, input_noise=0.1)
