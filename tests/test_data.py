"""Data modules: splits, shapes, ranges, errors for missing or corrupt files, corrupted test batches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torchvision.datasets import MNIST

from fae.data import BinaryMask, DigitsDataModule, FashionMNISTDataModule, GaussianNoise, MNISTDataModule
from fae.data.digits import load_digits
from fae.errors import UserError


def test_digits_splits_are_fixed_disjoint_and_real():
    dm = DigitsDataModule()
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 4000, "val": 500, "test": 500}
    images = load_digits()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert abs(images.float().mean().item() - 33.49) < 0.01  # the digits' mean pixel (MNIST's is 33.3)
    rows = {bytes(img.numpy()) for split in dm.splits.values() for img in split}
    assert len(rows) == 5000  # the three splits partition the 5000 distinct digits
    again = DigitsDataModule()
    again.setup()
    assert torch.equal(again.splits["test"], dm.splits["test"])


def test_batches_are_float_in_unit_range_with_indices():
    dm = DigitsDataModule(batch_size=32)
    images, index = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.uint8 and index.shape == (32,)
    assert torch.equal(images, dm.splits["train"][index])
    batch = dm.on_after_batch_transfer((images, index), 0)
    assert batch.x.dtype == torch.float32 and 0.0 <= batch.x.min() and batch.x.max() <= 1.0
    assert torch.equal(batch.x, batch.target)


class EchoInput(L.LightningModule):
    """Returns what a predict batch feeds the model, to see the data module's corruption."""

    def predict_step(self, batch, batch_idx):
        return batch.x, batch.target, batch.index


@pytest.mark.parametrize("corruption", [GaussianNoise(0.5), BinaryMask(0.8)])
def test_corrupted_test_images_do_not_depend_on_batch_size_or_workers(corruption):
    outputs = []
    for batch_size, workers in [(500, 0), (37, 0), (64, 2)]:
        dm = DigitsDataModule(eval_batch_size=batch_size, num_workers=workers, corruption=corruption)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        preds = trainer.predict(EchoInput(), datamodule=dm)
        outputs.append([torch.cat(parts) for parts in zip(*preds, strict=True)])
    x, target, index = outputs[0]
    assert torch.equal(index, torch.arange(500))
    assert not torch.equal(x, target)  # corrupted input, clean target
    assert torch.equal(x, corruption(target, index))
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other, strict=True))


def test_mnist_from_the_real_files(mnist_root):
    dm = MNISTDataModule(data_dir=str(mnist_root))
    dm.setup()
    assert {k: tuple(v.shape) for k, v in dm.splits.items()} == {
        "train": (55000, 1, 28, 28),
        "val": (5000, 1, 28, 28),
        "test": (10000, 1, 28, 28),
    }
    reference = MNIST(str(mnist_root), train=True, download=False).data
    train_and_val = torch.cat([dm.splits["train"], dm.splits["val"]]).flatten(1)
    assert torch.equal(train_and_val.sum(0), reference.flatten(1).sum(0))  # a partition of the 60k
    assert torch.equal(dm.splits["test"][:, 0], MNIST(str(mnist_root), train=False).data)


def test_missing_mnist_says_where_it_looked(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"MNIST not found: .*nowhere/MNIST/raw lacks train-images-idx3-ubyte"):
        dm.setup()


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once
    dm = MNISTDataModule(data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(UserError, match="MNIST download failed .* nothing was written"):
        dm.prepare_data()
    assert list((tmp_path / "data").iterdir()) == []


def test_corrupt_mnist_file_is_named(tmp_path, mnist_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        data = (mnist_root / "MNIST" / "raw" / name).read_bytes()
        (raw / name).write_bytes(data[: len(data) // 2] if name == "train-images-idx3-ubyte" else data)
    with pytest.raises(UserError, match="cannot read MNIST from .*corrupt"):
        MNISTDataModule(data_dir=str(tmp_path)).setup()


def fashion_root(mnist_root: Path) -> Path:
    if not (mnist_root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
        pytest.skip(f"real Fashion-MNIST not available: {mnist_root} holds no FashionMNIST/raw/")
    return mnist_root


def test_fashion_mnist_is_mnists_module_on_its_own_files(mnist_root):
    root = fashion_root(mnist_root)
    dm = FashionMNISTDataModule(data_dir=str(root))
    dm.setup()
    assert {k: tuple(v.shape) for k, v in dm.splits.items()} == {
        "train": (55000, 1, 28, 28), "val": (5000, 1, 28, 28), "test": (10000, 1, 28, 28),
    }  # fmt: skip
    images, labels = dm.read(train=True, labels=True)
    assert labels[:5].tolist() == [9, 0, 0, 3, 0] and abs(images.double().mean().item() - 72.94) < 0.01  # its README
    assert torch.equal(torch.cat([dm.splits["train"], dm.splits["val"]]).flatten(1).sum(0), images.flatten(1).sum(0))
    assert dm.feature_network == root / "fae_fashion_mnist_classifier.pt"
    with pytest.raises(UserError, match=r"Fashion-MNIST not found: .*nowhere/FashionMNIST/raw lacks train-images"):
        FashionMNISTDataModule(data_dir="nowhere").setup()
