"""What a net must be to serve as an encoder or a decoder of fae's models: how the model builds it
(a factory, so that latent size, width and image shape are stated once, on the model) and what the
built net declares, checked once when a model is built (`build_nets`), with one line naming what is
missing or wrong.

    encoder = factory(latent_dim, width, image_shape, gaussian):
        (B, C, H, W) -> (B, heads * d_z)         declares latent_dim (d_z), image_shape (C, H, W),
                                                  gaussian (two heads, mean and log-variance, or one:
                                                  the code)
    decoder = factory(latent_dim, width, image_shape):
        (B, d_z) -> pre-activation (B, C, H, W)  declares latent_dim, image_shape, output_activation
                                                  ("sigmoid": images in [0, 1]; "tanh": in [-1, 1];
                                                  "identity")

A net class whose first parameters are these is its own factory: in a config, `encoder:
fae.nets.MNISTEncoder` (with `init_args` for its other parameters, such as `norm`). The model
supplies latent_dim and width (its own arguments), image_shape (the data module's, linked by the
CLI) and gaussian (the family's). fae.nets.MNISTEncoder/MNISTDecoder and CelebAEncoder/CelebADecoder
are such nets; a new data set's nets take and declare the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from fae.errors import UserError

ImageShape = tuple[int, int, int]
# (latent_dim, width, image_shape, gaussian) -> encoder; jsonargparse reads a class given as
# `class_path` with its remaining parameters as `init_args` as such a callable
EncoderFactory = Callable[[int, int, ImageShape, bool], nn.Module]
DecoderFactory = Callable[[int, int, ImageShape], nn.Module]  # (latent_dim, width, image_shape) -> decoder


@runtime_checkable
class Encoder(Protocol):
    latent_dim: int
    image_shape: ImageShape
    gaussian: bool

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Decoder(Protocol):
    latent_dim: int
    image_shape: ImageShape
    output_activation: str

    def __call__(self, z: Tensor) -> Tensor: ...


def build_nets(
    encoder: EncoderFactory,
    decoder: DecoderFactory,
    latent_dim: int,
    width: int,
    image_shape: ImageShape,
    gaussian: bool,
) -> tuple[nn.Module, nn.Module]:
    """The two nets from their factories, each checked to declare the contract and to be what was
    asked for (so that the two fit together); one UserError naming the first that is not."""
    for role, factory in (("encoder", encoder), ("decoder", decoder)):
        if isinstance(factory, nn.Module):
            raise UserError(
                f"the model's {role} is a built net ({type(factory).__name__}); give its class (or a factory) "
                "instead: the model builds both nets from its latent_dim, width and image_shape"
            )
    image_shape = tuple(image_shape)
    nets = {
        "encoder": (encoder(latent_dim, width, image_shape, gaussian), Encoder),
        "decoder": (decoder(latent_dim, width, image_shape), Decoder),
    }
    for role, (net, protocol) in nets.items():
        if lacking := [name for name in protocol.__annotations__ if not hasattr(net, name)]:
            raise UserError(
                f"the {role} {type(net).__name__} does not declare {', '.join(lacking)}: a fae {role} declares "
                f"{', '.join(protocol.__annotations__)} (fae.nets.contract)"
            )
        if net.latent_dim != latent_dim or tuple(net.image_shape) != image_shape:
            raise UserError(
                f"the {role} {type(net).__name__} was asked for latent_dim {latent_dim} and image_shape "
                f"{image_shape} but declares {net.latent_dim} and {tuple(net.image_shape)}: its factory must "
                "use the arguments it is given (fae.nets.contract)"
            )
    enc, dec = nets["encoder"][0], nets["decoder"][0]
    if bool(enc.gaussian) != gaussian:
        raise UserError(
            f"the encoder {type(enc).__name__} was asked for {'a Gaussian' if gaussian else 'a deterministic'} "
            "encoder and declares otherwise: its factory must use the `gaussian` it is given (fae.nets.contract)"
        )
    return enc, dec
