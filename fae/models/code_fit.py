"""The ex-post densities of the codes, fitted to the codes encode(x) of the validation images, for every
family (Ghosh et al. 2020 sample regularised deterministic auto-encoders this way). Their samples show
what the decoder makes of codes like those it was trained on, where a model's codes do not follow its
prior. Two, side by side:

  - `GaussianCodeFit`: N(m, C), the codes' mean and covariance, held as buffers (saved in checkpoints:
    mean, cov, count, and the global step of the validation it was made at; count 0 means no fit yet),
    from running sums across devices;
  - `MixtureCodeFit`: sum_k pi_k N(m_k, C_k), a mixture of K Gaussians with full covariances fitted by
    EM (scikit-learn's GaussianMixture, k-means initialisation, as pythae's GaussianMixtureSampler; Ghosh
    et al. use K = 10). It keeps the validation codes themselves (at most MAX_CODES rows, saved in
    checkpoints), so that a mixture of any K is fitted when it is sampled (`fae sample --sampler gmm
    --components K`) without the data.

Each updates from every validation's codes on all devices (not the sanity check's), refits from codes
(`fae test` refits with the tested weights) and samples from a seeded generator, the same codes on any
number of devices.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from fae.errors import UserError, short_reason
from fae.models.metrics import CodeMoments

# the names of the fit's buffers in checkpoints written before it was its own module
OLD_NAMES = {"code_mean": "mean", "code_cov": "cov", "code_count": "count", "code_step": "step"}


class GaussianCodeFit(nn.Module):
    """N(mean, cov) of the codes (module docstring)."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("mean", torch.zeros(latent_dim, dtype=torch.float64))
        self.register_buffer("cov", torch.eye(latent_dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.validation = CodeMoments(latent_dim)  # this validation's codes, all devices'

    @property
    def fitted(self) -> bool:
        return bool(self.count >= 2)

    def update(self, codes: Tensor) -> None:
        """The codes (B, d_z) of one validation batch."""
        self.validation.update(codes)

    def end_validation(self, step: int, sanity_checking: bool) -> None:
        """The fit of this validation's codes (not of the sanity check's)."""
        if not sanity_checking and self.validation.update_count > 0:
            self.set(*self.validation.compute(), step=step)
        self.validation.reset()

    @torch.no_grad()
    def refit(self, codes: Iterable[Tensor], step: int) -> None:
        """Fit to the batches of `codes` (B, d_z) on this device alone (each device given all the codes
        fits the same), in place of the last validation's fit; with fewer than 2 codes the fit saved in
        the checkpoint stays."""
        moments = CodeMoments(self.latent_dim, sync_on_compute=False).to(self.mean.device)
        for batch in codes:
            moments.update(batch)
        if moments.count >= 2:
            self.set(*moments.compute(), step=step)

    def set(self, mean: Tensor, covariance: Tensor, count: Tensor, step: int) -> None:
        self.mean.copy_(mean)
        self.cov.copy_(covariance)
        self.count.copy_(count)
        self.step.fill_(step)

    def sample(self, n: int, generator: torch.Generator | None = None, owner: str = "model") -> Tensor:
        """n codes z ~ N(mean, cov), (n, d_z), drawn from N(0, I)'s stream of `generator`."""
        if not self.fitted:
            raise UserError(
                f"this {owner} has no fit of its codes: it is made at each validation, and this checkpoint was "
                "saved before the first one (or by an older fae); use the prior's samples"
            )
        mean, covariance = self.mean.double(), self.cov.double()
        scale = covariance.diagonal().mean().clamp(min=1e-12)  # a jitter for codes confined to a subspace
        eye = torch.eye(self.latent_dim, dtype=torch.float64, device=covariance.device)
        root, info = torch.linalg.cholesky_ex(covariance + 1e-6 * scale * eye)
        if info.item() != 0 or not torch.isfinite(mean).all():
            raise UserError(
                f"the fit of this {owner}'s codes is not a Gaussian (non-finite codes?): sample its prior instead"
            )
        eps = torch.randn(n, self.latent_dim, generator=generator).double().to(mean.device)  # N(0, I)'s stream
        return (mean + eps @ root.T).float()

    def upgrade_state_dict(self, state: dict, prefix: str) -> None:
        """A checkpoint's state dict in today's names: the old names moved, a missing fit (a checkpoint
        from before the fit) given this module's empty one."""
        for old, new in OLD_NAMES.items():
            if old in state:
                state[prefix + new] = state.pop(old)
        for name in OLD_NAMES.values():
            state.setdefault(prefix + name, getattr(self, name).detach().clone())


class MixtureCodeFit(nn.Module):
    """A mixture of K Gaussians fitted by EM to the kept validation codes (module docstring).

    The codes are the module's extra state (a tensor in its state dict, saved in checkpoints; a checkpoint
    from before the mixture loads with none), not a buffer: DDP would broadcast a buffer, and the
    non-finite guard copy it, at every training step. They are kept on the CPU, where EM runs, in the
    order of the validation images' indices, each image once, whatever the number of devices."""

    MAX_CODES = 20_000  # codes kept (evenly spread over the set beyond it): EM's data, in every checkpoint

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.codes = torch.zeros(0, latent_dim)  # (N, d_z) float32 on the CPU: the last validation's
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # the global step they are of
        self.validation = CatMetric(nan_strategy="disable")  # rows (image index, code) of all devices
        self.validation.set_dtype(torch.float64)  # image indices exact beyond float32's 2^24
        self._mixtures: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # K -> (weights, means, Cholesky factors)

    def update(self, codes: Tensor, index: Tensor) -> None:
        """The codes (B, d_z) of one validation batch and their images' indices (B,)."""
        self.validation.update(torch.cat([index[:, None].double(), codes.detach().double()], dim=1))

    def end_validation(self, step: int, sanity_checking: bool) -> None:
        """Keep this validation's codes (not the sanity check's): in image order, the duplicates a
        DistributedSampler pads the last batch with dropped."""
        if not sanity_checking and self.validation.update_count > 0:
            rows = self.validation.compute().reshape(-1, self.latent_dim + 1)
            rows = rows[rows[:, 0].argsort(stable=True)]
            first = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
            first[1:] = rows[1:, 0] != rows[:-1, 0]
            self.set(rows[first, 1:], step)
        self.validation.reset()

    @torch.no_grad()
    def refit(self, codes: Iterable[Tensor], step: int) -> None:
        """Keep the batches of `codes` (B, d_z) in place of the last validation's; with fewer than 2 codes
        those saved in the checkpoint stay."""
        batches = [batch.detach().float().cpu() for batch in codes]
        if sum(len(batch) for batch in batches) >= 2:
            self.set(torch.cat(batches), step)

    def set(self, codes: Tensor, step: int) -> None:
        if len(codes) > self.MAX_CODES:
            codes = codes[torch.linspace(0, len(codes) - 1, self.MAX_CODES).round().long().to(codes.device)]
        self.codes = codes.detach().to("cpu", torch.float32).clone()
        self.step.fill_(step)
        self._mixtures.clear()

    def mixture(self, components: int, owner: str = "model") -> tuple[Tensor, Tensor, Tensor]:
        """The mixture of `components` Gaussians fitted by EM to the kept codes: weights pi (K,), means
        (K, d_z) and the Cholesky factors of the covariances (K, d_z, d_z), float64 on the CPU; fitted
        once per K (seeded: the same fit on every device and every call)."""
        if components < 1:
            raise UserError(f"--components must be >= 1, got {components}")
        if components not in self._mixtures:
            self._mixtures[components] = fit_mixture(self.codes.double(), components, owner)
        return self._mixtures[components]

    def sample(self, n: int, components: int, generator: torch.Generator | None = None, owner: str = "model") -> Tensor:
        """n codes from the mixture, (n, d_z) on the CPU: the component of each from `generator`'s
        categorical draws, then N(0, I)'s stream of `generator`, one component at a time."""
        weights, means, roots = self.mixture(components, owner)
        which = torch.multinomial(weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.latent_dim, generator=generator).double()  # (n, d_z): eps, then the codes
        for k in range(len(weights)):
            chosen = which == k
            z[chosen] = means[k] + z[chosen] @ roots[k].T
        return z.float()

    def get_extra_state(self) -> Tensor:
        return self.codes

    def set_extra_state(self, state: Tensor) -> None:
        self.codes = state.detach().to("cpu", torch.float32).clone()
        self._mixtures.clear()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """A checkpoint from before the mixture (as BatchNorm fills in a missing num_batches_tracked): no codes."""
        state_dict.setdefault(prefix + "_extra_state", torch.zeros(0, self.latent_dim))
        state_dict.setdefault(prefix + "step", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def fit_mixture(codes: Tensor, components: int, owner: str = "model") -> tuple[Tensor, Tensor, Tensor]:
    """EM for a K-component Gaussian mixture with full covariances (scikit-learn's GaussianMixture: k-means
    initialisation, random_state 0, up to 500 iterations) on `codes` (N, d_z) rescaled to unit mean
    variance, so that its covariance regularisation (1e-6 on the diagonal) is relative to the codes'
    scale; returns (weights (K,), means (K, d_z), Cholesky factors of the covariances (K, d_z, d_z)) on
    the codes' scale, float64 on the CPU. EM that fails (a component on too few distinct codes) is one
    line; EM that does not converge is a note."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    if len(codes) == 0:
        raise UserError(
            f"this {owner} keeps no validation codes to fit a mixture to (they are kept at each validation; this "
            "checkpoint was saved before the first one, or by a fae older than the mixture sampler): use --sampler "
            "fitted or the prior's samples (`fae test` fits the codes again from the validation images)"
        )
    if len(codes) < max(2, components):
        raise UserError(
            f"a mixture of {components} Gaussians needs {max(2, components)} codes or more; this {owner} kept "
            f"{len(codes)}: give fewer --components"
        )
    if not torch.isfinite(codes).all():
        raise UserError(f"the codes of this {owner} are not finite: sample its prior instead")
    scale = codes.var(0).mean().sqrt().clamp(min=1e-12)
    gmm = GaussianMixture(components, covariance_type="full", max_iter=500, random_state=0)
    try:
        with warnings.catch_warnings():  # its ConvergenceWarning: said below in one line
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm.fit((codes / scale).cpu().numpy())
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        covariances = as_tensor(gmm.covariances_) * scale.cpu() ** 2
        roots = torch.linalg.cholesky(covariances)
    except (ValueError, torch.linalg.LinAlgError) as err:  # a component on too few distinct codes
        raise UserError(
            f"EM could not fit {components} Gaussians to the {len(codes)} codes of this {owner} "
            f"({short_reason(err)[:80]}): give fewer --components"
        ) from None
    if not gmm.converged_:
        rank_zero_info(
            f"fae: note: EM for {components} Gaussians did not converge in 500 iterations; its last fit is used"
        )
    return as_tensor(gmm.weights_), as_tensor(gmm.means_) * scale.cpu(), roots
