"""bf16 mixed precision and compiled nets: every family's objective under bfloat16 autocast agrees with
float32 on a fixed batch (the loss and the direction of its gradient), `fae fit`/`fae test` run with
--trainer.precision bf16-mixed, and --model.compile_nets compiles the nets in place or, for the Fisher
AE, says in one line why not."""

from __future__ import annotations

import json

import pytest
import torch

from fae.data import DigitsDataModule
from fae.models import VAE, WAEGAN, FisherAE
from fae.nets import MNISTDecoder, MNISTEncoder

from .helpers import CONFIGS

NETS = dict(encoder=MNISTEncoder, decoder=MNISTDecoder, latent_dim=8, width=8, grid_images=0)
FAMILIES = {
    "vae": lambda **kw: VAE(**NETS, **kw),
    "fisher": lambda **kw: FisherAE(**NETS, learn_decoder_scale=True, decoder_scale=0.5, **kw),
    "wae_gan": lambda **kw: WAEGAN(**NETS, **kw),
}
# bfloat16 keeps 8 bits of mantissa (a relative rounding of 2^-9 = 0.2% per value); the nets' outputs
# enter the objectives in float32, so the loss of a 64-image batch moves by under 1% and its gradient
# keeps its direction. Measured (loss, gradient cosine): width 8, as here, at most 0.03% and >= 0.9989;
# the paper's width 64, VAE 0.02% / 0.9986, Fisher AE 0.44% / 0.9990, WAE-GAN 0.01% / 0.9972.
LOSS_TOLERANCE = 0.01
GRADIENT_COSINE = 0.99


def loss_and_gradient(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)  # the same z samples in both precisions
    model.zero_grad(set_to_none=True)
    loss = model.model_step(x)["loss"].mean()
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), gradient


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_objective_under_bf16_autocast_agrees_with_float32(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().train()
    dm = DigitsDataModule()
    dm.setup()
    x = dm.to_float(dm.splits["train"][:64])
    loss32, grad32 = loss_and_gradient(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grad16 = loss_and_gradient(model, x)
    assert loss16.dtype == torch.float32  # the objective is computed in float32 on top of bf16 nets
    assert abs(loss16 - loss32) <= LOSS_TOLERANCE * abs(loss32), (family, float(loss32), float(loss16))
    cosine = torch.nn.functional.cosine_similarity(grad32, grad16, dim=0)
    assert cosine >= GRADIENT_COSINE, (family, float(cosine))


def test_fit_and_the_robustness_sweep_run_in_bf16_mixed_precision(tmp_path, fae_here):
    config = ["--config", str(CONFIGS / "quickstart" / "digits_fisher.yaml"), "--model.width", "4",
              "--trainer.precision", "bf16-mixed", "--trainer.logger", "false", "--trainer.enable_progress_bar",
              "false", "--run_dir", str(tmp_path / "run")]  # fmt: skip
    fit = fae_here("fit", *config, "--trainer.max_steps", "6", "--trainer.limit_val_batches", "2", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    test = fae_here("test", *config, "--ckpt_path", "last", "--trainer.limit_test_batches", "2", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    (folder,) = (tmp_path / "run").glob("test-*")
    results = json.loads((folder / "robustness.json").read_text())
    errors = [row["mean"] for row in results]
    assert errors and all(0 < e < 1 for e in errors)  # BCE per pixel of real reconstructions, finite


def test_compiled_nets_are_compiled_in_place_and_the_fisher_ae_says_why_not(caplog):
    vae = FAMILIES["vae"](compile_nets=True)
    keys = list(vae.state_dict())
    vae.maybe_compile_nets()
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    assert list(vae.state_dict()) == keys  # checkpoints are the same with or without compiled nets
    fisher = FAMILIES["fisher"](compile_nets=True)
    with caplog.at_level("INFO"):
        fisher.maybe_compile_nets()
    assert fisher.encoder._compiled_call_impl is None
    assert "fae: model.compile_nets: the Fisher objective differentiates the nets twice" in caplog.text
