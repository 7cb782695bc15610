"""Your own images: a folder the tests make (nested, PNG and JPEG, grey and colour, several sizes) read by
fae.data.ImageFolderDataModule: the seeded split and a split file, the preprocessing, the one-time
conversion and its fingerprint, one-line errors, and every family training on it from its config."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from fae.data import ImageFolderDataModule
from fae.data import folder as folder_module
from fae.data.folder import find_images, load_image
from fae.errors import UserError, user_message

from .helpers import CONFIGS, QUIET

N_IMAGES = 20


def make_folder(root: Path, seed: int = 0) -> list[str]:
    """20 images in nested folders (PNG and JPEG, RGB, grey and RGBA, 40x30 to 50x50), beside a text file
    and a hidden folder that are not images; returns the images' sorted relative paths."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(N_IMAGES):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (30, 40) if i % 3 else (50, 50)
        base = rng.uniform(30, 220, 3) + np.linspace(0, 30, width)[None, :, None]
        pixels = (base + rng.normal(0, 10, (height, width, 3))).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        image = image.convert(["RGB", "L", "RGBA"][i % 3])
        name = f"{folder.relative_to(root).as_posix()}/img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"
        image.convert("RGB").save(root / name, quality=95) if name.endswith(".jpg") else image.save(root / name)
        names.append(name)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / ".hidden" / "skip.png")
    return sorted(names)


@pytest.fixture
def images(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "images"
    return root, make_folder(root)


def test_a_seeded_split_of_every_image_found_decoded_as_the_preprocessing_says(images):
    root, names = images
    assert find_images(root) == names  # recursive; the text file and the hidden folder left out
    dm = ImageFolderDataModule(data_dir=str(root), image_size=16, decode_workers=0)
    dm.setup()
    splits = dm.listing.splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "val": 2, "test": 2}
    assert sorted(sum(splits.values(), [])) == names  # a partition of the folder
    assert ImageFolderDataModule(data_dir=str(root)).listing.splits == splits  # the seed fixes it ...
    assert ImageFolderDataModule(data_dir=str(root), split_seed=1).listing.splits != splits  # ... and moves it
    assert dm.splits["train"].shape == (16, 3, 16, 16) and dm.splits["train"].dtype == torch.uint8
    for split, files in splits.items():
        for i, name in enumerate(files):  # position i of a split is its i-th image: the key of its test-time noise
            assert torch.equal(dm.splits[split][i], load_image(root / name, 3, None, 16)), (split, name)
    x = dm.to_float(dm.splits["val"])
    assert x.min() >= -1 and x.max() <= 1 and dm.image_shape == (3, 16, 16)
    # the largest centred square, resized with antialiasing, here of a 40x30 grey-made-RGB image
    name = next(n for n in names if n.endswith("img01.png"))
    raw = torch.from_numpy(np.array(Image.open(root / name).convert("RGB"))).permute(2, 0, 1)
    square = raw[:, :, 5:35]  # (3, 30, 30): the centre of 40 columns
    expected = torch.nn.functional.interpolate(square[None].float(), size=16, mode="bilinear", antialias=True)
    assert (load_image(root / name, 3, None, 16).float() - expected[0]).abs().max() <= 1  # uint8 rounding
    grey = ImageFolderDataModule(data_dir=str(root), image_size=16, channels=1, decode_workers=0)
    grey.setup()
    assert grey.splits["test"].shape == (2, 1, 16, 16)


def test_a_split_file_names_the_splits_and_leaves_the_other_images_out(images, tmp_path):
    root, names = images
    lines = [f"{names[0]} test", f"{names[1]} 1", *(f"{n} train" for n in names[2:8]), "", f"{names[8]} 2"]
    split_file = tmp_path / "split.txt"
    split_file.write_text("\n".join(lines) + "\n")
    dm = ImageFolderDataModule(data_dir=str(root), image_size=16, split_file=str(split_file), decode_workers=0)
    dm.setup()
    assert dm.listing.splits == {"train": names[2:8], "val": [names[1]], "test": [names[0], names[8]]}
    assert dm.splits["test"].shape == (2, 3, 16, 16)
    split_file.write_text(f"{names[0]} test\n{names[1]} validation\n")
    with pytest.raises(UserError, match=r"split.txt line 2 is malformed \('.*img\d+.png validation'\)"):
        ImageFolderDataModule(data_dir=str(root), split_file=str(split_file)).check_available()
    split_file.write_text(f"{names[0]} test\n{names[1]} val\n")
    with pytest.raises(UserError, match=r"assigns no image to the train split"):
        ImageFolderDataModule(data_dir=str(root), split_file=str(split_file)).check_available()
    split_file.write_text(f"{names[0]} test\n{names[1]} val\nmissing/x.png train\n")
    with pytest.raises(UserError, match=r"lacks 1 of the images the split file .* names, e.g. .*missing/x.png; resto"):
        ImageFolderDataModule(data_dir=str(root), split_file=str(split_file)).check_available()


