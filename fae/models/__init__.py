"""Model families: LightningModules sharing fae.models.base.AutoEncoder."""

from fae.models.base import AutoEncoder, GaussianAutoEncoder
from fae.models.fisher import FisherAE
from fae.models.vae import VAE

__all__ = ["VAE", "AutoEncoder", "FisherAE", "GaussianAutoEncoder"]
