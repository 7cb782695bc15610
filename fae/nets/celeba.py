"""The paper's CelebA encoder and decoder (supplement Tables 3 and 4), with a width parameter.

Input (3, 64, 64) in [-1, 1]; w = width (64 in the paper), d_z = 64. Spatial sizes for 64x64 images:

Encoder, 64 -> 32 -> 16 -> 8:
    Conv(3, w, 5, 1, 2) LReLU AvgPool(2)
    Conv(w, 2w, 5, 1, 2) BN LReLU AvgPool(2)
    Conv(2w, 4w, 5, 1, 2) BN LReLU AvgPool(2)
    Conv(4w, 8w, 5, 1, 2) BN LReLU
    flatten, FC(8w * 8 * 8, heads * d_z)

Decoder, (d_z, 1, 1) -> 4 -> 8 -> 16 -> 32 -> 64:
    5 x [bilinear upsampling, Conv(c_in, c, 5, 1, 2), BN, ReLU] with c = 8w, 4w, 2w, w, w
    Conv(w, 3, 5, 1, 2), followed by Tanh

Two inconsistencies of the supplement's Tables 3 and 4, resolved here:

1. Table 3's FC(8192, 64) does not fit the layers before it: four 5x5 convs with padding 2 keep the
   size and three AvgPool(2) take 64 to 8, so the flattened features are 512 x 8 x 8 = 32768, not
   8192. The layers are the design and the FC's input size is bookkeeping derived from them, so the
   layers are kept as listed and the FC takes 8w * 8 * 8 features (32768 at w = 64).
   A Gaussian encoder needs two heads, the mean and the log-variance of q_phi(z|x): the FC has
   2 d_z outputs, split in two (the same as two FC(32768, d_z) heads, and the same convention as the
   MNIST encoder's (2 d_z, 1, 1) output). The WAE-GAN's deterministic encoder (Table 4) has one head.
2. Five bilinear doublings from 1x1 reach 32x32, not 64x64. The first upsampling goes from 1x1 to
   4x4 instead (a bilinear resize of a 1x1 map repeats it; the 5x5 convolution with zero padding
   then makes it depend on position), and the next four double: 4, 8, 16, 32, 64.

The decoder's per-layer channels halve from 8w, as the encoder's double, down to w, which the last
block keeps; the final convolution maps w channels to the C colour channels. LReLU slope 0.2, as in
the MNIST nets. `image_shape` (C, S, S), S a multiple of 16, is the data module's (its `image_size`
resize), which the model passes on; the tables' nets are C = 3 (RGB) and S = 64; C = 1 takes grey
images (fae.data.ImageFolderDataModule with channels 1), changing the first and last convolutions
only. `norm` swaps the BatchNorm (BN) for a per-sample GroupNorm or removes it (fae.nets.norm).
"""

from __future__ import annotations

from torch import Tensor, nn

from fae.errors import UserError, require_positive
from fae.nets.mnist import LEAKY_SLOPE
from fae.nets.norm import Norm, norm_layer


def image_side(net: str, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(C, S) of a (C, S, S) image shape, S a multiple of 16; one line saying what is wrong otherwise."""
    channels, height, width = image_shape
    if channels < 1 or height != width or height < 16 or height % 16:
        raise UserError(
            f"{net} takes (C, S, S) images with S a multiple of 16 ((3, 64, 64) in the paper), the data gives "
            f"{tuple(image_shape)}: set --data.image_size to a multiple of 16"
        )
    return channels, height


class CelebAEncoder(nn.Module):
    """(B, C, S, S) -> (B, heads * d_z): heads = 2 (mean, log-variance) for a Gaussian encoder."""

    def __init__(
        self,
        latent_dim: int = 64,
        width: int = 64,
        image_shape: tuple[int, int, int] = (3, 64, 64),
        gaussian: bool = True,
        norm: Norm = "batch",
    ) -> None:
        """
        Args:
            latent_dim: d_z (64 in the paper).
            width: channels of the first conv; later convs have 2, 4, 8 times as many (64 in the paper).
            gaussian: two heads (mean, log-variance) for a Gaussian q_phi(z|x); one (the code) for the
                deterministic WAE-GAN encoder (Table 4).
            image_shape: (C, S, S), the data's images ((3, 64, 64) in the paper; S a multiple of 16).
            norm: the normalisation layers: "batch" (the paper's BatchNorm), "group" or "none".
        """
        super().__init__()
        colours, image_size = image_side(type(self).__name__, image_shape)
        require_positive(type(self).__name__, latent_dim=latent_dim, width=width)
        self.latent_dim = latent_dim
        self.gaussian = gaussian
        self.image_shape = (colours, image_size, image_size)
        w, heads = width, 2 if gaussian else 1
        self.layers = nn.Sequential(
            nn.Conv2d(colours, w, 5, 1, 2),  # (w, S, S)
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.AvgPool2d(2),  # (w, S/2, S/2)
            nn.Conv2d(w, 2 * w, 5, 1, 2),
            norm_layer(norm, 2 * w),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.AvgPool2d(2),  # (2w, S/4, S/4)
            nn.Conv2d(2 * w, 4 * w, 5, 1, 2),
            norm_layer(norm, 4 * w),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.AvgPool2d(2),  # (4w, S/8, S/8)
            nn.Conv2d(4 * w, 8 * w, 5, 1, 2),
            norm_layer(norm, 8 * w),
            nn.LeakyReLU(LEAKY_SLOPE),  # (8w, S/8, S/8)
            nn.Flatten(),
            nn.Linear(8 * w * (image_size // 8) ** 2, heads * latent_dim),  # see the module docstring, point 1
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, heads * d_z)


class CelebADecoder(nn.Module):
    """(B, d_z) -> pre-activation (B, C, S, S); the image mean is tanh of it, in [-1, 1]."""

    output_activation = "tanh"

    def __init__(
        self,
        latent_dim: int = 64,
        width: int = 64,
        image_shape: tuple[int, int, int] = (3, 64, 64),
        norm: Norm = "batch",
    ) -> None:
        """
        Args:
            latent_dim: d_z (64 in the paper).
            width: channels of the last hidden layers; earlier layers have 2, 4, 8 times as many.
            image_shape: (C, S, S), the data's images ((3, 64, 64) in the paper; S a multiple of 16).
            norm: the normalisation layers: "batch" (the paper's BatchNorm), "group" or "none".
        """
        super().__init__()
        colours, image_size = image_side(type(self).__name__, image_shape)
        require_positive(type(self).__name__, latent_dim=latent_dim, width=width)
        self.latent_dim = latent_dim
        self.image_shape = (colours, image_size, image_size)
        w = width
        layers: list[nn.Module] = []
        channels = latent_dim
        for i, out in enumerate((8 * w, 4 * w, 2 * w, w, w)):
            # first block: 1x1 -> S/16 (see the module docstring, point 2); then doublings up to S
            resize = {"size": image_size // 16} if i == 0 else {"scale_factor": 2}
            up = nn.Upsample(**resize, mode="bilinear", align_corners=False)
            layers += [up, nn.Conv2d(channels, out, 5, 1, 2), norm_layer(norm, out), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(w, colours, 5, 1, 2))  # (C, S, S)
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z[:, :, None, None])  # (B, d_z) -> (B, C, S, S)