def test_each_split_is_decoded_once_and_a_changed_image_builds_new_arrays(images, monkeypatch):
    root, names = images
    first = ImageFolderDataModule(data_dir=str(root), image_size=16, decode_workers=0)
    first.setup()
    cache = root / "fae-cache"
    assert sorted(p.name.split("-")[1] for p in cache.glob("*.npy")) == ["test", "train", "val"]

    def no_decoding(*args):
        raise AssertionError("a cached split was decoded again")

    monkeypatch.setattr(folder_module, "load_image", no_decoding)
    again = ImageFolderDataModule(data_dir=str(root), image_size=16, decode_workers=0)
    again.setup()
    assert all(torch.equal(again.splits[s], first.splits[s]) for s in first.splits)
    assert find_images(root) == names  # the cache inside the folder is not taken for images
    monkeypatch.undo()
    changed = root / first.listing.splits["train"][0]
    Image.fromarray(np.full((30, 30, 3), 255, np.uint8)).save(changed, format="PNG")  # the same name, other pixels
    edited = ImageFolderDataModule(data_dir=str(root), image_size=16, decode_workers=0)
    edited.setup()
    assert edited.listing.fingerprint != first.listing.fingerprint and len(list(cache.glob("*.npy"))) == 6
    assert (edited.splits["train"][0] == 255).all() and not (first.splits["train"][0] == 255).all()


def test_bad_folders_and_unreadable_images_are_one_line_and_nothing_is_half_written(images, tmp_path):
    root, names = images
    with pytest.raises(UserError, match=r"the image folder .*nowhere does not exist: pass the folder"):
        ImageFolderDataModule(data_dir=str(tmp_path / "nowhere")).check_available()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match=r"empty holds 0 images \(.jpg, .jpeg, .png, .webp, .gif, searched recursive"):
        ImageFolderDataModule(data_dir=str(tmp_path / "empty")).check_available()
    for bad_args, message in [
        ({"channels": 4}, "channels must be 3 .RGB. or 1 .grey., got 4"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "must each lie in .0, 1. and sum below 1"),
    ]:
        with pytest.raises(UserError, match=message):
            ImageFolderDataModule(data_dir=str(root), **bad_args)
    bad = root / names[5]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    dm = ImageFolderDataModule(data_dir=str(root), image_size=16, decode_workers=2)  # the error crosses a worker
    with pytest.raises(UserError) as raised:
        dm.setup()
    message = user_message(raised.value)
    assert message.startswith(f"cannot read image {bad} (") and "\n" not in message
    assert message.endswith("it is missing or corrupt; replace it or move it out of the folder")
    assert not [p for p in (root / "fae-cache").iterdir() if p.suffix == ".npy" or ".partial-" in p.name]
    bad.unlink()
    small = ImageFolderDataModule(data_dir=str(root), image_size=16, crop=45, decode_workers=0)
    with pytest.raises(UserError, match=r"is 40x30, smaller than the crop 45: lower --data.crop"):
        small.setup()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vae", "fisher", "wae_gan"])
def test_every_family_trains_on_a_folder_from_its_config_and_tests(images, tmp_path, family, fae_here):
    root, _ = images
    small = ["--data.data_dir", str(root), "--data.image_size", "16", "--data.batch_size", "4",
             "--data.decode_workers", "0", "--model.width", "4", "--model.latent_dim", "4",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    config = ["--config", str(CONFIGS / f"folder_{family}.yaml")]
    fit = fae_here("fit", *config, *small, "--trainer.max_epochs", "2", "--run_dir", "runs/f", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = torch.load(tmp_path / "runs" / "f" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 * 4  # 16 training images, batches of 4, 2 epochs
    if family != "fisher":
        return  # the sweep's path is the same for every family (tests/test_sweep.py); one runs it on a folder
    sweep = ["--sweep.sigmas", "[0.5]", "--sweep.nus", "[0.5]", "--sweep.grid_images", "2"]
    last = str(tmp_path / "runs" / "f" / "checkpoints" / "last.ckpt")
    test = fae_here("test", *config, *small, *sweep, "--ckpt_path", last, "--run_dir", "runs/t", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-2000:]
    (test_dir,) = (tmp_path / "runs" / "t").glob("test-*")
    rows = json.loads((test_dir / "robustness.json").read_text())
    assert [(r["kind"], r["metric"], r["n"]) for r in rows][:2] == [("gaussian", "mse", 2), ("mask", "mse", 2)]
    assert all(np.isfinite(r["mean"]) for r in rows)


def test_grey_images_train_the_celeba_nets_with_one_channel(images):
    root, _ = images
    from fae.models import VAE
    from fae.nets import CelebADecoder, CelebAEncoder

    dm = ImageFolderDataModule(data_dir=str(root), image_size=16, channels=1, batch_size=4, decode_workers=0)
    nets = dict(encoder=CelebAEncoder, decoder=CelebADecoder, latent_dim=4, width=4, image_shape=dm.image_shape)
    model = VAE(**nets, likelihood="gaussian", learn_decoder_scale=True, recon_metric="mse", grid_images=0)
    L.seed_everything(0)
    L.Trainer(max_steps=3, **QUIET).fit(model, datamodule=dm)
    assert model.global_step == 3
    assert model.eval().reconstruct(dm.to_float(dm.splits["val"])).shape == (2, 1, 16, 16)
