"""WAE-GAN: two optimizers stepping their own parameters, hand-stepped schedulers and clipping,
exact resumption from a mid-epoch checkpoint (every family), and learning on real digits."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fae.data import DigitsDataModule
from fae.models import VAE, WAEGAN, FisherAE
from fae.nets import MNISTDecoder, MNISTEncoder
from fae.objectives import mmd_imq

from .helpers import QUIET


def small_wae(**kwargs) -> WAEGAN:
    return WAEGAN(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, grid_images=0, **kwargs)


def test_mmd_imq_matches_a_slow_reference():
    x, y, c = torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) + 0.5, 6.0
    k = lambda a, b: c / (c + ((a - b) ** 2).sum())  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    torch.testing.assert_close(mmd_imq(x, y, c), xx + yy - 2 * xy)


def test_encoder_decoder_loss_weighs_cost_and_penalty_as_documented():
    torch.manual_seed(0)
    model = small_wae(penalty_weight=3.0, cost_scale=0.05).eval()
    x = torch.rand(5, 1, 28, 28)
    terms = model.model_step(x)
    codes = model.encoder(x)
    cost = ((x - torch.sigmoid(model.decoder(codes))) ** 2).flatten(1).sum(1)  # c(x, G(Q(x))) = ||x - y||^2
    adversarial = -torch.log(torch.sigmoid(model.discriminator(codes)))  # -log D(Q(x))
    torch.testing.assert_close(terms["reconstruction"], cost)
    torch.testing.assert_close(terms["adversarial"], adversarial)
    torch.testing.assert_close(terms["loss"], 0.05 * cost + 3.0 * adversarial)


class RecordSteps(L.Callback):
    """Wraps each optimizer's step to record which parameters it changed."""

    def __init__(self) -> None:
        self.changed: list[tuple[int, set[str]]] = []

    def on_train_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for index, optimizer in enumerate(trainer.optimizers):
            original = optimizer.step

            def step(*args, _original=original, _index=index, **kwargs):
                before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                result = _original(*args, **kwargs)
                after = dict(pl_module.named_parameters())
                self.changed.append((_index, {n for n in before if not torch.equal(before[n], after[n])}))
                return result

            optimizer.step = step
        self.groups = [{names[id(p)] for g in o.param_groups for p in g["params"]} for o in trainer.optimizers]


def test_both_optimizers_step_every_batch_and_only_their_own_parameters():
    model, recorder = small_wae(), RecordSteps()
    L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder], **QUIET).fit(
        model, datamodule=DigitsDataModule(batch_size=16)
    )
    autoencoder, discriminator = recorder.groups
    assert discriminator == {n for n, _ in model.discriminator.named_parameters(prefix="discriminator")}
    assert autoencoder == {n for n, _ in model.named_parameters()} - discriminator
    assert [index for index, _ in recorder.changed] == [1, 0] * 3  # discriminator, then encoder/decoder
    for index, changed in recorder.changed:
        assert changed == recorder.groups[index]  # every parameter of its own group, none of the other


def test_schedulers_and_gradient_clipping_work_under_manual_optimisation():
    clip = 1e-3
    norms = []

    class GradNorms(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    halve = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # noqa: E731
    model = small_wae(lr_scheduler=halve, discriminator_lr_scheduler=halve, gradient_clip_val=clip)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[GradNorms()], **QUIET)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    assert [g["lr"] for o in trainer.optimizers for g in o.param_groups] == [1e-3 * 0.25, 1e-3 * 0.25]
    assert len(norms) == 8 and max(norms) <= clip * (1 + 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wae_gan", "vae", "fisher"])
def test_resuming_mid_epoch_ends_with_the_same_weights(tmp_path, family):
    batches = 63 + 20  # one epoch of 4000 digits in batches of 64, and 20 batches of the next
    ckpt_every = 63 + 10  # a checkpoint in the middle of the second epoch (steps count batches)

    def run(ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        nets = dict(encoder=MNISTEncoder, decoder=MNISTDecoder, latent_dim=8, width=4)
        model = {
            "wae_gan": small_wae,
            "vae": lambda: VAE(**nets, grid_images=0),
            "fisher": lambda: FisherAE(**nets, learn_decoder_scale=True, grid_images=0),
        }[family]()
        trainer = L.Trainer(
            max_steps=batches,
            limit_val_batches=0,
            callbacks=list(callbacks),
            **{**QUIET, "enable_checkpointing": bool(callbacks)},
        )
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
        return model

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=ckpt_every, save_top_k=-1, filename="{step}")
    uninterrupted = run(callbacks=[saver])
    mid = tmp_path / f"step={ckpt_every}.ckpt"
    assert (
        torch.load(mid, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
        == 10
    )
    resumed = run(ckpt_path=str(mid))
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_training_on_real_digits_lowers_reconstruction_error_and_moves_codes_to_the_prior():
    L.seed_everything(0)
    model = WAEGAN(
        MNISTEncoder,
        MNISTDecoder,
        latent_dim=8,
        width=8,
        grid_images=0,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.5, 0.999)),
        discriminator_optimizer=lambda p: torch.optim.Adam(p, lr=5e-4, betas=(0.5, 0.999)),
    )
    dm = DigitsDataModule(batch_size=64)
    before = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    L.Trainer(max_steps=200, limit_val_batches=0, **QUIET).fit(model, datamodule=dm)
    after = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    assert after["val/recon_bce"] < 0.6 * before["val/recon_bce"]
    # MMD between encoded codes and prior samples: the untrained encoder's codes sit near 0 with a
    # tiny spread, far from N(0, I); the adversarial term pulls them toward it
    assert after["val/mmd"] < 0.5 * before["val/mmd"]
    assert 0.2 < after["val/disc_codes"] < 0.8  # the discriminator cannot tell codes from prior samples well


def test_each_step_encodes_the_batch_once():
    """The discriminator's and the encoder's updates share one encoding: the encoder's BatchNorm statistics
    move once per step, with the usual momentum (before, twice: an effective momentum of 0.19)."""
    model = small_wae()
    L.Trainer(max_steps=5, limit_val_batches=0, **QUIET).fit(model, datamodule=DigitsDataModule(batch_size=16))
    tracked = [m.num_batches_tracked.item() for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert tracked and all(count == 5 for count in tracked), tracked


def test_the_family_builds_a_deterministic_encoder():
    model = WAEGAN(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4)
    assert not model.encoder.gaussian and model.encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 8)  # one head
    assert copy.copy(small_wae()).penalty_weight == 10.0
