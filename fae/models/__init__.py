"""Model families: LightningModules sharing fae.models.base.AutoEncoder."""

from fae.models.base import AutoEncoder
from fae.models.fisher import FisherAE
from fae.models.gaussian import GaussianAutoEncoder
from fae.models.vae import VAE
from fae.models.wae_gan import WAEGAN

__all__ = ["VAE", "WAEGAN", "AutoEncoder", "FisherAE", "GaussianAutoEncoder"]
