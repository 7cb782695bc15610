"""CelebA (Liu et al. 2015) from its official files: aligned faces, centre-cropped, 64x64, in [-1, 1].

DATA_DIR (or DATA_DIR/celeba, torchvision's layout) holds the official release:
    img_align_celeba/000001.jpg ...   202,599 aligned faces, 178 x 218 JPEG
    list_eval_partition.txt           "000001.jpg 0" per image: 0 train, 1 validation, 2 test
                                      (162,770 / 19,867 / 19,962)
torchvision.datasets.CelebA is not used: it insists on md5 sums of annotation files fae does not need.

Preprocessing, the WAE paper's CelebA pipeline ("closecrop"; the Fisher AE paper does not state its
own): centre crop `crop` x `crop` (140), resize to `image_size` (64) with antialiasing,
then x = u / 127.5 - 1 for the uint8 pixel u, the [-1, 1] range of the decoder's Tanh. Test-time
corruptions act on that scale: Gaussian noise adds sigma N(0, 1) to values in [-1, 1], and a masked
pixel is set to 0, mid-grey.

Decoding JPEGs costs far more per batch than reading a memory-mapped uint8 array
(benchmarks/celeba_loading.py measures the ratio), about as much as a GPU training step of these nets,
so decoding every epoch would leave a GPU waiting. Each split is therefore decoded ONCE into a uint8
array (N, 3, S, S), saved as .npy in `cache_dir` (N x 3 x S x S bytes: 2.5 GB for all of CelebA at
64x64), which every later epoch and run memory-maps. The conversion
runs in `prepare_data`, on one process per node (nodes sharing a filesystem each build the same file:
wasted work, not a race), with `decode_workers` decoding processes; it writes a temporary file
(`*.partial-*`) that is renamed only when complete. The file's name carries a fingerprint of the
images folder, the partition file and the preprocessing, so changing any of them builds a new array
instead of reading a stale one.
Sample indices (the key of the test-time noise) are positions in the partition file's order.
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

IMAGES = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
CACHE_FORMAT = "v1"  # bump when the preprocessing changes, so that old arrays are not reused
HOW_TO_GET = (
    "download 'Align&Cropped Images' (img_align_celeba.zip) and Eval/list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive or Baidu links there), unzip them into one "
    "folder and pass it as --data.data_dir"
)


class Partition(NamedTuple):
    root: Path  # the folder holding img_align_celeba/ and list_eval_partition.txt
    splits: dict[str, list[str]]  # {"train", "val", "test"}: image file names in the partition file's order
    fingerprint: str  # names the arrays decoded from these files with this preprocessing


def find_root(data_dir: Path) -> Path:
    """The folder holding img_align_celeba/ and list_eval_partition.txt: data_dir or data_dir/celeba."""
    for root in (data_dir, data_dir / "celeba"):
        if (root / IMAGES).is_dir() and (root / PARTITION).is_file():
            return root
    missing = [name for name in (f"{IMAGES}/", PARTITION) if not (data_dir / name.rstrip("/")).exists()]
    where = f"{data_dir} lacks {' and '.join(missing)} (also looked in {data_dir / 'celeba'})"
    raise UserError(f"CelebA not found: {where}; {HOW_TO_GET}")


def read_partition(text: str, path: Path) -> dict[str, list[str]]:
    """{"train", "val", "test"}: the image file names of each split, in the order of `text`, the
    contents of the partition file at `path`."""
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_CODES.values()}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in SPLIT_CODES:
            raise UserError(
                f"{path} line {number} is malformed ({line.strip()!r}): each line should be '<image>.jpg <0|1|2>'; "
                "replace the file with the official list_eval_partition.txt"
            )
        splits[SPLIT_CODES[fields[1]]].append(fields[0])
    empty = [name for name, files in splits.items() if not files]
    if empty:
        raise UserError(
            f"{path} assigns no image to the {', '.join(empty)} split: use the official list_eval_partition.txt"
        )
    return splits


def load_face(path: Path, crop: int, size: int) -> Tensor:
    """One CelebA image: decoded, centre-cropped to crop x crop, resized to size x size; uint8 (3, size, size)."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)  # (3, H, W)
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(
            f"cannot read CelebA image {path} ({short_reason(err)}): it is missing or corrupt; restore it from "
            f"{IMAGES}.zip"
        ) from err
    height, width = image.shape[1:]
    if min(height, width) < crop:
        raise UserError(f"CelebA image {path} is {width}x{height}, smaller than the crop {crop}: lower --data.crop")
    return TF.resize(TF.center_crop(image, [crop, crop]), [size, size], antialias=True)


class JPEGFaces(Dataset):
    """The given image files through `load_face`, served as (image, index) like fae.data.base.IndexedImages."""

    def __init__(self, files: list[Path], crop: int, size: int) -> None:
        self.files, self.crop, self.size = files, crop, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return load_face(self.files[i], self.crop, self.size), torch.tensor(i)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images = torch.stack([load_face(self.files[i], self.crop, self.size) for i in indices])
        return images, torch.as_tensor(indices, dtype=torch.int64)


