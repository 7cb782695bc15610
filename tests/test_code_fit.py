"""The ex-post mixture of the codes (fae.models.code_fit.MixtureCodeFit): EM recovers a known mixture, its
samples follow it, and the codes it is fitted to travel in checkpoints (older ones load without them)."""

from __future__ import annotations

import pytest
import torch

from fae.errors import UserError
from fae.models.code_fit import MixtureCodeFit

MEANS = torch.tensor([[-4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 5.0, 1.0]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
ROOTS = torch.stack(  # Cholesky factors of the components' covariances
    [
        torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.3]]),
        0.5 * torch.eye(3),
        torch.tensor([[0.7, 0.0, 0.0], [0.0, 0.2, 0.0], [0.3, 0.0, 1.0]]),
    ]
)


def known_mixture(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    which = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)
    eps = torch.randn(n, 3, generator=gen)
    return scale * (MEANS[which] + (ROOTS[which] @ eps[:, :, None]).squeeze(2))


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # codes on any scale: EM's regularisation is relative to theirs
def test_em_recovers_a_known_mixture_and_its_samples_follow_it(scale):
    fit = MixtureCodeFit(3)
    fit.set(known_mixture(6000, scale=scale), step=7)
    weights, means, roots = fit.mixture(3)
    order = torch.cdist(MEANS.double() * scale, means).argmin(1)  # EM's components in any order
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(weights[order], WEIGHTS.double(), atol=0.02, rtol=0)
    torch.testing.assert_close(means[order], MEANS.double() * scale, atol=0.08 * scale, rtol=0)
    covariances = roots @ roots.transpose(1, 2)
    expected = (ROOTS @ ROOTS.transpose(1, 2)).double() * scale**2
    torch.testing.assert_close(covariances[order], expected, atol=0.08 * scale**2, rtol=0)
    z = fit.sample(20000, 3, generator=torch.Generator().manual_seed(1)).double() / scale
    nearest = torch.cdist(z, MEANS.double()).argmin(1)  # the components are far apart: the nearest mean is its own
    shares = torch.bincount(nearest, minlength=3) / len(z)
    torch.testing.assert_close(shares.double(), WEIGHTS.double(), atol=0.015, rtol=0)
    for k in range(3):
        torch.testing.assert_close(torch.cov(z[nearest == k].T), expected[k] / scale**2, atol=0.08, rtol=0)
    again = fit.sample(20000, 3, generator=torch.Generator().manual_seed(1)).double() / scale
    assert torch.equal(z, again)  # seeded: the same codes


def test_the_kept_codes_travel_in_a_checkpoint_and_an_older_one_has_none():
    fit = MixtureCodeFit(3)
    codes = known_mixture(500)
    fit.refit(torch.split(codes, 64), step=12)
    assert torch.equal(fit.codes, codes) and int(fit.step) == 12
    loaded = MixtureCodeFit(3)
    loaded.load_state_dict(fit.state_dict())  # 0 rows before, 500 after
    assert torch.equal(loaded.codes, codes) and int(loaded.step) == 12
    torch.testing.assert_close(loaded.mixture(3)[1], fit.mixture(3)[1])  # seeded EM: the same fit
    older = MixtureCodeFit(3)
    older.load_state_dict({})  # a checkpoint from before the mixture
    assert older.codes.shape == (0, 3)
    with pytest.raises(UserError, match=r"^this VAE keeps no validation codes to fit a mixture to .*--sampler fitted"):
        older.sample(4, 10, owner="VAE")
    with pytest.raises(UserError, match=r"^a mixture of 600 Gaussians needs 600 codes or more; this VAE kept 500: "):
        fit.sample(4, 600, owner="VAE")
    with pytest.raises(UserError, match=r"^--components must be >= 1, got 0"):
        fit.sample(4, 0)


def test_more_codes_than_kept_are_spread_evenly_over_the_set():
    fit = MixtureCodeFit(3)
    fit.MAX_CODES = 100
    codes = known_mixture(250)
    fit.set(codes, step=1)
    assert len(fit.codes) == 100 and torch.equal(fit.codes[[0, -1]], codes[[0, -1]])
    assert torch.equal(fit.codes, codes[torch.linspace(0, 249, 100).round().long()])


def test_the_kept_codes_do_not_depend_on_the_number_of_devices():
    """Two devices' validation batches, gathered rank by rank with the duplicate a DistributedSampler pads the
    last batch with, keep the codes one device keeps: in image order, each image once."""
    codes, index = known_mixture(11), torch.arange(11)
    one = MixtureCodeFit(3)
    for part in torch.split(index, 4):
        one.update(codes[part], part)
    one.end_validation(step=5, sanity_checking=False)
    two = MixtureCodeFit(3)
    ranks = [torch.tensor([0, 2, 4, 6, 8, 10]), torch.tensor([1, 3, 5, 7, 9, 0])]  # rank 1 padded with image 0
    for order in ranks:  # CatMetric's gather: rank 0's rows, then rank 1's
        for part in torch.split(order, 4):
            two.update(codes[part], part)
    two.end_validation(step=5, sanity_checking=False)
    assert torch.equal(one.codes, codes) and torch.equal(two.codes, codes) and int(two.step) == 5
    sanity = MixtureCodeFit(3)
    sanity.update(codes, index)
    sanity.end_validation(step=0, sanity_checking=True)  # the sanity check's codes are not kept
    assert sanity.codes.shape == (0, 3)


def test_the_kept_codes_are_extra_state_not_a_buffer():
    """DDP broadcasts buffers and the non-finite guard copies them at every step: the codes are neither."""
    fit = MixtureCodeFit(3)
    fit.set(known_mixture(100), step=3)
    assert "codes" not in dict(fit.named_buffers()) and torch.equal(fit.state_dict()["_extra_state"], fit.codes)


def test_em_that_fails_is_one_line(monkeypatch):
    from sklearn.mixture import GaussianMixture

    def fails(self, X):  # scikit-learn's own words for a component on too few distinct codes
        raise ValueError(
            "Fitting the mixture model failed because some components have ill-defined empirical covariance"
        )

    fit = MixtureCodeFit(3)
    fit.set(known_mixture(50), step=1)
    monkeypatch.setattr(GaussianMixture, "fit", fails)
    with pytest.raises(UserError, match=r"^EM could not fit 5 Gaussians to the 50 codes of this VAE \(Fitting the"):
        fit.sample(4, 5, owner="VAE")
