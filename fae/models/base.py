"""The contract of a model family, and what every family shares.

A family subclasses `AutoEncoder` (or fae.models.gaussian.GaussianAutoEncoder, for a Gaussian encoder
and a prior),
lists its per-sample `terms` ("loss" first) and provides
  - `encode(x)`: the code used to reconstruct, (B, d_z) (the encoder mean for a Gaussian encoder);
  - `model_step(x)`: its objective on x, {term: (B,)} with the loss under "loss", and the
    `diagnostics(...)` of what it computed (per sample, and the encoder's codes under "codes").
Its `__init__` takes its own arguments and passes the base's on as **kwargs (the CLI documents them
all). Everything else is here or in a component of its own:

  - the nets, built from the model's latent_dim and width and the data's image shape
    (fae.nets.contract), optionally compiled (`compile_nets`);
  - `decode(z)` = mu_theta(z); `reconstruct(x)` = decode(encode(x)), what the robustness sweep scores
    against the clean image; `sample(n)` = decode(z), z ~ p(z) (a family with a prior provides
    `sample_prior`);
  - the ex-post fits of the validation codes (fae.models.code_fit): a Gaussian (`sample_fitted`) and a
    mixture of Gaussians fitted by EM (`sample_mixture`);
  - the non-finite policy (fae.models.guard): no weight is updated from a non-finite value;
  - train/<term> on the steps the loggers write; val/<term>, val/recon_<metric>, val/active_units
    (test/... under `fae test`) as torchmetrics (fae.models.metrics); diagnostics that make a
    degenerate model visible (recon_mse, active_units, encoder_sigma, decoder_scale);
  - for Gaussian encoders, val/posterior_fisher, the posterior Fisher divergence (fae.models.gaussian);
  - image grids of every validation and test (fae.models.grids, a callback the model adds);
  - exact resumption: the random streams continue where the checkpoint left them (fae.models.random_state).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from fae.data.base import Batch
from fae.errors import UserError, require_positive
from fae.likelihoods import Gaussian, make_likelihood
from fae.models.code_fit import GaussianCodeFit, MixtureCodeFit
from fae.models.grids import ImageGrids
from fae.models.guard import NonFiniteGuard, Policy, fused
from fae.models.metrics import EvaluationMetrics, log_training_terms, per_pixel_mse
from fae.models.random_state import restore_random_state, save_random_state
from fae.nets.contract import DecoderFactory, EncoderFactory, ImageShape, build_nets
from fae.objectives import RECONSTRUCTION_ERRORS


def family_arguments(frame) -> dict:
    """The arguments a family's __init__ (running in `frame`) was called with, its **kwargs spread out,
    over the defaults of the base's arguments they pass on (AutoEncoder.__init__): every argument that
    rebuilds the model, given or not."""
    code = frame.f_code
    names = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]  # without self
    values = {name: frame.f_locals[name] for name in names if name in frame.f_locals}
    if code.co_flags & inspect.CO_VARKEYWORDS:
        index = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & inspect.CO_VARARGS)
        base = inspect.signature(AutoEncoder.__init__).parameters.values()
        defaults = {p.name: p.default for p in base if p.default is not inspect.Parameter.empty}
        values = {**defaults, **values, **(frame.f_locals.get(code.co_varnames[index]) or {})}
    return values


def make_optimizer(factory, parameters, name: str):
    """factory(parameters), fused where torch has a fused kernel for it and the configuration leaves
    `fused` unset (the non-finite guard masks a fused optimizer's step on the device:
    fae.models.guard.fused); a bad setting (a negative learning rate, ...) as one line naming the option."""
    try:
        return fused(factory(parameters))
    except (ValueError, TypeError) as err:
        raise UserError(f"model.{name}: {' '.join(str(err).split())}") from None


def check_data_fits(model: AutoEncoder, datamodule) -> None:
    """Before the first batch: the data module's images must be what the encoder takes, in the range the
    decoder produces; the reconstruction error is the data module's unless the model sets one."""
    expected = model.encoder.image_shape
    found = getattr(datamodule, "image_shape", None) if datamodule is not None else None
    if expected is not None and found is not None and tuple(found) != tuple(expected):
        raise UserError(
            f"the data's images are {tuple(found)} but the model was built for {tuple(expected)}: build it with "
            "image_shape=datamodule.image_shape (the CLI does)"
        )
    activation = model.likelihood.output_activation
    data_range = getattr(datamodule, "pixel_range", None)
    decoder_range = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(activation)
    if data_range is not None and decoder_range is not None and tuple(data_range) != decoder_range:
        raise UserError(
            f"the data's pixels are in {list(data_range)} but the decoder's {activation} output is in "
            f"{list(decoder_range)}: use the nets of this data set"
        )
    if model.recon_metric is None:
        model.recon_metric = getattr(datamodule, "recon_metric", None) or ("mse" if activation == "tanh" else "bce")
    if model.recon_metric == "bce" and (data_range or decoder_range or (0.0, 1.0))[0] < 0:
        raise UserError("recon_metric bce needs pixels in [0, 1]; these are in [-1, 1]: use mse")


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
        on_nonfinite: Policy = "stop",
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
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_consecutive_skips)
        self.compile_nets = compile_nets
        self._nets_compiled = False
        errors = (f"recon_{name}" for name in RECONSTRUCTION_ERRORS)  # the data's is chosen at setup
        names = dict.fromkeys((*self.terms, *self.eval_metrics_extra, *self.diagnostic_terms, *errors))
        self.eval_metrics = EvaluationMetrics(list(names), latent_dim)
        self.code_fit = GaussianCodeFit(latent_dim)
        self.code_mixture = MixtureCodeFit(latent_dim)

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
        if _given_hyperparameters.get() is not None:  # Lightning's own marker of a CLI instantiation
            self.save_hyperparameters(frame=frame)
            return
        values = family_arguments(frame)
        self.save_hyperparameters({k: v for k, v in values.items() if not (isinstance(v, nn.Module) or callable(v))})

    def build_likelihood(
        self, likelihood: str, decoder_scale: float, learn_decoder_scale: bool, floor: float | None = None
    ) -> None:
        activation = self.decoder.output_activation
        self.likelihood = make_likelihood(likelihood, activation, decoder_scale, learn_decoder_scale, floor)

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        self.likelihood.project()  # a learned s kept at or above its floor, after the step

    # --- what a family provides ------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """The code used to reconstruct x, (B, d_z): the encoder mean for a Gaussian encoder."""
        raise NotImplementedError

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        """The family's objective on x: per-sample terms {name: (B,)}, the loss under "loss", with
        `diagnostics(...)` merged in."""
        raise NotImplementedError

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n codes z ~ p(z) of the family's prior, (n, d_z); a family without a prior cannot sample."""
        raise UserError(f"{type(self).__name__} has no prior to sample from: it reconstructs, it does not generate")

    def evaluation_terms(self, x: Tensor) -> dict[str, Tensor]:
        """What evaluation averages besides the reconstruction error: the objective's terms by default."""
        return self.model_step(x)

    # --- the model -------------------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """mu_theta(z), the image mean: (B, d_z) -> (B, C, H, W)."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)): the paper's reconstruction of a (possibly corrupted) image."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """decode(z), z ~ p(z): n generated images (their decoder means), (n, C, H, W)."""
        return self.decode(self.sample_prior(n, generator))

    @property
    def can_sample(self) -> bool:
        return type(self).sample_prior is not AutoEncoder.sample_prior

    def sample_fitted(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n codes z ~ N(m, C), the Gaussian fitted to the validation codes at the last validation (an
        ex-post density, as RAEs sample; not the model's prior), (n, d_z)."""
        return self.code_fit.sample(n, generator, owner=type(self).__name__)

    def sample_mixture(self, n: int, components: int = 10, generator: torch.Generator | None = None) -> Tensor:
        """n codes from the mixture of `components` Gaussians fitted by EM to the last validation's codes, (n, d_z)."""
        return self.code_mixture.sample(n, components, generator, owner=type(self).__name__).to(self.device)

    @torch.no_grad()
    def fit_codes(self, images: Iterable[Tensor]) -> None:
        """Fit the ex-post densities again to encode(x) of every batch x (B, C, H, W) of `images`, here."""
        step = self.global_step if self._trainer is not None else 0
        codes = [self.encode(x.to(self.device)) for x in images]  # (B, d_z) each
        self.code_fit.refit(codes, step)
        self.code_mixture.refit(codes, step)

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

    def to_unit_range(self, images: Tensor) -> Tensor:
        """Images in the decoder's range -> [0, 1] for display."""
        if self.likelihood.output_activation == "tanh":
            return (images + 1.0) / 2.0
        return images.clamp(0.0, 1.0)

    # --- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.maybe_compile_nets()
        check_data_fits(self, self.trainer.datamodule)

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

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.nonfinite, *([ImageGrids(self.grid_images)] if self.grid_images > 0 else [])]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        terms = self.model_step(batch.x)
        self.check_terms(terms)
        self.log_training_terms(terms)
        return terms["loss"].mean()

    def check_terms(self, terms: dict[str, Tensor], names: tuple[str, ...] | None = None) -> None:
        """Flag, on the device, the terms `names` (default: the objective's) that are not finite: the
        optimizer steps that follow in this batch are then masked (fae.models.guard)."""
        self.nonfinite.check_terms(self, terms, names or self.terms)

    def log_training_terms(self, terms: dict[str, Tensor]) -> None:
        log_training_terms(self, terms, self.decoder_scale())

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def evaluation_step(self, batch: Batch, stage: str) -> None:
        """The objective's terms and the reconstruction error of `batch.x` against `batch.target`."""
        terms = self.evaluation_terms(batch.x)
        terms.pop("codes")  # the objective's (the Fisher AE's under batch statistics); evaluation's are encode(x)
        with torch.no_grad():
            codes = self.encode(batch.x)
            recon = self.decode(codes)  # reconstruct(x)
        if stage == "val":
            self.code_fit.update(codes)
            self.code_mixture.update(codes, batch.index)
        self.nonfinite.check_outputs(self, recon, stage)
        terms["recon_mse"] = per_pixel_mse(recon, batch.target)  # of the paper's reconstruction, not a sample's
        terms[f"recon_{self.recon_metric}"] = RECONSTRUCTION_ERRORS[self.recon_metric](recon, batch.target)
        self.eval_metrics.log(self, stage, terms, codes)
        scale = self.decoder_scale()
        if scale is not None:
            self.log(f"{stage}/decoder_scale", scale, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        """The fits of the codes, from this validation's (all devices'); not from the sanity check."""
        self.code_fit.end_validation(self.global_step, self.trainer.sanity_checking)
        self.code_mixture.end_validation(self.global_step, self.trainer.sanity_checking)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.reconstruct(batch.x)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optimizer, self.parameters(), "optimizer")
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    # --- exact resumption ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_random_state(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.code_fit.upgrade_state_dict(checkpoint["state_dict"], "code_fit.")  # older checkpoints' names
        restore_random_state(checkpoint, self._trainer)


def __getattr__(name: str):
    """fae.models.base.GaussianAutoEncoder, where it was defined before it had a module of its own."""
    if name == "GaussianAutoEncoder":
        from fae.models.gaussian import GaussianAutoEncoder

        return GaussianAutoEncoder
    raise AttributeError(f"module 'fae.models.base' has no attribute {name!r}")