class CelebADataModule(InMemoryImageDataModule):
    """CelebA faces, (3, image_size, image_size) in [-1, 1], the official split; see the module docstring."""

    pixel_range = (-1.0, 1.0)
    recon_metric = "mse"  # the paper's CelebA error, on the [-1, 1] scale

    def __init__(
        self,
        data_dir: str = "./data",
        crop: int = 140,
        image_size: int = 64,
        cache_dir: str | None = None,
        decode_workers: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        corruption: Corruption | None = None,
    ) -> None:
        """
        Args:
            data_dir: folder holding img_align_celeba/ and list_eval_partition.txt (or celeba/ with them).
            crop: side of the centre crop taken from the 178 x 218 images (140, the WAE paper's).
            image_size: side the crop is resized to (64 in the paper).
            cache_dir: where the decoded uint8 arrays are kept (default: DATA_DIR/fae-cache); must be writable
                for the one-time conversion.
            decode_workers: processes decoding JPEGs in the one-time conversion (default: the number of
                CPUs, at most 8; 0 decodes in the main process).
        """
        super().__init__(batch_size, eval_batch_size, num_workers, corruption)
        if crop < 1 or image_size < 1:
            raise UserError(f"crop and image_size must be positive, got {crop} and {image_size}")
        self.data_dir = Path(data_dir)
        self.crop = crop
        self.image_size = image_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.decode_workers = min(8, os.cpu_count() or 1) if decode_workers is None else decode_workers

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 -> [-1, 1], the range of the decoder's Tanh."""
        return images.float() / 127.5 - 1.0

    # --- where things are ------------------------------------------------------------------------
    @cached_property
    def partition(self) -> Partition:
        """The folder, its split lists and the arrays' fingerprint: of the images folder (path and modification
        time), of the partition file's contents and of the preprocessing. Read once per data module."""
        root = find_root(self.data_dir)
        text = (root / PARTITION).read_text()
        images = (root / IMAGES).resolve()
        key = f"{CACHE_FORMAT}|{images}|{images.stat().st_mtime_ns}|crop{self.crop}|size{self.image_size}|{text}"
        fingerprint = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
        return Partition(root, read_partition(text, root / PARTITION), fingerprint)

    def cache_path(self, split: str) -> Path:
        folder = self.cache_dir or self.partition.root / "fae-cache"
        return folder / f"celeba-{split}-{self.image_size}px-crop{self.crop}-{self.partition.fingerprint}.npy"

    def open_cache(self, split: str) -> np.ndarray | None:
        """The split's memory-mapped array if it holds the expected images, else None. Copy-on-write: a
        stray write in memory never reaches the file."""
        try:
            array = np.load(self.cache_path(split), mmap_mode="c")
        except (OSError, ValueError):
            return None
        expected = (len(self.partition.splits[split]), 3, self.image_size, self.image_size)
        return array if array.shape == expected and array.dtype == np.uint8 else None

    # --- Lightning hooks -------------------------------------------------------------------------
    def check_available(self) -> None:
        """Fail now, with the fix, when CelebA is missing: the folder, its partition file or listed images."""
        root, splits, _ = self.partition
        todo = [split for split in splits if self.open_cache(split) is None]
        present = set(os.listdir(root / IMAGES)) if todo else set()
        missing = [name for split in todo for name in splits[split] if name not in present]
        if missing:
            raise UserError(
                f"CelebA in {root} lacks {len(missing)} of the images {PARTITION} names, e.g. "
                f"{root / IMAGES / missing[0]}; restore them from {IMAGES}.zip"
            )

    def prepare_data(self) -> None:
        """Decode each split into its uint8 array once (Lightning runs this on one process per node)."""
        root, splits, _ = self.partition
        for split, names in splits.items():
            if self.open_cache(split) is None:
                self.convert([root / IMAGES / name for name in names], self.cache_path(split))

    def convert(self, files: list[Path], path: Path) -> None:
        """Decode `files` into a uint8 .npy at `path`. Written in order through a file (a disk that fills up
        raises, where a memory map would fault), to a temporary name renamed when complete."""
        print(f"fae: decoding {len(files)} CelebA images once into {path} (later runs memory-map it)", flush=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.partial-")
            share_as_umask(handle)  # a shared cache's other users read it too
        except OSError as err:
            raise UserError(
                f"cannot write the CelebA arrays in {path.parent} ({err.strerror}): set --data.cache_dir "
                "to a writable folder"
            ) from err
        shape = (len(files), 3, self.image_size, self.image_size)
        loader = DataLoader(
            JPEGFaces(files, self.crop, self.image_size),
            batch_size=256,
            num_workers=self.decode_workers,
            collate_fn=collate_batch,
        )
        try:
            with os.fdopen(handle, "wb") as file:
                np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for images, _ in tqdm(loader, desc=f"CelebA -> {path.name}", unit="batch", disable=None):
                    file.write(images.numpy().tobytes())  # (256, 3, S, S), in order: the loader does not shuffle
            os.replace(tmp, path)
        except OSError as err:  # e.g. the disk filled up
            raise UserError(
                f"writing the CelebA array {path} failed ({err.strerror or err}): free space there or set "
                "--data.cache_dir to another folder"
            ) from err
        finally:
            Path(tmp).unlink(missing_ok=True)

    def load_splits(self) -> dict[str, Tensor]:
        if self.trainer is None:  # else the Trainer has called prepare_data, on one process per node
            self.prepare_data()
        arrays = {}
        for split in self.partition.splits:
            array = self.open_cache(split)
            if array is None:
                raise UserError(
                    f"the CelebA array {self.cache_path(split)} is missing or unreadable: the first process of this "
                    "node builds it, so if that failed its error says why; otherwise delete the file and run again"
                )
            arrays[split] = torch.from_numpy(array)  # (N, 3, S, S) uint8, memory-mapped
        return arrays
