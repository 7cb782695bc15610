"""What every family logs: train/<term> on the steps the loggers write (`log_training_terms`), and in
evaluation torchmetrics that reduce correctly across devices; with the diagnostics that make a
degenerate model visible:

  - <stage>/<term>: the objective's terms and the reconstruction errors averaged over a split
    (`EvaluationMetrics`, stage val or test);
  - active_units  A_u = #{j : Var_x(E_q[z_j | x]) > 0.01} (Burda et al. 2016): over the batch in
    training (`active_units`), over the whole split in evaluation (`ActiveUnits`);
  - active_units_rel  #{j : Var_x(E_q[z_j | x]) > 0.01 mean_k Var_x(E_q[z_k | x])} in evaluation: the same
    count on codes standardised by their own scale (`RelativeActiveUnits`). The absolute threshold says
    8 of 8 for any family whose codes are spread wider than 0.1; this one is unchanged by rescaling all
    the codes and counts the dimensions that carry a share of the code's variance;
  - recon_mse: per-pixel MSE of a reconstruction against the clean image (`per_pixel_mse`);
  - decoder_scale: s of a Gaussian decoder, when the model has one.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): a latent dimension is active if Var_x(E_q[z_j|x]) > 0.01
STAGES = ("val", "test")


def loggers_write_this_step(trainer: L.Trainer) -> bool:
    """Whether the loggers receive this training step's on_step metrics: Lightning's own decision
    (every log_every_n_steps, and at the stop), which it exposes only privately; pinned by
    tests/test_diagnostics.py."""
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def progress_bar_redrawn_this_step(trainer: L.Trainer) -> bool:
    """Whether the progress bar (if any) shows this training step's metrics: it redraws every
    `refresh_rate` batches of an epoch and at its last (Lightning's TQDMProgressBar)."""
    bar = trainer.progress_bar_callback
    if bar is None or not bar.is_enabled:
        return False
    done = trainer.fit_loop.epoch_loop.batch_idx + 1  # batches of this epoch with this one
    return done % max(1, getattr(bar, "refresh_rate", 1)) == 0 or done == trainer.num_training_batches


def log_training_terms(module: L.LightningModule, terms: dict[str, Tensor], scale: Tensor | None) -> None:
    """train/<term> batch means of a training step's per-sample terms {name: (B,)}, train/active_units of
    its codes (under "codes") and train/decoder_scale (`scale`), on the steps whose metrics the loggers
    write (every trainer.log_every_n_steps): each `log` costs Python time a small net's step notices
    (benchmarks/framework_overhead.py). The progress bar's loss, on the steps the bar is redrawn: Lightning
    reads every progress-bar value back to the host on the step it is logged (benchmarks/host_syncs.py)."""
    if progress_bar_redrawn_this_step(module.trainer):
        module.log("loss", terms["loss"].detach().mean(), prog_bar=True, logger=False)
    if not loggers_write_this_step(module.trainer):
        return
    codes = terms.pop("codes")
    means = {f"train/{name}": value.mean() for name, value in terms.items()}
    means["train/active_units"] = active_units(codes)
    if scale is not None:
        means["train/decoder_scale"] = scale
    module.log_dict(means, prog_bar=False, on_step=True, on_epoch=False)


def active_units(codes: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> Tensor:
    """#{j : Var_i(codes_ij) > threshold}: latent dimensions whose code varies across the batch (B, d_z)."""
    return (codes.double().var(0, unbiased=True) > threshold).sum().float()


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


class RelativeActiveUnits(CodeMoments):
    """The dimensions whose code variance is above `threshold` times the mean variance of the dimensions."""

    def __init__(self, latent_dim: int, threshold: float = ACTIVE_UNIT_THRESHOLD) -> None:
        super().__init__(latent_dim)
        self.threshold = threshold

    def compute(self) -> Tensor:
        variances = super().compute()[1].diagonal()
        return (variances > self.threshold * variances.mean()).sum().float()


class EvaluationMetrics(nn.Module):
    """The averages of `names` (per-sample values) and the active units of the codes, per stage."""

    def __init__(self, names: list[str], latent_dim: int) -> None:
        super().__init__()
        self.means = nn.ModuleDict({stage: nn.ModuleDict({n: MeanMetric() for n in names}) for stage in STAGES})
        self.active_units = nn.ModuleDict({stage: ActiveUnits(latent_dim) for stage in STAGES})
        self.relative_units = nn.ModuleDict({stage: RelativeActiveUnits(latent_dim) for stage in STAGES})

    def log(self, module: L.LightningModule, stage: str, values: dict[str, Tensor], codes: Tensor) -> None:
        """Update with one batch's per-sample `values` {name: (B,)} and `codes` (B, d_z), and log every
        metric under <stage>/<name> (the epoch's average: Lightning computes and resets them)."""
        means = self.means[stage]
        for name, value in values.items():
            means[name].update(value)
            module.log(f"{stage}/{name}", means[name], on_step=False, on_epoch=True, prog_bar=name == "loss")
        self.active_units[stage].update(codes)
        module.log(f"{stage}/active_units", self.active_units[stage], on_step=False, on_epoch=True)
        self.relative_units[stage].update(codes)
        module.log(f"{stage}/active_units_rel", self.relative_units[stage], on_step=False, on_epoch=True)
