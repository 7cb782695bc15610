"""What a net must declare to be an encoder or a decoder of fae's models, checked once when a model is
built (`check_nets`), with one line naming what is missing.

    encoder: (B, C, H, W) -> (B, heads * d_z)   latent_dim (d_z), image_shape (C, H, W), gaussian
                                                 (two heads, mean and log-variance, or one: the code)
    decoder: (B, d_z) -> pre-activation (B, C, H, W)
                                                 latent_dim, image_shape, output_activation
                                                 ("sigmoid": images in [0, 1]; "tanh": in [-1, 1];
                                                 "identity")

fae.nets.MNISTEncoder/MNISTDecoder and CelebAEncoder/CelebADecoder are such nets; a new data set's nets
declare the same attributes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from fae.errors import UserError


@runtime_checkable
class Encoder(Protocol):
    latent_dim: int
    image_shape: tuple[int, int, int]
    gaussian: bool

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    latent_dim: int
    image_shape: tuple[int, int, int]
    output_activation: str

    def __call__(self, z: Tensor) -> Tensor: ...


def missing(net: object, protocol: type) -> list[str]:
    return [name for name in protocol.__annotations__ if not hasattr(net, name)]


def check_nets(encoder: object, decoder: object) -> None:
    """One UserError if a net lacks part of its contract, or if the two do not fit together."""
    for role, net, protocol in (("encoder", encoder, Encoder), ("decoder", decoder, Decoder)):
        if lacking := missing(net, protocol):
            raise UserError(
                f"the {role} {type(net).__name__} does not declare {', '.join(lacking)}: a fae {role} declares "
                f"{', '.join(protocol.__annotations__)} (fae.nets.contract)"
            )
    if encoder.latent_dim != decoder.latent_dim:
        raise UserError(
            f"encoder latent_dim {encoder.latent_dim} != decoder latent_dim {decoder.latent_dim}: give both nets "
            "the same latent_dim (--model.encoder.latent_dim, --model.decoder.latent_dim)"
        )
    if tuple(encoder.image_shape) != tuple(decoder.image_shape):
        raise UserError(
            f"the encoder takes images {tuple(encoder.image_shape)} but the decoder makes "
            f"{tuple(decoder.image_shape)}: give both nets the same image size"
        )
