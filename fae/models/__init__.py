"""Model families: LightningModules sharing fae.models.base.AutoEncoder."""

from fae.models.base import AutoEncoder
from fae.models.vae import VAE

__all__ = ["VAE", "AutoEncoder"]
