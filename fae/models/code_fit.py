"""The ex-post density of the codes: N(m, C) fitted to the codes encode(x) of the validation images
(the ex-post Gaussian with which Ghosh et al. 2020 sample regularised deterministic auto-encoders),
for every family. Its samples show what the decoder makes of codes like those it was trained on,
where a model's codes do not follow its prior. Another ex-post sampler plugs in beside it.

`GaussianCodeFit` holds the fit as buffers (saved in checkpoints: mean, cov, count, and the global
step of the validation it was made at; count 0 means no fit yet), updates it from each validation's
codes on all devices, refits it from a stream of images (`fae test` refits with the tested weights)
and samples it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from fae.errors import UserError
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
    def refit(self, encode: Callable[[Tensor], Tensor], images: Iterable[Tensor], step: int) -> None:
        """Fit to encode(x) of every batch x of `images` on this device alone (each device given all the
        images fits the same), in place of the last validation's fit; with fewer than 2 images the fit
        saved in the checkpoint stays."""
        moments = CodeMoments(self.latent_dim, sync_on_compute=False).to(self.mean.device)
        for x in images:
            moments.update(encode(x))
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
