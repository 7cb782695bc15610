"""A plain auto-encoder: a deterministic encoder and decoder trained by the reconstruction's
cross-entropy alone (no prior, no posterior). The example of a new family in docs/develop.md, verbatim:
the whole of what a family needs; tests/test_family.py checks that both stay the same."""

from __future__ import annotations

from torch import Tensor

from fae.models.base import AutoEncoder
from fae.nets.contract import DecoderFactory, EncoderFactory


class AE(AutoEncoder):
    """A deterministic auto-encoder trained by the reconstruction's cross-entropy alone."""

    terms = ("loss",)

    def __init__(self, encoder: EncoderFactory, decoder: DecoderFactory, **kwargs) -> None:
        super().__init__(encoder, decoder, **kwargs)
        self.save_config()  # the constructor's arguments, so that a checkpoint rebuilds the model
        self.build_likelihood("bernoulli", decoder_scale=1.0, learn_decoder_scale=False)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # (B, d_z)

    def model_step(self, x: Tensor) -> dict[str, Tensor]:
        codes = self.encode(x)
        out = self.decoder(codes)
        terms = {"loss": self.likelihood.nll(out, x)}  # (B,)
        return {**terms, **self.diagnostics(x, self.likelihood.mean(out), codes)}
