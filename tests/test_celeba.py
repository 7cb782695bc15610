"""CelebA on a tiny folder in the official layout that the tests make: splits, preprocessing, the one-time
conversion, clear errors for a missing folder or a missing or corrupt JPEG, and each family on 64x64 faces."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from fae.data import BinaryMask, CelebADataModule, GaussianNoise
from fae.data import folder as folder_module
from fae.data.celeba import IMAGES, PARTITION, load_face
from fae.errors import UserError, user_message
from fae.models import VAE, WAEGAN, FisherAE
from fae.nets import CelebADecoder, CelebAEncoder, MNISTDecoder, MNISTEncoder

from .helpers import CONFIGS, QUIET, last_value, make_celeba, rows_of, run_fae

# the official codes: 0 train, 1 validation, 2 test; interleaved so that a split's order is the file's
SIZES = {"train": 12, "val": 4, "test": 5}


@pytest.fixture
def tiny_celeba(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "data"
    return root, make_celeba(root)


def test_tiny_celeba_loads_the_official_split_as_64x64_in_the_tanh_range(tiny_celeba):
    root, names = tiny_celeba
    dm = CelebADataModule(data_dir=str(root))
    dm.setup()
    assert {k: tuple(v.shape) for k, v in dm.splits.items()} == {k: (n, 3, 64, 64) for k, n in SIZES.items()}
    assert dm.image_shape == (3, 64, 64)
    for split, files in names.items():  # sample i of a split is the i-th file the partition lists for it
        for i, name in enumerate(files):
            assert torch.equal(dm.splits[split][i], load_face(root / IMAGES / name, 140, 64)), (split, name)
    torch.testing.assert_close(dm.to_float(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))
    x = dm.to_float(dm.splits["train"])
    assert x.dtype == torch.float32 and -1.0 <= x.min() < -0.6 and 0.6 < x.max() <= 1.0
    images, index = next(iter(dm.train_dataloader()))  # batches as every fae data module serves them
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(dm.splits["train"][index], images)
    found = CelebADataModule(data_dir=str(root.parent))  # torchvision's layout: DATA_DIR/celeba/...
    root.rename(root.parent / "celeba")
    found.setup()
    assert torch.equal(found.splits["test"], dm.splits["test"])


def test_preprocessing_is_a_centre_crop_resized_with_antialiasing(tmp_path):
    image = np.zeros((218, 178, 3), np.uint8)
    image[:] = (220, 20, 20)  # red outside the centre 140 x 140 crop
    image[39:179, 19:159] = (20, 20, 220)  # blue inside: rows (218 - 140) / 2 .. , columns (178 - 140) / 2 ..
    path = tmp_path / "face.jpg"
    Image.fromarray(image).save(path, quality=100)
    face = load_face(path, crop=140, size=64).float()  # (3, 64, 64)
    assert face.shape == (3, 64, 64)
    inner = face[:, 1:-1, 1:-1]  # JPEG's chroma blur reaches at most one output pixel in from the edge
    assert (inner[2] > 190).all() and (inner[0] < 50).all()  # only the blue centre
    wider = load_face(path, crop=170, size=64).float()
    assert wider[0, :, 0].mean() > 180 and wider[2, 32, 32] > 190  # a larger crop takes in the red border
    assert (load_face(path, crop=140, size=32).float()[2] > 150).all()


def test_each_split_is_decoded_once_then_memory_mapped(tiny_celeba, monkeypatch):
    root, _ = tiny_celeba
    first = CelebADataModule(data_dir=str(root))
    first.setup()
    cache = root / "fae-cache"
    arrays = sorted(cache.glob("*.npy"))
    assert [p.name.split("-")[1] for p in arrays] == ["test", "train", "val"]
    assert np.load(arrays[1], mmap_mode="r").shape == (12, 3, 64, 64)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in arrays} == {0o666 & ~umask}  # a shared cache: the umask's mode

    def no_decoding(*args):
        raise AssertionError("a cached split was decoded again")

    monkeypatch.setattr(folder_module, "load_image", no_decoding)
    again = CelebADataModule(data_dir=str(root))
    again.setup()
    for split in SIZES:
        assert torch.equal(again.splits[split], first.splits[split])
    monkeypatch.undo()
    other = CelebADataModule(data_dir=str(root), crop=120, image_size=32)  # other preprocessing: its own arrays
    other.setup()
    assert other.splits["train"].shape == (12, 3, 32, 32) and len(list(cache.glob("*.npy"))) == 6
    lines = (root / PARTITION).read_text().splitlines()
    (root / PARTITION).write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # an edited partition ...
    edited = CelebADataModule(data_dir=str(root))
    edited.setup()  # ... is a new fingerprint: new arrays, in the new order
    assert len(list(cache.glob("*.npy"))) == 9
    assert torch.equal(edited.splits["train"][[1, 0]], first.splits["train"][:2])
    # a damaged array is rebuilt, not read (cloned first: truncating a file in place under a live memory map
    # faults the process that maps it; fae itself only ever renames a complete file into place)
    expected = first.splits["train"].clone()
    del first, again, edited
    arrays[1].write_bytes(arrays[1].read_bytes()[:1000])
    (root / PARTITION).write_text("\n".join(lines) + "\n")  # the original partition: the damaged array's
    rebuilt = CelebADataModule(data_dir=str(root))
    rebuilt.setup()
    assert torch.equal(rebuilt.splits["train"], expected)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]


def test_missing_folder_says_how_to_get_celeba(tmp_path):
    dm = CelebADataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"CelebA not found: .*nowhere lacks img_align_celeba/ and list_eval_partition"):
        dm.check_available()
    (tmp_path / "half" / IMAGES).mkdir(parents=True)
    with pytest.raises(UserError, match=r"half lacks list_eval_partition.txt .*mmlab.ie.cuhk.edu.hk"):
        CelebADataModule(data_dir=str(tmp_path / "half")).setup()


def test_missing_or_corrupt_jpeg_is_named_and_nothing_is_left_half_written(tiny_celeba):
    root, names = tiny_celeba
    bad = root / IMAGES / names["train"][3]
    bad.write_bytes(bad.read_bytes()[:400])  # truncated
    dm = CelebADataModule(data_dir=str(root))
    dm.check_available()  # present: only decoding finds it broken
    with pytest.raises(UserError) as raised:
        dm.setup()
    assert user_message(raised.value).startswith(f"cannot read CelebA image {bad} (")
    assert list((root / "fae-cache").iterdir()) == []  # no array, no temporary file
    bad.unlink()
    with pytest.raises(UserError, match=rf"lacks 1 of the images list_eval_partition.txt names, e.g. {bad}"):
        dm.check_available()
    (root / PARTITION).write_text("000001.jpg 0\n000002.jpg train\n")
    with pytest.raises(UserError, match=r"list_eval_partition.txt line 2 is malformed \('000002.jpg train'\)"):
        CelebADataModule(data_dir=str(root)).check_available()


def celeba_family(family: str):
    nets = dict(encoder=CelebAEncoder, decoder=CelebADecoder, latent_dim=16, width=4, image_shape=(3, 64, 64))
    if family == "vae":
        return VAE(**nets, likelihood="gaussian", learn_decoder_scale=True, recon_metric="mse", grid_images=0)
    if family == "fisher":
        return FisherAE(
            **nets, learn_decoder_scale=True, prior="polynomial", prior_degree=4, recon_metric="mse", grid_images=0
        )
    return WAEGAN(**nets, penalty_weight=1.0, prior_std=2**0.5, recon_metric="mse", grid_images=0)


@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_each_family_trains_a_few_steps_on_64x64_faces(tiny_celeba, family):
    root, _ = tiny_celeba
    L.seed_everything(0)
    model = celeba_family(family)
    dm = CelebADataModule(data_dir=str(root), batch_size=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    L.Trainer(max_epochs=2, **QUIET).fit(model, datamodule=dm)
    assert model.global_step == 2 * 3  # 12 faces, batches of 4, 2 epochs: a step is a batch in every family
    assert not torch.equal(model.state_dict()["decoder.layers.1.weight"], before["decoder.layers.1.weight"])
    metrics = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    assert all(np.isfinite(v) for v in metrics.values())
    x = dm.to_float(dm.splits["val"])  # (4, 3, 64, 64) in [-1, 1]
    recon = model.eval().reconstruct(x)
    assert recon.shape == (4, 3, 64, 64)
    # the logged error is the MSE of decoder(encoder mean) against the image, on the [-1, 1] scale
    assert abs(metrics["val/recon_mse"] - (recon - x).pow(2).mean().item()) < 1e-6


def test_nets_of_another_data_set_are_refused_before_training(tiny_celeba):
    root, _ = tiny_celeba
    model = VAE(MNISTEncoder, MNISTDecoder, latent_dim=8, width=4, likelihood="gaussian", grid_images=0)
    built_for = r"the data's images are \(3, 64, 64\) but the model was built for \(1, 28, 28\)"
    with pytest.raises(UserError, match=built_for):
        L.Trainer(max_steps=1, **QUIET).fit(model, datamodule=CelebADataModule(data_dir=str(root)))


@pytest.mark.slow
def test_cli_fit_and_robustness_sweep_with_mse_on_the_tanh_scale(tiny_celeba, tmp_path, fae_here):
    root, _ = tiny_celeba
    small = ["--data.init_args.data_dir", str(root), "--data.init_args.batch_size", "4", "--data.init_args.num_workers",
             "0", "--model.width", "4",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    config = ["--config", str(CONFIGS / "celeba_vae.yaml")]
    fit = fae_here("fit", *config, *small, "--trainer.max_epochs", "1", "--run_dir", "runs/v", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = str(tmp_path / "runs" / "v" / "checkpoints" / "last.ckpt")
    sweep = ["--sweep.sigmas", "[0.1, 1.0]", "--sweep.nus", "[0.5]", "--sweep.grid_images", "4"]
    test = fae_here("test", *config, *small, *sweep, "--ckpt_path", ckpt, "--run_dir", "runs/t", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    (test_dir,) = (tmp_path / "runs" / "t").glob("test-*")  # an evaluation gets its own folder
    rows = json.loads((test_dir / "robustness.json").read_text())
    assert [(r["kind"], r["level"], r["metric"], r["n"]) for r in rows] == [
        ("gaussian", 0.1, "mse", 5),
        ("gaussian", 1.0, "mse", 5),
        ("mask", 0.5, "mse", 5),
        ("mean_image", 0.0, "mse", 5),
    ]
    model = VAE.load_from_checkpoint(ckpt, map_location="cpu").eval()  # the rows, recomputed directly
    dm = CelebADataModule(data_dir=str(root))
    dm.setup()
    clean, index = dm.to_float(dm.splits["test"]), torch.arange(5)  # (5, 3, 64, 64) in [-1, 1]
    for row, corruption in zip(rows, [GaussianNoise(0.1), GaussianNoise(1.0), BinaryMask(0.5)], strict=False):
        errors = (model.reconstruct(corruption(clean, index)) - clean).pow(2).flatten(1).mean(1).double()
        assert abs(row["mean"] - errors.mean().item()) < 1e-6 and abs(row["std"] - errors.std().item()) < 1e-6
    mean_image = dm.to_float(dm.splits["train"]).double().mean(0)  # the reference: on the tanh scale too
    assert abs(rows[-1]["mean"] - (mean_image - clean.double()).pow(2).flatten(1).mean(1).mean().item()) < 1e-6
    assert (test_dir / "reconstructions_mask_0.8.png").read_bytes()[:4] == b"\x89PNG"
    bad = root / IMAGES / "000001.jpg"
    bad.write_bytes(b"not a jpeg")
    for array in (root / "fae-cache").glob("*.npy"):
        array.unlink()
    broken = fae_here("fit", *config, *small, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith(f"fae: error: cannot read CelebA image {bad} (")


@pytest.mark.multiprocess
def test_ddp_converts_once_and_both_processes_train_from_the_memory_map(tiny_celeba, tmp_path):
    root, _ = tiny_celeba
    out = run_fae("fit", "--config", str(CONFIGS / "celeba_fisher.yaml"), "--data.init_args.data_dir", str(root),
                  "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                  "--model.width", "4",
                  "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                  "--run_dir", "runs/ddp", cwd=tmp_path, timeout=400)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert log.count("fae: decoding 12 CelebA images once") == 1  # the first process converted, the other waited
    assert sorted(p.name.split("-")[1] for p in (root / "fae-cache").iterdir()) == ["test", "train", "val"]
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12 // 2 // 2  # 12 training faces, 2 per batch, split between 2 processes
    # the Fisher AE's objective (a double backward) under DDP: one optimizer, a finite validation
    assert len(ckpt["optimizer_states"]) == 1
    rows = rows_of(tmp_path / "runs" / "ddp" / "metrics.csv")
    assert math.isfinite(last_value(rows, "val/loss")) and 0 < last_value(rows, "val/recon_mse") < 2
