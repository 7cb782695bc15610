"""`fae classifier --data_dir DIR [--dataset fashion_mnist]`: train, once, the classifier whose features
fae's FID/KID use on MNIST (or Fashion-MNIST: the same net, trained on its 10 classes) (fae.nets.classifier,
read by fae.evaluation.features), and cache it beside the data as DIR/fae_mnist_classifier.pt (or
DIR/fae_fashion_mnist_classifier.pt). An existing file is never retrained or rewritten."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from fae.data.mnist import FashionMNISTDataModule, MNISTDataModule
from fae.errors import UserError
from fae.evaluation.features import CLASSIFIER_FORMAT, load_features
from fae.files import share_as_umask
from fae.nets.classifier import MNISTClassifier


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


DATASETS = {"mnist": MNISTDataModule, "fashion_mnist": FashionMNISTDataModule}
Dataset = Literal["mnist", "fashion_mnist"]


def mnist_tensors(data_dir: Path, train: bool, dataset: Dataset = "mnist") -> torch.utils.data.TensorDataset:
    """The images in [0, 1] (N, 1, 28, 28) and their labels, read and checked by fae.data.mnist."""
    images, labels = DATASETS[dataset](data_dir=str(data_dir)).read(train, labels=True, full=False)
    return torch.utils.data.TensorDataset(images.float() / 255, labels)


def train_classifier(
    data_dir: Path, epochs: int = 2, seed: int = 0, limit_batches: int | None = None, dataset: Dataset = "mnist"
) -> Path:
    """Train the classifier on the 60k training images, test it on the 10k test images and save it as
    DATA_DIR/<the data module's classifier_file> (written to a temporary file, then renamed into place).
    An existing file is kept: it is returned untouched. The global random streams are left as they were."""
    data_dir = Path(data_dir)
    file = data_dir / DATASETS[dataset].classifier_file
    if file.exists():
        return file
    train_set, test_set = mnist_tensors(data_dir, True, dataset), mnist_tensors(data_dir, False, dataset)
    if not os.access(data_dir, os.W_OK):
        raise UserError(f"cannot write the classifier into {data_dir} (not writable): give a --data_dir fae may write")
    shuffle = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True, generator=shuffle)
    test = torch.utils.data.DataLoader(test_set, batch_size=1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = ClassifierTraining()
        trainer = L.Trainer(
            max_epochs=epochs,
            limit_train_batches=limit_batches,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
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
    share_as_umask(handle)  # a shared data folder's other users score with it too
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


def classifier(*, data_dir: Path, epochs: int = 2, seed: int = 0, dataset: Dataset = "mnist") -> None:
    """Train (once) the classifier whose features fae's FID/KID use; cached in DATA_DIR.

    Args:
        data_dir: the folder holding MNIST/raw/ (FashionMNIST/raw/ for Fashion-MNIST); the classifier is
            cached there.
        epochs: training epochs over the 60k training images.
        seed: the training seed.
        dataset: mnist or fashion_mnist.
    """
    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    module = DATASETS[dataset]
    file = Path(data_dir) / module.classifier_file
    cached = file.exists()
    file = train_classifier(Path(data_dir), epochs, seed, dataset=dataset)
    load_features(file, (1, 28, 28))  # a corrupt cached file is named here, not at `fae test`
    record = classifier_record(file)
    accuracy = f"{100 * record['test_accuracy']:.2f}%" if "test_accuracy" in record else "not recorded"
    print(
        f"fae: classifier {'cached, reused' if cached else 'trained'}: {file}; {module.name} test accuracy {accuracy}"
    )
    if cached and (record.get("epochs"), record.get("seed")) != (epochs, seed):
        print(
            f"fae: the cached file was trained with epochs {record.get('epochs')}, seed {record.get('seed')}; "
            "move it away to train again"
        )
    print("fae: FID/KID through it compare fae runs scored with this file; they are not Inception FIDs")
