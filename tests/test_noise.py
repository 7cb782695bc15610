"""Corruptions: the noise of a sample depends on (seed, kind, level, index) and nothing else."""

from __future__ import annotations

import torch

from fae.data.noise import BinaryMask, GaussianNoise, stream_key, uniform

MASK32 = 0xFFFFFFFF


def lowbias32_reference(x: int) -> int:
    """Wellons' lowbias32 in plain Python integers (the slow reference)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_reference(key: int, index: int, element: int, stream: int) -> float:
    sample_key = lowbias32_reference((index + ((key * 0x9E3779B9) & MASK32)) & MASK32)
    counter = element * 2 + stream
    bits = lowbias32_reference(lowbias32_reference(counter ^ sample_key) ^ lowbias32_reference(sample_key ^ 0x5BD1E995))
    return ((bits >> 9) * 2 + 1) / 2**24


def test_uniform_matches_plain_python_reference():
    key = stream_key(7, "gaussian", 0.25)
    index = torch.tensor([0, 1, 59999, 2**31 - 1])
    u = uniform(key, index, (3, 5), stream=1)
    for b, i in enumerate(index.tolist()):
        for e in range(15):
            assert u[b].flatten()[e].item() == uniform_reference(key, i, e, 1)


def test_same_noise_whatever_the_batching():
    x = torch.rand(100, 3, 8, 8)
    index = torch.arange(1000, 1100)
    for corruption in (GaussianNoise(0.7, seed=3), BinaryMask(0.4, seed=3)):
        whole = corruption(x, index)
        in_batches_of_7 = torch.cat([corruption(x[i : i + 7], index[i : i + 7]) for i in range(0, 100, 7)])
        shuffled = torch.randperm(100)
        as_shuffled = corruption(x[shuffled], index[shuffled])
        # two "devices" as a DistributedSampler shards: every other sample
        shard0, shard1 = corruption(x[0::2], index[0::2]), corruption(x[1::2], index[1::2])
        assert torch.equal(whole, in_batches_of_7)
        assert torch.equal(whole[shuffled], as_shuffled)
        assert torch.equal(whole[0::2], shard0) and torch.equal(whole[1::2], shard1)


def test_noise_changes_with_level_seed_and_index():
    x = torch.zeros(4, 1, 28, 28)
    index = torch.arange(4)
    base = GaussianNoise(0.5, seed=0)(x, index)
    assert not torch.equal(base, GaussianNoise(0.5, seed=1)(x, index))
    assert not torch.equal(base / 0.5, GaussianNoise(0.6, seed=0)(x, index) / 0.6)
    assert not torch.equal(base, GaussianNoise(0.5, seed=0)(x, index + 4))
    assert not torch.equal(base[0], base[1])


def test_gaussian_noise_statistics():
    x = torch.full((2000, 1, 28, 28), 0.5)
    eps = (GaussianNoise(0.3)(x, torch.arange(2000)) - 0.5) / 0.3  # 1.57M draws
    flat = eps.flatten(1)
    assert abs(eps.mean().item()) < 0.005
    assert abs(eps.std().item() - 1.0) < 0.005
    assert abs((eps**4).mean().item() - 3.0) < 0.03  # kurtosis of a normal
    assert abs((flat[:, 1:] * flat[:, :-1]).mean().item()) < 0.005  # neighbouring pixels uncorrelated
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 0.005  # neighbouring samples uncorrelated


def test_mask_zeroes_a_fraction_nu_of_pixels_across_all_channels():
    x = torch.rand(1000, 3, 16, 16) + 0.1  # no zero pixels before masking
    for nu in (0.01, 0.5, 0.9):
        masked = BinaryMask(nu)(x, torch.arange(1000))
        zero = masked == 0
        assert torch.equal(zero.all(1), zero.any(1))  # all channels of a pixel together
        assert abs(zero[:, 0].float().mean().item() - nu) < 0.005
        kept = ~zero
        assert torch.equal(masked[kept], x[kept])
    assert torch.equal(BinaryMask(0.0)(x, torch.arange(1000)), x)
    assert torch.equal(BinaryMask(1.0)(x, torch.arange(1000)), torch.zeros_like(x))
