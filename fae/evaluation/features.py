"""Feature networks for sample quality (FID, KID): the network whose activations the scores compare.

Nothing here downloads. Two networks:
  - MNIST: a small classifier trained by fae on the real MNIST training set (`fae classifier
    --data_dir DIR`), cached as DIR/fae_mnist_classifier.pt beside the data; its 128-d penultimate
    activations are the features. Scores through it are NOT comparable with Inception-based FIDs of
    the literature: they compare models scored with the same classifier file only.
  - CelebA (any 3-channel images): Inception-v3 as FID defines it (torchmetrics' wrapper of
    torch-fidelity's network), from a weights file the user already has (torch-fidelity's
    pt_inception-2015-12-05-6726825d.pth), given as `--sweep.features FILE`.

`load_features(file, image_shape)` reads either file and returns a module mapping images in [0, 1],
(N, C, H, W), to features (N, num_features); it never trains and never leaves eval mode.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import MNIST

from fae.data.mnist import CLASSIFIER_FILE, MNISTDataModule
from fae.errors import UserError, short_reason

CLASSIFIER_FORMAT = "fae-mnist-classifier-1"  # the file's format tag; a new architecture gets a new tag
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for FID's Inception weights


class MNISTClassifier(nn.Module):
    """Two conv blocks (32, 64 channels, 3x3, max-pool) and a 128-unit hidden layer: about 99% test
    accuracy after two epochs. `features(x)` is the hidden layer (after its ReLU)."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 x 14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7 x 7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) in [0, 1] -> (N, 128)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, 10)."""
        return self.head(self.features(x))


class Frozen(nn.Module):
    """A feature network that stays in eval mode and runs in float32 without gradients."""

    def __init__(self, net: nn.Module, extract, num_features: int) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.extract = extract
        self.num_features = num_features

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
        except (KeyError, RuntimeError) as err:
            raise UserError(f"{file} does not hold the classifier's weights ({short_reason(err)[:100]}): "
                            "train it again with `fae classifier`") from None  # fmt: skip
        return Frozen(net, classifier_features, MNISTClassifier.num_features)
    return Frozen(load_inception(file), inception_features, 2048)


def load_inception(file: Path) -> nn.Module:
    """FID's Inception-v3 (torchmetrics' NoTrainInceptionV3, pool features) with the weights in `file`."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file))
    except (RuntimeError, KeyError) as err:
        raise UserError(
            f"{file} is neither a `fae classifier` file nor FID's Inception weights ({INCEPTION_FILE}): "
            f"{short_reason(err)[:100]}"
        ) from None


# --- `fae classifier`: train the MNIST feature network once and cache it beside the data ----------------


class ClassifierTraining(L.LightningModule):
    """Cross-entropy on the MNIST training images, Adam 1e-3; test accuracy by torchmetrics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MNISTClassifier()
        self.accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.accuracy.update(self.net(images).argmax(1), labels)
        self.log("accuracy", self.accuracy)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def mnist_tensors(data_dir: Path, train: bool) -> torch.utils.data.TensorDataset:
    """MNIST's images in [0, 1] (N, 1, 28, 28) and their labels."""
    MNISTDataModule(data_dir=str(data_dir)).check_available()  # one line naming the missing files

    dataset = MNIST(str(data_dir), train=train, download=False)
    return torch.utils.data.TensorDataset(dataset.data.unsqueeze(1).float() / 255, dataset.targets)


def train_classifier(data_dir: Path, epochs: int = 2, seed: int = 0, limit_batches: int | None = None) -> Path:
    """Train the classifier on the 60k MNIST training images, test it on the 10k test images and save
    it as DATA_DIR/fae_mnist_classifier.pt (written to a temporary file, then renamed into place).
    An existing file is kept: it is returned untouched."""
    data_dir = Path(data_dir)
    file = data_dir / CLASSIFIER_FILE
    if file.exists():
        return file
    L.seed_everything(seed, verbose=False)
    train = torch.utils.data.DataLoader(mnist_tensors(data_dir, True), batch_size=128, shuffle=True)
    test = torch.utils.data.DataLoader(mnist_tensors(data_dir, False), batch_size=1000)
    module = ClassifierTraining()
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=limit_batches, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(module, train)
    (result,) = trainer.test(module, test, verbose=False)
    content = {
        "format": CLASSIFIER_FORMAT,
        "state_dict": module.net.state_dict(),
        "test_accuracy": float(result["accuracy"]),
        "epochs": epochs,
        "seed": seed,
    }
    handle, tmp = tempfile.mkstemp(dir=data_dir, prefix=".fae_mnist_classifier-", suffix=".pt")
    os.close(handle)
    try:
        torch.save(content, tmp)
        if file.exists():  # another process finished first: its file stands
            return file
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return file


def classifier_accuracy(file: Path) -> float:
    """The test accuracy recorded in a `fae classifier` file."""
    content = torch.load(file, map_location="cpu", weights_only=True)
    return float(content["test_accuracy"])


def main(args: list[str]) -> None:
    """`fae classifier --data_dir DIR [--epochs 2]`: the MNIST feature network for FID/KID."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="fae classifier",
        description="Train (once) the MNIST classifier whose features fae's FID/KID use; cached in DATA_DIR.",
        exit_on_error=False,
    )
    parser.add_argument("--data_dir", required=True, help="the folder holding MNIST/raw/ (real MNIST)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs over the 60k training images")
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    config = parser.parse_args(args)
    if config.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {config.epochs}")
    file = Path(config.data_dir) / CLASSIFIER_FILE
    cached = file.exists()
    file = train_classifier(Path(config.data_dir), config.epochs, config.seed)
    load_features(file, (1, 28, 28))  # a corrupt cached file is named here, not at `fae test`
    state = "cached, reused" if cached else "trained"
    print(f"fae: classifier {state}: {file}; MNIST test accuracy {100 * classifier_accuracy(file):.2f}%")
    print("fae: FID/KID through it compare fae runs scored with this file; they are not Inception FIDs")
