"""The paper's MNIST encoder and decoder (supplement Tables 1 and 2), with a width parameter.

Encoder, input (1, 28, 28), spatial sizes 28 -> 15 -> 9 -> 6 -> 3 -> 1 (w = width, 64 in the paper):
    Conv(1, w, 3, 2, 2) LReLU
    Conv(w, 2w, 3, 2, 2) BN LReLU
    Conv(2w, 4w, 3, 2, 2) BN LReLU
    Conv(4w, 8w, 3, 2, 1) BN LReLU
    Conv(8w, 2 d_z, 3, 2, 0)  -> (2 d_z, 1, 1): mean and log-variance of a Gaussian q_phi(z|x)
WAE-GAN's deterministic encoder ends Conv(8w, d_z, 3, 1, 0) instead (Table 2); on the 3x3 input
stride 1 and stride 2 give the same 1x1 output, so only the number of heads differs.

Decoder, input (d_z, 1, 1), spatial sizes 1 -> 3 -> 5 -> 11 -> 13 -> 28:
    ConvT(d_z, 8w, 5, 1, 1) BN ReLU
    ConvT(8w, 4w, 5, 1, 1) BN ReLU
    ConvT(4w, 2w, 5, 2, 1) BN ReLU
    ConvT(2w, w, 5, 1, 1) BN ReLU
    ConvT(w, 1, 4, 2, 0)  -> (1, 28, 28), followed by Sigmoid
The decoder returns the pre-activation (logits); the model applies `output_activation` (the table's
Sigmoid), so that a Bernoulli likelihood can use the numerically stable BCE-with-logits.

LReLU has slope 0.2 (the DCGAN convention; the table gives none). BN is the paper's BatchNorm;
`norm` swaps it for a per-sample GroupNorm or removes it (fae.nets.norm).
"""

from __future__ import annotations

from torch import Tensor, nn

from fae.errors import UserError, require_positive
from fae.nets.norm import Norm, norm_layer

LEAKY_SLOPE = 0.2
IMAGE_SHAPE = (1, 28, 28)


def check_image_shape(net: str, image_shape: tuple[int, int, int]) -> None:
    if tuple(image_shape) != IMAGE_SHAPE:
        raise UserError(
            f"{net} takes MNIST's {IMAGE_SHAPE} images, the data gives {tuple(image_shape)}: use the data set's own "
            "nets (e.g. fae.nets.CelebAEncoder/CelebADecoder for CelebA)"
        )


class MNISTEncoder(nn.Module):
    """(B, 1, 28, 28) -> (B, heads * d_z): heads = 2 (mean, log-variance) for a Gaussian encoder."""

    image_shape = IMAGE_SHAPE

    def __init__(
        self,
        latent_dim: int = 8,
        width: int = 64,
        image_shape: tuple[int, int, int] = IMAGE_SHAPE,
        gaussian: bool = True,
        norm: Norm = "batch",
    ) -> None:
        """
        Args:
            latent_dim: d_z (8 in the paper).
            width: channels of the first conv; later layers have 2, 4, 8 times as many (64 in the paper).
            image_shape: the data's (C, H, W); these nets take (1, 28, 28) only.
            gaussian: two heads (mean, log-variance) for a Gaussian q_phi(z|x); one (the code) for the
                deterministic WAE-GAN encoder.
            norm: the normalisation layers: "batch" (the paper's BatchNorm), "group" or "none".
        """
        super().__init__()
        require_positive(type(self).__name__, latent_dim=latent_dim, width=width)
        check_image_shape(type(self).__name__, image_shape)
        self.latent_dim = latent_dim
        self.gaussian = gaussian
        w = width
        heads = 2 if gaussian else 1
        self.layers = nn.Sequential(
            nn.Conv2d(1, w, 3, 2, 2),  # (w, 15, 15)
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(w, 2 * w, 3, 2, 2),  # (2w, 9, 9)
            norm_layer(norm, 2 * w),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 2),  # (4w, 6, 6)
            norm_layer(norm, 4 * w),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(4 * w, 8 * w, 3, 2, 1),  # (8w, 3, 3)
            norm_layer(norm, 8 * w),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(8 * w, heads * latent_dim, 3, 2 if gaussian else 1, 0),  # (heads d_z, 1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).flatten(1)  # (B, heads * d_z)


class MNISTDecoder(nn.Module):
    """(B, d_z) -> logits (B, 1, 28, 28); the image mean is sigmoid(logits)."""

    output_activation = "sigmoid"
    image_shape = IMAGE_SHAPE

    def __init__(
        self,
        latent_dim: int = 8,
        width: int = 64,
        image_shape: tuple[int, int, int] = IMAGE_SHAPE,
        norm: Norm = "batch",
    ) -> None:
        """
        Args:
            latent_dim: d_z (8 in the paper).
            width: channels of the last hidden layer; earlier layers have 2, 4, 8 times as many.
            image_shape: the data's (C, H, W); these nets make (1, 28, 28) only.
            norm: the normalisation layers: "batch" (the paper's BatchNorm), "group" or "none".
        """
        super().__init__()
        require_positive(type(self).__name__, latent_dim=latent_dim, width=width)
        check_image_shape(type(self).__name__, image_shape)
        self.latent_dim = latent_dim
        w = width
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 8 * w, 5, 1, 1),  # (8w, 3, 3)
            norm_layer(norm, 8 * w),
            nn.ReLU(),
            nn.ConvTranspose2d(8 * w, 4 * w, 5, 1, 1),  # (4w, 5, 5)
            norm_layer(norm, 4 * w),
            nn.ReLU(),
            nn.ConvTranspose2d(4 * w, 2 * w, 5, 2, 1),  # (2w, 11, 11)
            norm_layer(norm, 2 * w),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 5, 1, 1),  # (w, 13, 13)
            norm_layer(norm, w),
            nn.ReLU(),
            nn.ConvTranspose2d(w, 1, 4, 2, 0),  # (1, 28, 28)
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z[:, :, None, None])  # (B, d_z) -> (B, 1, 28, 28)
