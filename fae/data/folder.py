"""Any folder of images as a data set: found recursively, split, decoded once into memory-mapped uint8 arrays.

DATA_DIR holds images in any tree of folders: JPEG, PNG, WebP or GIF (what torchvision.io.decode_image
reads; other files are left out). Each is read as RGB (`channels` 3) or grey (1), centre-cropped to a
`crop` x `crop` square (default: the largest centred square) and resized to `image_size` with
antialiasing, then x = u / 127.5 - 1 for the uint8 pixel u: the [-1, 1] range of the decoder's Tanh, the
CelebA nets' (fae.nets.CelebAEncoder/Decoder take (C, S, S) images, S a multiple of 16). Test-time
corruptions act on that scale, as on CelebA: Gaussian noise adds sigma N(0, 1), a masked pixel is 0.

The split: a `split_file` of lines "<path relative to DATA_DIR> <train|val|test>" (0, 1, 2 also name
them, as in CelebA's list_eval_partition.txt; the images it does not name are left out), or else a
seeded split of every image found: the sorted paths permuted by `split_seed`, the first
`test_fraction` of them test, the next `val_fraction` validation, the rest training. Sample indices
(the key of the test-time noise) are positions in the split's order.

Decoding an image costs far more than reading it from a memory-mapped uint8 array (the CelebA module
measured it, benchmarks/celeba_loading.py), so each split is decoded ONCE into a uint8 array
(N, C, S, S), saved as .npy in `cache_dir` (default DATA_DIR/fae-cache), which every later epoch and
run memory-maps. The conversion runs in `prepare_data`, on one process per node, with
`decode_workers` processes; it writes a temporary file (`*.partial-*`) renamed only when complete. The
file's name carries a fingerprint of the split (each image's path, size and modification time) and of
the preprocessing, so adding, changing or removing an image, or another crop, builds a new array
instead of reading a stale one. torchvision's ImageFolder is not used: it decodes through PIL per
sample, every epoch, and wants a class per subfolder; no library keeps such a cache.

fae.data.CelebADataModule is this module with CelebA's official split and a 140 crop.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from fae.data.base import InMemoryImageDataModule, collate_batch
from fae.data.noise import Corruption
from fae.errors import UserError, short_reason
from fae.files import share_as_umask

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io.decode_image reads
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "test": "test", "0": "train", "1": "val", "2": "test"}
CACHE = "fae-cache"
CACHE_FORMAT = "v1"  # bump when the preprocessing changes, so that old arrays are not reused


class Listing(NamedTuple):
    root: Path  # the folder the image names are relative to
    splits: dict[str, list[str]]  # {"train", "val", "test"}: image paths relative to root, in the split's order
    fingerprint: str  # names the arrays decoded from these files with this preprocessing
    source: str  # what names the images, for messages: "the split file X", "the images found in X"


def load_image(
    path: Path, channels: int, crop: int | None, size: int, label: str = "image", fix: str = "replace it"
) -> Tensor:
    """One image: decoded as RGB (channels 3) or grey (1), centre-cropped to crop x crop (None: the largest
    centred square), resized to size x size with antialiasing; uint8 (channels, size, size). `label` names
    it in messages ("CelebA image") and `fix` ends the message when the file cannot be read."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(f"cannot read {label} {path} ({short_reason(err)}): it is missing or corrupt; {fix}") from err
    if image.dim() == 4:  # an animated GIF: its first frame
        image = image[0]
    height, width = image.shape[1:]
    side = crop or min(height, width)
    if min(height, width) < side:
        raise UserError(f"{label} {path} is {width}x{height}, smaller than the crop {side}: lower --data.crop")
    return TF.resize(TF.center_crop(image, [side, side]), [size, size], antialias=True)


class ImageFiles(Dataset):
    """The given image files through `load_image`, served as (image, index) like fae.data.base.IndexedImages."""

    def __init__(self, files: list[Path], *args) -> None:
        self.files, self.args = files, args  # load_image's arguments after the path

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return load_image(self.files[i], *self.args), torch.tensor(i)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images = torch.stack([load_image(self.files[i], *self.args) for i in indices])
        return images, torch.as_tensor(indices, dtype=torch.int64)


