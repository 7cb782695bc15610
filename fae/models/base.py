"""What every model family shares: encode, decode, reconstruct, the steps, metrics and image grids.

A family subclasses `AutoEncoder` (or `GaussianAutoEncoder`, for a Gaussian encoder) and provides
`encode(x)` (the code used to reconstruct: the encoder mean for a Gaussian encoder) and
`model_step(x)`, returning the objective's per-sample terms {name: (B,)} on the input x, the
objective under "loss", and the diagnostics of `diagnostics(...)` (per sample, and the encoder's
codes under "codes"). Everything else is here, once:

  - `decode(z)` = mu_theta(z), the decoder net's output through its activation;
  - `reconstruct(x)` = decode(encode(x)): what the robustness sweep scores against the clean image;
  - `sample(n)` = decode(z), z ~ p(z) from `sample_prior` (a family with a prior provides it);
  - `sample_fitted(n)`: codes from N(m, C), the Gaussian fitted to the validation images' codes at
    each validation (the ex-post density of Ghosh et al. 2020's RAEs; saved in checkpoints), for every
    family: where a model's codes do not follow its prior, its decoder is still judged on codes it
    saw;
  - the nets, built from the model's latent_dim and width and the data's image shape
    (fae.nets.contract), optionally compiled (`compile_nets`);
  - train/<term> on the steps the loggers write; val/<term> and val/recon_<metric> (test/... under
    `fae test`) averaged with torchmetrics, so that they reduce correctly across devices; a grid of
    images (odd rows) and their reconstructions (even rows), and a grid of samples from fixed prior
    draws, once per validation and test;
  - for Gaussian encoders, val/posterior_fisher: the posterior Fisher divergence
        D(q(z|x) || p(z|x)) = 1/2 || grad_z log q(z|x) - grad_z log p(x|z) - grad_z log p(z) ||^2
    at one z ~ q(z|x), the paper's measure of how far the encoder is from the true posterior,
    logged for every family that has one (it needs gradients: the CLI runs evaluation with
    `inference_mode=False`; pass that to a Trainer of your own);
  - diagnostics that make a degenerate model visible (a decoder that ignores z draws the mean image,
    an encoder that ignores x has no active unit), under train/, val/ and test/:
      recon_mse       per-pixel MSE of the reconstruction against the clean image (in training, of
                      the decoder mean at the objective's code);
      encoder_sigma   mean over samples and dimensions of the encoder's sigma_j(x) (Gaussian encoders);
      active_units    A_u = #{j : Var_x(E_q[z_j | x]) > 0.01} (Burda et al. 2016): over the batch in
                      training, over the whole split in evaluation (of encode(x), the codes the
                      reconstructions decode);
      decoder_scale   s of a Gaussian decoder N(mu_theta(z), s^2 I), when the model has one.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable
from typing import ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from fae.data.base import Batch
from fae.errors import UserError, require_positive
from fae.likelihoods import Gaussian, make_likelihood
from fae.nets.contract import DecoderFactory, EncoderFactory, ImageShape, build_nets
from fae.objectives import (
    RECONSTRUCTION_ERRORS,
    grad_z_log_decoder,
    grad_z_log_encoder,
    posterior_fisher_divergence,
)
from fae.priors import make_prior
from fae.tracking import log_image_grid, reconstruction_grid, sample_grid

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): a latent dimension is active if Var_x(E_q[z_j|x]) > 0.01


def active_units(codes: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> Tensor:
    """#{j : Var_i(codes_ij) > threshold}: latent dimensions whose code varies across the batch (B, d_z)."""
    return (codes.double().var(0, unbiased=True) > threshold).sum().float()


