"""The WAE-GAN baseline (Tolstikhin et al., ICLR 2018, Algorithm 2) on the paper's nets.

Deterministic encoder Q(x) (supplement Table 2), decoder G(z), prior P_z = N(0, sigma_z^2 I), and a
latent discriminator D(z) = FC(d_z, 256)-ReLU-FC(256, 1)-Sigmoid (supplement Tables 2 and 4). Each
batch takes two optimizer steps, by hand (manual optimisation, two optimizers):

    discriminator:        maximise  lambda/B sum_i [ log D(z_i) + log(1 - D(Q(x_i))) ],  z_i ~ P_z
    encoder and decoder:  minimise  1/B sum_i [ gamma c(x_i, G(Q(x_i))) - lambda log D(Q(x_i)) ]

with the WAE paper's cost c(x, y) = ||x - y||^2 (summed over pixels; G's output is its mean image) and
gamma = `cost_scale`, 1 by default (c as the WAE paper writes it). The WAE authors' code scales c by
0.05, which makes their lambda 20x stronger relative to the cost; `cost_scale: 0.05` reproduces that.
Each batch is encoded once: the discriminator steps on the codes detached, the encoder and decoder on
the same codes (the encoder's BatchNorm statistics move once per step). A step is a batch, as in
every family: Lightning counts each LightningOptimizer.step in global_step,
so the discriminator's update goes to the strategy directly and is not counted, and max_steps,
step-based checkpoints and logged steps mean batches. Schedulers are stepped by hand once per epoch;
gradients are clipped by hand (Lightning's `gradient_clip_val` does not apply under manual
optimisation: set this module's instead).
Validation adds the discriminator's loss, its mean outputs on prior and encoded codes, and an
MMD estimate between encoded codes and prior samples (how close the codes are to the prior).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from fae.data.base import Batch
from fae.errors import UserError, require_positive
from fae.models.base import AutoEncoder, make_optimizer
from fae.nets.contract import DecoderFactory, EncoderFactory
from fae.objectives import mmd_imq, per_sample_sum


class LatentDiscriminator(nn.Module):
    """D(z) = FC(d_z, 256)-ReLU-FC(256, 1)-Sigmoid; returns the logit (B,), D = sigmoid(logit)."""

    def __init__(self, latent_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z).squeeze(1).float()  # logits in float32 under bf16 autocast


def discriminator_loss(logit_prior: Tensor, logit_codes: Tensor) -> Tensor:
    """-[log D(z) + log(1 - D(Q(x)))] per sample, from logits (log-sigmoid, numerically stable)."""
    return -(nn.functional.logsigmoid(logit_prior) + nn.functional.logsigmoid(-logit_codes))


class WAEGAN(AutoEncoder):
    """Wasserstein auto-encoder with a GAN penalty in latent space; see the module docstring."""

    terms = ("loss", "reconstruction", "adversarial")
    needs_unused_parameters = True  # under DDP: each of its two backward passes leaves parameters unused
    eval_metrics_extra = ("disc_loss", "disc_prior", "disc_codes", "mmd")

    def __init__(
        self,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        penalty_weight: float = 10.0,
        cost_scale: float = 1.0,
        prior_std: float = 1.0,
        discriminator_hidden: int = 256,
        discriminator_optimizer: OptimizerCallable = torch.optim.Adam,
        discriminator_lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            encoder, decoder: the nets, as fae.models.base.AutoEncoder builds them (a deterministic
                encoder: one head, the code). The decoder's mean image G(z) is scored by
                c(x, y) = ||x - y||^2.
            penalty_weight: lambda (the WAE paper: 10 on MNIST, 1 on CelebA).
            cost_scale: gamma, the weight of the cost c(x, y) = ||x - y||^2 (1; 0.05 in the WAE authors' code).
            prior_std: sigma_z of the prior N(0, sigma_z^2 I).
            discriminator_hidden: width of the discriminator's hidden layer (256 in the paper).
            discriminator_optimizer: for the discriminator (`optimizer` steps the encoder and decoder).
            discriminator_lr_scheduler: optional, stepped by hand once per epoch (as `lr_scheduler`).
            gradient_clip_val: clip each optimizer's gradient norm to this value (None: no clipping).
            **kwargs: the arguments every family takes (fae.models.base.AutoEncoder).
        """
        super().__init__(encoder, decoder, **kwargs)
        require_positive(type(self).__name__, prior_std=prior_std, discriminator_hidden=discriminator_hidden)
        if penalty_weight < 0 or cost_scale <= 0:
            raise UserError(f"penalty_weight must be >= 0 and cost_scale > 0, got {penalty_weight} and {cost_scale}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise UserError(f"gradient_clip_val must be > 0 (or null), got {gradient_clip_val}")
        self.save_config()
        self.automatic_optimization = False
        self.build_likelihood("gaussian", 1.0, False)  # only its mean map: G(z) = activation(decoder(z))
        self.discriminator = LatentDiscriminator(self.latent_dim, discriminator_hidden)
        self.penalty_weight = penalty_weight
        self.cost_scale = cost_scale
        self.prior_std = prior_std
        self.discriminator_optimizer = discriminator_optimizer
        self.discriminator_lr_scheduler = discriminator_lr_scheduler
        self.gradient_clip_val = gradient_clip_val

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            # each of the two backward passes leaves the other optimizer's parameters without gradients
            raise UserError(
                "the WAE-GAN's two optimizer steps each use part of the parameters: under DDP use "
                "--trainer.strategy ddp_find_unused_parameters_true"
            )

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # (B, d_z)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if generator is None:
            return self.prior_std * torch.randn(n, self.latent_dim, device=self.device)
        return self.prior_std * torch.randn(n, self.latent_dim, generator=generator).to(self.device)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        return self.objective(x, self.encode(x))

    def objective(self, x: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """The encoder/decoder objective gamma c(x, G(Q(x))) - lambda log D(Q(x)), per sample, at the
        codes Q(x) (B, d_z)."""
        recon = self.decode(codes)  # (B, C, H, W)
        reconstruction = per_sample_sum((x - recon).pow(2))
        adversarial = -nn.functional.logsigmoid(self.discriminator(codes))  # -log D(Q(x))
        terms = {
            "loss": self.cost_scale * reconstruction + self.penalty_weight * adversarial,
            "reconstruction": reconstruction,
            "adversarial": adversarial,
        }
        return {**terms, **self.diagnostics(x, recon, codes)}

    def decoder_scale(self) -> None:
        return None  # G(z) is a deterministic decoder: no likelihood scale

    def discriminator_terms(self, codes: Tensor) -> dict[str, Tensor]:
        """The discriminator's loss (lambda times its cross-entropy) and its mean outputs, on prior draws
        against the codes (B, d_z)."""
        logit_prior = self.discriminator(self.sample_prior(len(codes)))
        logit_codes = self.discriminator(codes)
        return {
            "disc_loss": self.penalty_weight * discriminator_loss(logit_prior, logit_codes),
            "disc_prior": torch.sigmoid(logit_prior),
            "disc_codes": torch.sigmoid(logit_codes),
        }

    def compute_gradients(self, optimizer, loss: Tensor) -> None:
        """Gradients of `loss` for `optimizer`'s parameters, clipped when gradient_clip_val is set."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """One batch, two updates, from one encoding of the batch (so that the encoder's BatchNorm
        statistics move once per step, as in every family). Lightning counts every
        LightningOptimizer.step in global_step; the discriminator's update goes to the strategy directly
        (the same precision handling, not counted), so that global_step, max_steps and every step-based
        schedule count batches. A non-finite value masks this update and every later one of the batch
        (`on_nonfinite`, fae.models.guard)."""
        opt_ae, opt_disc = self.optimizers()
        codes = self.encode(batch.x)  # (B, d_z)
        # 1. discriminator: prior codes against the codes, detached (the encoder is not updated here)
        disc = self.discriminator_terms(codes.detach())
        self.check_terms(disc, ("disc_loss",))
        self.compute_gradients(opt_disc, disc["disc_loss"].mean())
        self.trainer.strategy.optimizer_step(opt_disc.optimizer, closure=lambda: None)
        # 2. encoder and decoder: reconstruction + lambda * adversarial (the discriminator is not updated)
        terms = self.objective(batch.x, codes)
        self.check_terms(terms)
        self.compute_gradients(opt_ae, terms["loss"].mean())
        opt_ae.step()
        self.nonfinite.end_steps()
        self.log_training_terms({**terms, "disc_loss": disc["disc_loss"]})

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()  # None, one scheduler, or a list
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def evaluation_terms(self, x: Tensor) -> dict[str, Tensor]:
        terms = self.model_step(x)
        codes = terms["codes"]
        terms.update(self.discriminator_terms(codes))
        mmd = mmd_imq(codes, self.sample_prior(len(codes)), scale=2.0 * self.latent_dim * self.prior_std**2)
        terms["mmd"] = mmd.expand(len(x))
        return terms

    def configure_optimizers(self):
        opt_ae = make_optimizer(self.optimizer, self.autoencoder_parameters(), "optimizer")
        opt_disc = make_optimizer(
            self.discriminator_optimizer, self.discriminator.parameters(), "discriminator_optimizer"
        )
        schedulers = [
            {"scheduler": make(opt), "interval": "epoch"}
            for make, opt in ((self.lr_scheduler, opt_ae), (self.discriminator_lr_scheduler, opt_disc))
            if make is not None
        ]
        return [opt_ae, opt_disc], schedulers