def find_images(root: Path) -> list[str]:
    """The images under `root`, recursively (hidden folders and the cache left out): sorted relative paths."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != CACHE)
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.lower().endswith(SUFFIXES)]
    return sorted(Path(name).as_posix() for name in found)


def read_split_file(text: str, path: Path) -> dict[str, list[str]]:
    """{"train", "val", "test"}: the image paths of each split, in the order of `text` (the file at `path`)."""
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.rsplit(maxsplit=1)
        if not line.strip():
            continue
        if len(fields) != 2 or fields[1] not in SPLIT_NAMES:
            raise UserError(
                f"{path} line {number} is malformed ({line.strip()!r}): each line should be '<image path> "
                "<train|val|test>' (or 0, 1, 2 for them)"
            )
        splits[SPLIT_NAMES[fields[1]]].append(fields[0])
    return splits


def seeded_split(names: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """The sorted `names` permuted by `seed`: the first test_fraction test, the next val_fraction
    validation (each at least one image), the rest training."""
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = (max(1, round(fraction * len(names))) for fraction in (test_fraction, val_fraction))
    picked = [names[i] for i in order]
    return {"test": picked[:n_test], "val": picked[n_test : n_test + n_val], "train": picked[n_test + n_val :]}


class ImageFolderDataModule(InMemoryImageDataModule):
    """A folder of images, (channels, image_size, image_size) in [-1, 1]; see the module docstring."""

    pixel_range = (-1.0, 1.0)
    recon_metric = "mse"  # as on CelebA: the squared error on the [-1, 1] scale
    name = "image folder"  # of the data set, in messages
    image_label = "image"  # of one of its images, in messages

    def __init__(
        self,
        data_dir: str = "./images",
        image_size: int = 64,
        crop: int | None = None,
        channels: int = 3,
        split_file: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        cache_dir: str | None = None,
        decode_workers: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        corruption: Corruption | None = None,
    ) -> None:
        """
        Args:
            data_dir: the folder of images (searched recursively).
            image_size: side S the crop is resized to (a multiple of 16 for the CelebA nets).
            crop: side of the centre crop (default: the largest centred square of each image).
            channels: 3 reads every image as RGB, 1 as grey.
            split_file: lines '<image path relative to data_dir> <train|val|test>' (default: a seeded split).
            val_fraction: of the images, the validation split's share in a seeded split.
            test_fraction: of the images, the test split's share in a seeded split.
            split_seed: the seeded split's permutation (not the training seed: the split stays put across seeds).
            cache_dir: where the decoded uint8 arrays are kept (default: DATA_DIR/fae-cache); must be writable
                for the one-time conversion.
            decode_workers: processes decoding images in the one-time conversion (default: the number of
                CPUs, at most 8; 0 decodes in the main process).
        """
        super().__init__(batch_size, eval_batch_size, num_workers, corruption)
        if (crop is not None and crop < 1) or image_size < 1:
            raise UserError(f"crop and image_size must be positive, got {crop} and {image_size}")
        if channels not in (1, 3):
            raise UserError(f"channels must be 3 (RGB) or 1 (grey), got {channels}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(
                f"val_fraction and test_fraction must each lie in (0, 1) and sum below 1, got {val_fraction} and "
                f"{test_fraction}"
            )
        self.data_dir = Path(data_dir)
        self.image_size, self.crop, self.channels = image_size, crop, channels
        self.split_file = Path(split_file) if split_file else None
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.decode_workers = min(8, os.cpu_count() or 1) if decode_workers is None else decode_workers

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 -> [-1, 1], the range of the decoder's Tanh."""
        return images.float() / 127.5 - 1.0

    # --- where things are ------------------------------------------------------------------------
    @cached_property
    def listing(self) -> Listing:
        """The folder, its splits and the arrays' fingerprint. Read once per data module."""
        root = self.data_dir
        if not root.is_dir():
            raise UserError(f"the image folder {root} does not exist: pass the folder of images as --data.data_dir")
        if self.split_file is not None:
            try:
                text = self.split_file.read_text()
            except (OSError, UnicodeDecodeError) as err:
                raise UserError(f"cannot read the split file {self.split_file} ({short_reason(err)})") from err
            splits, source = read_split_file(text, self.split_file), f"the split file {self.split_file}"
        else:
            names = find_images(root)
            if len(names) < 3:
                raise UserError(
                    f"{root} holds {len(names)} images ({', '.join(SUFFIXES)}, searched recursively), fewer than "
                    "the 3 a train, validation and test split need: pass a folder of images as --data.data_dir"
                )
            splits = seeded_split(names, self.val_fraction, self.test_fraction, self.split_seed)
            source = f"the images found in {root}"
        empty = [name for name in SPLITS if not splits[name]]
        if empty:
            raise UserError(f"{source} assigns no image to the {', '.join(empty)} split: give each split one or more")
        stamps = [self.stamp(root / name) for split in SPLITS for name in splits[split]]
        key = f"{CACHE_FORMAT}|{root.resolve()}|{self.preprocessing}|{splits}|{stamps}"
        return Listing(root, splits, hashlib.blake2b(key.encode(), digest_size=6).hexdigest(), source)

    @property
    def preprocessing(self) -> str:
        return f"{self.channels}x{self.image_size}px-crop{self.crop or 'square'}"

    @staticmethod
    def stamp(path: Path) -> tuple[int, int] | None:
        """An image's size and modification time (None when it is missing: `check_available` says so)."""
        try:
            facts = path.stat()
        except OSError:
            return None
        return facts.st_size, facts.st_mtime_ns

    def unreadable_fix(self) -> str:
        """How to mend an image that cannot be read, for the message that names it."""
        if self.split_file is not None:
            return f"replace it or remove its line from {self.split_file}"
        return "replace it or move it out of the folder"

    def cache_path(self, split: str) -> Path:
        folder = self.cache_dir or self.listing.root / CACHE
        return folder / f"images-{split}-{self.preprocessing}-{self.listing.fingerprint}.npy"

    def open_cache(self, split: str) -> np.ndarray | None:
        """The split's memory-mapped array if it holds the expected images, else None. Copy-on-write: a
        stray write in memory never reaches the file."""
        try:
            array = np.load(self.cache_path(split), mmap_mode="c")
        except (OSError, ValueError):
            return None
        expected = (len(self.listing.splits[split]), *self.image_shape)
        return array if array.shape == expected and array.dtype == np.uint8 else None

    # --- Lightning hooks -------------------------------------------------------------------------
    def check_available(self) -> None:
        """Fail now, with the fix, when images the split names are missing."""
        root, splits, _, source = self.listing
        todo = [split for split in splits if self.open_cache(split) is None]
        missing = [name for split in todo for name in splits[split] if not (root / name).is_file()]
        if missing:
            raise UserError(
                f"{self.name} in {root} lacks {len(missing)} of the images {source} names, e.g. "
                f"{root / missing[0]}; {self.missing_fix()}"
            )

    def missing_fix(self) -> str:
        return "restore them, or remove their lines from the split file"

    def prepare_data(self) -> None:
        """Decode each split into its uint8 array once (Lightning runs this on one process per node)."""
        root, splits, _, _ = self.listing
        for split, names in splits.items():
            if self.open_cache(split) is None:
                self.convert([root / name for name in names], self.cache_path(split))

    def convert(self, files: list[Path], path: Path) -> None:
        """Decode `files` into a uint8 .npy at `path`. Written in order through a file (a disk that fills up
        raises, where a memory map would fault), to a temporary name renamed when complete."""
        print(f"fae: decoding {len(files)} {self.name} images once into {path} (later runs memory-map it)", flush=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.partial-")
            share_as_umask(handle)  # a shared cache's other users read it too
        except OSError as err:
            raise UserError(
                f"cannot write the {self.name} arrays in {path.parent} ({err.strerror}): set --data.cache_dir "
                "to a writable folder"
            ) from err
        shape = (len(files), *self.image_shape)
        images = ImageFiles(files, self.channels, self.crop, self.image_size, self.image_label, self.unreadable_fix())
        loader = DataLoader(images, batch_size=256, num_workers=self.decode_workers, collate_fn=collate_batch)
        try:
            with os.fdopen(handle, "wb") as file:
                np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for batch, _ in tqdm(loader, desc=f"{self.name} -> {path.name}", unit="batch", disable=None):
                    file.write(batch.numpy().tobytes())  # (256, C, S, S), in order: the loader does not shuffle
            os.replace(tmp, path)
        except OSError as err:  # e.g. the disk filled up
            raise UserError(
                f"writing the {self.name} array {path} failed ({err.strerror or err}): free space there or set "
                "--data.cache_dir to another folder"
            ) from err
        finally:
            Path(tmp).unlink(missing_ok=True)

    def load_splits(self) -> dict[str, Tensor]:
        if self.trainer is None:  # else the Trainer has called prepare_data, on one process per node
            self.prepare_data()
        arrays = {}
        for split in self.listing.splits:
            array = self.open_cache(split)
            if array is None:
                raise UserError(
                    f"the {self.name} array {self.cache_path(split)} is missing or unreadable: the first process of "
                    "this node builds it, so if that failed its error says why; otherwise delete the file and run again"
                )
            arrays[split] = torch.from_numpy(array)  # (N, C, S, S) uint8, memory-mapped
        return arrays