def loggers_write_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers receive this training step's on_step metrics: Lightning's own decision
    (every log_every_n_steps, and at the stop), which it exposes only privately; pinned by
    tests/test_diagnostics.py."""
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def make_optimizer(factory, parameters, name: str):
    """factory(parameters), a bad setting (a negative learning rate, ...) as one line naming the option."""
    try:
        return factory(parameters)
    except (ValueError, TypeError) as err:
        raise UserError(f"model.{name}: {' '.join(str(err).split())}") from None


def per_pixel_mse(recon: Tensor, target: Tensor) -> Tensor:
    """(B,): mean over pixels of (recon - target)^2."""
    return (recon - target).pow(2).flatten(1).mean(1)


class CodeMoments(Metric):
    """The mean and covariance of the codes over a whole split, from running sums (float64) summed
    across devices: (mean (d_z,), covariance (d_z, d_z), count)."""

    full_state_update = False

    def __init__(self, latent_dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", torch.zeros(latent_dim, latent_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        codes = codes.detach().double()  # (B, d_z)
        self.total += codes.sum(0)
        self.outer += codes.T @ codes
        self.count += len(codes)

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        mean = self.total / self.count
        covariance = (self.outer / self.count - torch.outer(mean, mean)) * self.count / (self.count - 1).clamp(min=1)
        return mean, covariance, self.count


class ActiveUnits(CodeMoments):
    """A_u over a whole split: the dimensions whose code variance (CodeMoments) is above the threshold."""

    def __init__(self, latent_dim: int, threshold: float = ACTIVE_UNIT_THRESHOLD) -> None:
        super().__init__(latent_dim)
        self.threshold = threshold

    def compute(self) -> Tensor:
        return (super().compute()[1].diagonal() > self.threshold).sum().float()


class AutoEncoder(L.LightningModule):
    """Base of the model families; see the module docstring."""

    abstract: ClassVar[bool] = True  # a base for families, not one; each family sets nothing
    gaussian_encoder: ClassVar[bool] = False  # the encoder has two heads (mean, log-variance), or one: the code
    compile_refusal: ClassVar[str | None] = None  # why torch.compile cannot serve this family, if it cannot
    terms: ClassVar[tuple[str, ...]] = ("loss",)
    eval_metrics_extra: ClassVar[tuple[str, ...]] = ()
    diagnostic_terms: ClassVar[tuple[str, ...]] = ("recon_mse",)  # per-sample diagnostics from model_step

    def __init__(
        self,
        encoder: EncoderFactory,
        decoder: DecoderFactory,
        latent_dim: int = 8,
        width: int = 64,
        image_shape: ImageShape = (1, 28, 28),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        recon_metric: str | None = None,
        grid_images: int = 16,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 20,
        compile_nets: bool = False,
    ) -> None:
        """
        Args:
            encoder: the encoder's class (fae.nets) or factory, built as encoder(latent_dim, width,
                image_shape, gaussian): (B, C, H, W) -> (B, heads * d_z) (fae.nets.contract).
            decoder: the decoder's class or factory, built as decoder(latent_dim, width, image_shape):
                (B, d_z) -> pre-activation (B, C, H, W).
            latent_dim: d_z, the size of the code (8 on MNIST, 64 on CelebA in the paper).
            width: the nets' width: channels of their first (encoder) and last (decoder) hidden layers.
            image_shape: (C, H, W) of the data; the CLI links it from the data module (not a flag).
            optimizer: the optimizer, given the parameters (Adam, lr 1e-3, unless configured).
            lr_scheduler: an optional learning-rate scheduler, stepped every epoch.
            recon_metric: reconstruction error against the clean image, "bce" or "mse"; default (None):
                the data module's (BCE on MNIST, MSE on CelebA).
            grid_images: validation images shown in the reconstruction grid (0 for none).
            on_nonfinite: on a non-finite loss term or gradient, "stop" training with one line naming it,
                or "skip" that step; either way the weights are never updated from it.
            max_consecutive_skips: in "skip" mode, give up after this many skipped steps in a row.
            compile_nets: compile the encoder and decoder with torch.compile when a Trainer sets the model
                up (in place: checkpoints are unchanged). A family whose objective torch.compile cannot
                differentiate says so in one line and trains uncompiled (`compile_refusal`).
        """
        super().__init__()
        require_positive(type(self).__name__, latent_dim=latent_dim, width=width)
        self.encoder, self.decoder = build_nets(encoder, decoder, latent_dim, width, image_shape, self.gaussian_encoder)
        if recon_metric is not None and recon_metric not in RECONSTRUCTION_ERRORS:
            raise UserError(f"recon_metric must be one of {list(RECONSTRUCTION_ERRORS)}, got {recon_metric!r}")
        self.latent_dim = latent_dim
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.recon_metric = recon_metric
        self.grid_images = grid_images
        if on_nonfinite not in ("stop", "skip"):
            raise UserError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        if max_consecutive_skips < 1:
            raise UserError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.compile_nets = compile_nets
        self._nets_compiled = False
        self.skipped_steps = 0  # in this process's training, for the log
        self.skips_in_a_row = 0
        self._skipped_this_batch = False
        self._buffers_before_step: dict[str, Tensor] = {}
        errors = (f"recon_{name}" for name in RECONSTRUCTION_ERRORS)  # the data's is chosen at setup
        names = dict.fromkeys((*self.terms, *self.eval_metrics_extra, *self.diagnostic_terms, *errors))
        self.eval_metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({name: MeanMetric() for name in names}) for stage in ("val", "test")}
        )
        self.eval_active_units = nn.ModuleDict({stage: ActiveUnits(self.latent_dim) for stage in ("val", "test")})
        # N(code_mean, code_cov) fitted to the validation images' codes at each validation: the ex-post
        # density of `sample_fitted` (Ghosh et al. 2020), saved in checkpoints; code_count 0: no fit yet
        self.val_code_moments = CodeMoments(latent_dim)
        self.register_buffer("code_mean", torch.zeros(latent_dim, dtype=torch.float64))
        self.register_buffer("code_cov", torch.eye(latent_dim, dtype=torch.float64))
        self.register_buffer("code_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("code_step", torch.zeros((), dtype=torch.long))  # the global step of the fit

    def __init_subclass__(cls, **kwargs) -> None:
        """A family cannot be half-implemented: a class that is not a base (`abstract = True` in its own
        body) must provide `encode` and `model_step` and list its `terms`, "loss" first."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        lacking = [
            f"define {name}()" for name in ("encode", "model_step") if getattr(cls, name) is getattr(AutoEncoder, name)
        ]
        if not cls.terms or cls.terms[0] != "loss":
            lacking.append("list its terms, 'loss' first")
        if lacking:
            raise TypeError(f"model family {cls.__name__} is incomplete: {'; '.join(lacking)} (see fae.models.base)")

    def save_config(self) -> None:
        """save_hyperparameters() for the calling family's __init__. Under the CLI that is the config
        (nets as class_path dicts), so load_from_checkpoint rebuilds the model; outside it, only plain
        values: nets and optimizer callables are objects, which a weights-only checkpoint load refuses."""
        frame = inspect.currentframe().f_back
        under_cli = _given_hyperparameters.get() is not None  # Lightning's own marker of a CLI instantiation
        objects = [k for k, v in frame.f_locals.items() if isinstance(v, nn.Module) or callable(v)]
        self.save_hyperparameters(ignore=[] if under_cli else objects, frame=frame)

    # --- the model -------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """The code used to reconstruct x, (B, d_z): the encoder mean for a Gaussian encoder."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """mu_theta(z), the image mean: (B, d_z) -> (B, C, H, W)."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)): the paper's reconstruction of a (possibly corrupted) image."""
        return self.decode(self.encode(x))

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n codes z ~ p(z) of the family's prior, (n, d_z); a family without a prior cannot sample."""
        raise UserError(f"{type(self).__name__} has no prior to sample from: it reconstructs, it does not generate")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """decode(z), z ~ p(z): n generated images (their decoder means), (n, C, H, W)."""
        return self.decode(self.sample_prior(n, generator))

    @property
    def can_sample(self) -> bool:
        return type(self).sample_prior is not AutoEncoder.sample_prior

    def sample_fitted(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n codes z ~ N(code_mean, code_cov), the Gaussian fitted to the validation codes at the last
        validation (an ex-post density, as RAEs sample; not the model's prior), (n, d_z)."""
        if not self.can_sample_fitted:
            raise UserError(
                f"this {type(self).__name__} has no fit of its codes: it is made at each validation, and this "
                "checkpoint was saved before the first one (or by an older fae); use the prior's samples"
            )
        mean, covariance = self.code_mean.double(), self.code_cov.double()
        scale = covariance.diagonal().mean().clamp(min=1e-12)  # a jitter for codes confined to a subspace
        eye = torch.eye(self.latent_dim, dtype=torch.float64, device=covariance.device)
        root, info = torch.linalg.cholesky_ex(covariance + 1e-6 * scale * eye)
        if info.item() != 0 or not torch.isfinite(mean).all():
            raise UserError(f"the fit of this {type(self).__name__}'s codes is not a Gaussian (non-finite codes?): "
                            "sample its prior instead")  # fmt: skip
        eps = torch.randn(n, self.latent_dim, generator=generator).double().to(self.device)  # N(0, I)'s stream
        return (mean + eps @ root.T).float()

    @property
    def can_sample_fitted(self) -> bool:
        return bool(self.code_count >= 2)

    def on_validation_epoch_end(self) -> None:
        """The fit of the codes, from this validation's (all devices'); not from the sanity check."""
        if not self.trainer.sanity_checking and self.val_code_moments.update_count > 0:
            self.set_code_fit(*self.val_code_moments.compute())
        self.val_code_moments.reset()

    @torch.no_grad()
    def fit_codes(self, images: Iterable[Tensor]) -> None:
        """Fit N(m, C) to encode(x) of every batch x (B, C, H, W) of `images`, on this device alone (each
        device given all the images fits the same), in place of the last validation's fit."""
        moments = CodeMoments(self.latent_dim, sync_on_compute=False).to(self.device)
        for x in images:
            moments.update(self.encode(x.to(self.device)))
        if moments.count >= 2:  # else the fit saved in the checkpoint stays
            self.set_code_fit(*moments.compute())

    def set_code_fit(self, mean: Tensor, covariance: Tensor, count: Tensor) -> None:
        self.code_mean.copy_(mean)
        self.code_cov.copy_(covariance)
        self.code_count.copy_(count)
        self.code_step.fill_(self.global_step if self._trainer is not None else 0)

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        """The family's objective on x: per-sample terms {name: (B,)}, the loss under "loss", with
        `diagnostics(...)` merged in."""
        raise NotImplementedError

    def diagnostics(self, x: Tensor, recon: Tensor, codes: Tensor, sigma: Tensor | None = None) -> dict[str, Tensor]:
        """What model_step adds to its terms, from what it computed anyway: recon_mse (B,) of `recon`
        (B, C, H, W), encoder_sigma (B,) from `sigma` (B, d_z) when the encoder is Gaussian, and the
        detached codes (B, d_z) under "codes" (for active_units)."""
        out = {"recon_mse": per_pixel_mse(recon.detach(), x.detach()), "codes": codes.detach()}
        if sigma is not None:
            out["encoder_sigma"] = sigma.detach().mean(1)
        return out

    def decoder_scale(self) -> Tensor | None:
        """s of a Gaussian decoder N(mu_theta(z), s^2 I), or None when the model has no such scale."""
        return self.likelihood.log_scale.detach().exp() if isinstance(self.likelihood, Gaussian) else None

    def evaluation_terms(self, x: Tensor) -> dict[str, Tensor]:
        """What evaluation averages besides the reconstruction error: the objective's terms by default."""
        return self.model_step(x)

    def build_likelihood(self, likelihood: str, decoder_scale: float, learn_decoder_scale: bool) -> None:
        activation = self.decoder.output_activation
        self.likelihood = make_likelihood(likelihood, activation, decoder_scale, learn_decoder_scale)

    # --- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before the first batch: the data module's images must be what the encoder takes, in the range
        the decoder produces; the reconstruction error is the data module's unless the model sets one."""
        self.maybe_compile_nets()
        datamodule = self.trainer.datamodule
        expected = self.encoder.image_shape
        found = getattr(datamodule, "image_shape", None) if datamodule is not None else None
        if expected is not None and found is not None and tuple(found) != tuple(expected):
            raise UserError(
                f"the data's images are {tuple(found)} but the model was built for {tuple(expected)}: build it with "
                "image_shape=datamodule.image_shape (the CLI does)"
            )
        activation = self.likelihood.output_activation
        data_range = getattr(datamodule, "pixel_range", None)
        decoder_range = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(activation)
        if data_range is not None and decoder_range is not None and tuple(data_range) != decoder_range:
            raise UserError(
                f"the data's pixels are in {list(data_range)} but the decoder's {activation} output is in "
                f"{list(decoder_range)}: use the nets of this data set"
            )
        if self.recon_metric is None:
            self.recon_metric = getattr(datamodule, "recon_metric", None) or ("mse" if activation == "tanh" else "bce")
        if self.recon_metric == "bce" and (data_range or decoder_range or (0.0, 1.0))[0] < 0:
            raise UserError("recon_metric bce needs pixels in [0, 1]; these are in [-1, 1]: use mse")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        terms = self.model_step(batch.x)
        if not self.finite_or_skip(terms):
            return None  # Lightning skips backward and the optimizer step
        self.log_training_terms(terms)
        return terms["loss"].mean()

    def maybe_compile_nets(self) -> None:
        """torch.compile both nets in place (`compile_nets`), once; or one line saying why not."""
        if not self.compile_nets or self._nets_compiled:
            return
        self._nets_compiled = True
        if self.compile_refusal is not None:
            rank_zero_info(f"fae: model.compile_nets: {self.compile_refusal}; the nets run uncompiled")
            return
        self.encoder.compile()
        self.decoder.compile()

    # --- non-finite values: no update is ever made from one ------------------------------------------
    def finite_or_skip(self, terms: dict[str, Tensor], names: tuple[str, ...] | None = None) -> bool:
        """True when the objective's terms (`names`, default `self.terms`) are finite on every device.
        Otherwise, before any update: "stop" raises a UserError naming the term and the step; "skip"
        restores the buffers (BatchNorm statistics) and returns False."""
        if self._trainer is None:
            return True
        names = [name for name in (names or self.terms) if name in terms]
        finite = torch.stack([torch.isfinite(terms[name]).all() for name in names]).tolist()  # one sync
        bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
        if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return True
        self.non_finite(f"loss term {', '.join(bad) or '(on another device)'}")
        return False

    def on_before_optimizer_step(self, optimizer) -> None:
        """A non-finite gradient of the parameters `optimizer` steps (after the devices' reduction, so
        every device decides alike)."""
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # the sum of every entry, a read of each gradient and nothing allocated: NaN or inf when an entry
        # is, or when the entries sum past float32 (~1e38: gradients Adam's squares would overflow too).
        # Checking each entry with isfinite costs 17x more (9 ms a step at the paper's width on this CPU).
        if not stepped or torch.isfinite(torch.stack([p.grad.sum() for p in stepped]).sum()):
            return
        names = {p: name for name, p in self.named_parameters()}
        bad = [names.get(p, "a parameter") for p in stepped if not torch.isfinite(p.grad).all()]
        self.non_finite(f"gradient of {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}")
        for p in stepped:  # an optimizer makes no update for a parameter without a gradient
            p.grad = None

    def non_finite(self, what: str) -> None:
        where = f"at step {self.global_step} (epoch {self.current_epoch})"
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or "no checkpoint was written yet"
        if self.on_nonfinite == "stop":
            raise UserError(
                f"non-finite {what} {where}; stopped before the optimizer step, so no weight was updated from it "
                f"(last saved state: {last}). Lower the learning rate, or set --model.on_nonfinite skip"
            )
        if self._buffers_before_step:
            self.load_state_dict(self._buffers_before_step, strict=False)  # e.g. BatchNorm statistics
        self._skipped_this_batch = True
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self.skips_in_a_row >= self.max_consecutive_skips:
            raise UserError(
                f"{self.skips_in_a_row} steps in a row skipped, the last for a non-finite {what} {where}: "
                f"training is not recovering (last saved state: {last}); resume from an earlier checkpoint "
                "with a lower learning rate, or check the data"
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._skipped_this_batch = False
        if self.on_nonfinite == "skip":  # restored if this step is skipped
            self._buffers_before_step = {name: b.clone() for name, b in self.named_buffers()}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self._skipped_this_batch:
            self.skips_in_a_row = 0

    def log_training_terms(self, terms: dict[str, Tensor]) -> None:
        """train/<term> batch means, train/active_units over the batch, train/decoder_scale, on the steps
        whose metrics the loggers write (every trainer.log_every_n_steps): each `self.log` costs about a
        millisecond of Python, a fifth of a small net's step (benchmarks/framework_overhead.py). The
        progress bar's loss is every step's."""
        self.log("loss", terms["loss"].detach().mean(), prog_bar=True, logger=False)
        if not loggers_write_this_step(self.trainer):
            return
        codes = terms.pop("codes")
        means = {f"train/{name}": value.mean() for name, value in terms.items()}
        means["train/active_units"] = active_units(codes)
        scale = self.decoder_scale()
        if scale is not None:
            means["train/decoder_scale"] = scale
        self.log_dict(means, prog_bar=False, on_step=True, on_epoch=False)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, batch_idx, "test")

    def evaluation_step(self, batch: Batch, batch_idx: int, stage: str) -> None:
        """The objective's terms and the reconstruction error of `batch.x` against `batch.target`."""
        terms = self.evaluation_terms(batch.x)
        terms.pop("codes")  # the objective's (the Fisher AE's under batch statistics); evaluation's are encode(x)
        with torch.no_grad():
            codes = self.encode(batch.x)
            recon = self.decode(codes)  # reconstruct(x)
        self.eval_active_units[stage].update(codes)
        if stage == "val":
            self.val_code_moments.update(codes)
        terms["recon_mse"] = per_pixel_mse(recon, batch.target)  # of the paper's reconstruction, not a sample's
        terms[f"recon_{self.recon_metric}"] = RECONSTRUCTION_ERRORS[self.recon_metric](recon, batch.target)
        metrics = self.eval_metrics[stage]
        for name, value in terms.items():
            metrics[name].update(value)
        for name in terms:
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=name == "loss")
        self.log(f"{stage}/active_units", self.eval_active_units[stage], on_step=False, on_epoch=True)
        scale = self.decoder_scale()
        if scale is not None:
            self.log(f"{stage}/decoder_scale", scale, on_step=False, on_epoch=True)
        first = batch_idx == 0 and self.grid_images > 0 and self.trainer.is_global_zero
        if first and not self.trainer.sanity_checking:
            self.log_reconstruction_grid(batch.target[: self.grid_images], recon[: self.grid_images], stage)
            if self.can_sample:
                self.log_sample_grid(stage)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.reconstruct(batch.x)

    def log_reconstruction_grid(self, images: Tensor, recon: Tensor, stage: str) -> None:
        grid = reconstruction_grid(self.to_unit_range(images), self.to_unit_range(recon))
        log_image_grid(self.trainer, f"{stage}/reconstructions", grid)

    def log_sample_grid(self, stage: str) -> None:
        """grid_images samples decoded from the same prior draws at every evaluation (seed 0), so that
        successive grids show the decoder, not the draw, changing."""
        samples = self.sample(self.grid_images, generator=torch.Generator().manual_seed(0))
        log_image_grid(self.trainer, f"{stage}/samples", sample_grid(self.to_unit_range(samples)))

    def to_unit_range(self, images: Tensor) -> Tensor:
        """Images in the decoder's range -> [0, 1] for display."""
        if self.likelihood.output_activation == "tanh":
            return (images + 1.0) / 2.0
        return images.clamp(0.0, 1.0)

    # --- exact resumption: the random streams continue where the checkpoint left them ---------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fae_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["fae_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for name in ("code_mean", "code_cov", "code_count", "code_step"):  # a checkpoint from before the fit
            checkpoint["state_dict"].setdefault(name, getattr(self, name).detach().clone())
        state = checkpoint.get("fae_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self._trainer is not None and self.trainer.world_size > 1:  # the checkpoint holds rank zero's streams
            torch.manual_seed(torch.randint(2**62, ()).item() + self.trainer.global_rank)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optimizer, self.parameters(), "optimizer")
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}


