"""The paper's nets: every layer's output shape against supplement Tables 1 (MNIST) and 3 (CelebA), at the
paper's width and a narrow one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fae.errors import UserError
from fae.nets import CelebADecoder, CelebAEncoder, MNISTDecoder, MNISTEncoder

# (channels as a multiple of the width w, spatial size) after each conv of Table 1
ENCODER_TABLE = [(1, 15), (2, 9), (4, 6), (8, 3)]
DECODER_TABLE = [(8, 3), (4, 5), (2, 11), (1, 13)]


def conv_outputs(net: nn.Module, x: torch.Tensor, kinds) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
        for m in net.modules()
        if isinstance(m, kinds)
    ]
    net(x)
    for h in hooks:
        h.remove()
    return shapes


@pytest.mark.parametrize("width", [64, 4])
def test_encoder_layer_shapes(width):
    d_z = 8
    gaussian = conv_outputs(MNISTEncoder(d_z, width), torch.zeros(2, 1, 28, 28), nn.Conv2d)
    expected = [(k * width, s, s) for k, s in ENCODER_TABLE]
    assert gaussian == [*expected, (2 * d_z, 1, 1)]  # Table 1: (16, 1, 1) = mean and log-variance
    deterministic = conv_outputs(MNISTEncoder(d_z, width, gaussian=False), torch.zeros(2, 1, 28, 28), nn.Conv2d)
    assert deterministic == [*expected, (d_z, 1, 1)]  # Table 2: Conv(512, 8, 3, 1, 0)
    assert MNISTEncoder(d_z, width)(torch.zeros(2, 1, 28, 28)).shape == (2, 2 * d_z)


@pytest.mark.parametrize("width", [64, 4])
def test_decoder_layer_shapes(width):
    shapes = conv_outputs(MNISTDecoder(8, width), torch.zeros(2, 8), nn.ConvTranspose2d)
    assert shapes == [*[(k * width, s, s) for k, s in DECODER_TABLE], (1, 28, 28)]


def test_paper_width_layer_sizes_match_the_table():
    enc = [m for m in MNISTEncoder(8, 64).modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in enc] == [
        (1, 64, 3, 2, 2),
        (64, 128, 3, 2, 2),
        (128, 256, 3, 2, 2),
        (256, 512, 3, 2, 1),
        (512, 16, 3, 2, 0),
    ]
    dec = [m for m in MNISTDecoder(8, 64).modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in dec] == [
        (8, 512, 5, 1, 1),
        (512, 256, 5, 1, 1),
        (256, 128, 5, 2, 1),
        (128, 64, 5, 1, 1),
        (64, 1, 4, 2, 0),
    ]
    bn = [m.num_features for m in MNISTEncoder(8, 64).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn == [128, 256, 512]  # BN on all but the first and last layers


# CelebA, supplement Table 3 (channels as multiples of w, spatial size), with the docstring's two resolutions
CELEBA_ENCODER_TABLE = [(1, 64), (2, 32), (4, 16), (8, 8)]  # each conv's output; AvgPool(2) after the first three
CELEBA_DECODER_TABLE = [(8, 4), (4, 8), (2, 16), (1, 32), (1, 64)]  # first upsampling 1 -> 4, then doublings


@pytest.mark.parametrize("width", [64, 4])
def test_celeba_encoder_layer_shapes(width):
    x = torch.zeros(2, 3, 64, 64)
    expected = [(k * width, s, s) for k, s in CELEBA_ENCODER_TABLE]
    for gaussian, heads in ((True, 2), (False, 1)):
        encoder = CelebAEncoder(64, width, gaussian=gaussian)
        assert conv_outputs(encoder, x, nn.Conv2d) == expected
        (fc,) = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        assert (fc.in_features, fc.out_features) == (8 * width * 8 * 8, heads * 64)  # 32768 at w = 64, not 8192
        assert encoder(x).shape == (2, heads * 64)
    bn = [m.num_features for m in CelebAEncoder(64, width).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn == [2 * width, 4 * width, 8 * width]  # no BN on the first conv


@pytest.mark.parametrize("width", [64, 4])
def test_celeba_decoder_layer_shapes(width):
    decoder = CelebADecoder(64, width)
    shapes = conv_outputs(decoder, torch.zeros(2, 64), nn.Conv2d)
    assert shapes == [*[(k * width, s, s) for k, s in CELEBA_DECODER_TABLE], (3, 64, 64)]
    assert all(m.kernel_size == (5, 5) and m.padding == (2, 2) for m in decoder.modules() if isinstance(m, nn.Conv2d))
    assert decoder.output_activation == "tanh"


def test_nets_follow_the_image_shape_and_reject_shapes_they_cannot_make():
    assert CelebADecoder(16, 4, (3, 32, 32))(torch.zeros(2, 16)).shape == (2, 3, 32, 32)
    assert CelebAEncoder(16, 4, (3, 32, 32))(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    assert CelebADecoder(16, 4, (1, 32, 32))(torch.zeros(2, 16)).shape == (2, 1, 32, 32)  # grey images
    assert CelebAEncoder(16, 4, (1, 32, 32))(torch.zeros(2, 1, 32, 32)).shape == (2, 32)
    with pytest.raises(UserError, match=r"CelebADecoder takes \(C, S, S\) images with S a multiple of 16.*\(3, 40"):
        CelebADecoder(64, 4, (3, 40, 40))
    with pytest.raises(UserError, match=r"CelebAEncoder takes \(C, S, S\) images.*gives \(1, 28, 28\)"):
        CelebAEncoder(64, 4, (1, 28, 28))
    with pytest.raises(UserError, match=r"MNISTEncoder takes MNIST's \(1, 28, 28\) images, the data gives \(3, 64"):
        MNISTEncoder(8, 4, (3, 64, 64))
