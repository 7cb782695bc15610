"""Feature networks for sample quality (FID, KID): the network whose activations the scores compare.

Nothing here downloads. Two networks:
  - MNIST: a small classifier trained by fae on the real MNIST training set (`fae classifier
    --data_dir DIR`), cached as DIR/fae_mnist_classifier.pt beside the data; its 128-d penultimate
    activations are the features. Scores through it are NOT comparable with Inception-based FIDs of
    the literature: they compare models scored with the same classifier file only.
  - CelebA (any 3-channel images): Inception-v3 as FID defines it (torchmetrics' wrapper of
    torch-fidelity's network, resizing as the original TensorFlow code), from a weights file the user
    already has (torch-fidelity's pt_inception-2015-12-05-6726825d.pth), given as `--sweep.features FILE`.

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

from fae.data.mnist import CLASSIFIER_FILE, MNISTDataModule
from fae.errors import UserError, short_reason

CLASSIFIER_FORMAT = "fae-mnist-classifier-1"  # the file's format tag; a new architecture gets a new tag
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for FID's Inception weights


class MNISTClassifier(nn.Module):
    """Two conv blocks (32, 64 channels, 3x3, max-pool) and a 128-unit hidden layer: 98.4% test accuracy
    after two epochs here. `features(x)` is the hidden layer (after its ReLU)."""

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
        except Exception as err:  # no weights, others' weights, not a state dict
            raise UserError(f"{file} does not hold the classifier's weights ({short_reason(err)[:100]}): "
                            "train it again with `fae classifier`") from None  # fmt: skip
        return Frozen(net, classifier_features, MNISTClassifier.num_features)
    return Frozen(load_inception(file), inception_features, 2048)


def load_inception(file: Path) -> nn.Module:
    """FID's Inception-v3 (torchmetrics' NoTrainInceptionV3, pool features) with the weights in `file`."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        # antialias=False: resized to 299 as the original TensorFlow FID does (torch-fidelity's compat resize)
        return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file),
                                  antialias=False)  # fmt: skip
    except Exception as err:  # missing or mismatched weights, a file holding something else
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
    """MNIST's images in [0, 1] (N, 1, 28, 28) and their labels, read and checked by fae.data.mnist."""
    images, labels = MNISTDataModule(data_dir=str(data_dir)).read(train, labels=True, full=False)
    return torch.utils.data.TensorDataset(images.float() / 255, labels)


def train_classifier(data_dir: Path, epochs: int = 2, seed: int = 0, limit_batches: int | None = None) -> Path:
    """Train the classifier on the 60k MNIST training images, test it on the 10k test images and save
    it as DATA_DIR/fae_mnist_classifier.pt (written to a temporary file, then renamed into place).
    An existing file is kept: it is returned untouched. The global random streams are left as they were."""
    data_dir = Path(data_dir)
    file = data_dir / CLASSIFIER_FILE
    if file.exists():
        return file
    train_set, test_set = mnist_tensors(data_dir, True), mnist_tensors(data_dir, False)
    if not os.access(data_dir, os.W_OK):
        raise UserError(f"cannot write the classifier into {data_dir} (not writable): give a --data_dir fae may write")
    shuffle = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True, generator=shuffle)
    test = torch.utils.data.DataLoader(test_set, batch_size=1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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


def classifier_record(file: Path) -> dict:
    """What a `fae classifier` file says of its training: test_accuracy, epochs, seed (those it has)."""
    content = torch.load(file, map_location="cpu", weights_only=True)
    return {key: content[key] for key in ("test_accuracy", "epochs", "seed") if key in content}


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
    record = classifier_record(file)
    accuracy = f"{100 * record['test_accuracy']:.2f}%" if "test_accuracy" in record else "not recorded"
    print(f"fae: classifier {'cached, reused' if cached else 'trained'}: {file}; MNIST test accuracy {accuracy}")
    if cached and (record.get("epochs"), record.get("seed")) != (config.epochs, config.seed):
        print(f"fae: the cached file was trained with epochs {record.get('epochs')}, seed {record.get('seed')}; "
              "move it away to train again")  # fmt: skip
    print("fae: FID/KID through it compare fae runs scored with this file; they are not Inception FIDs")