class GaussianAutoEncoder(AutoEncoder):
    """A family with a Gaussian encoder q_phi(z|x) = N(mu(x), diag sigma(x)^2) and a prior p_eta(z).

    The encoder net's two heads are the mean and the log-variance (supplement Table 1); here they
    are returned as (mu, log sigma). Evaluation adds the posterior Fisher divergence.
    """

    abstract = True
    gaussian_encoder = True

    eval_metrics_extra = ("posterior_fisher",)
    diagnostic_terms = ("recon_mse", "encoder_sigma")

    def __init__(
        self, encoder: EncoderFactory, decoder: DecoderFactory, prior: str, prior_degree: int, **kwargs
    ) -> None:
        super().__init__(encoder, decoder, **kwargs)
        self.prior = make_prior(prior, self.latent_dim, prior_degree)

    def encode_gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log sigma), each (B, d_z); log sigma = 1/2 log-variance head."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)  # float32 under bf16 autocast: exp(log sigma)
        return mu, 0.5 * logvar

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_gaussian(x)[0]

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator=generator).to(self.device)

    @staticmethod
    def reparameterise(mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        """z = mu + sigma * eps with eps ~ N(0, I): returns (z, eps)."""
        eps = torch.randn_like(mu)
        return mu + log_sigma.exp() * eps, eps

    def posterior_fisher(self, x: Tensor) -> Tensor:
        """D(q(z|x) || p(z|x)) at one z ~ q(z|x), (B,); per-sample when the nets are in eval mode."""
        if torch.is_inference_mode_enabled():
            raise UserError(
                "the posterior Fisher divergence needs gradients: run evaluation with "
                "Trainer(inference_mode=False) (the fae CLI does)"
            )
        with torch.enable_grad():
            mu, log_sigma = self.encode_gaussian(x)
            z, eps = self.reparameterise(mu.detach(), log_sigma.detach())
            z.requires_grad_(True)
            nll = self.likelihood.nll(self.decoder(z), x)
            grad_lik = grad_z_log_decoder(nll, z, create_graph=False)
            divergence = posterior_fisher_divergence(
                grad_z_log_encoder(eps, log_sigma.detach()), grad_lik, self.prior.score(z).detach()
            )
        return divergence.detach()

    def evaluation_terms(self, x: Tensor) -> dict[str, Tensor]:
        terms = super().evaluation_terms(x)
        terms.setdefault("posterior_fisher", self.posterior_fisher(x))
        return terms
