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

It is fae.data.ImageFolderDataModule (fae/data/folder.py: the uint8 arrays decoded once and memory-mapped,
their fingerprinted names, the one-time conversion on one process per node) with CelebA's official split
and its 140 crop. The arrays' fingerprint is of the images folder (path and modification time, not of
each of the 202,599 files), the partition file's contents and the preprocessing.
Sample indices (the key of the test-time noise) are positions in the partition file's order.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

from torch import Tensor

from fae.data.folder import ImageFolderDataModule, Listing, load_image
from fae.data.noise import Corruption
from fae.errors import UserError

IMAGES = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
CACHE_FORMAT = "v1"  # bump when the preprocessing changes, so that old arrays are not reused
HOW_TO_GET = (
    "download 'Align&Cropped Images' (img_align_celeba.zip) and Eval/list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive or Baidu links there), unzip them into one "
    "folder and pass it as --data.data_dir"
)


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
    return load_image(path, 3, crop, size, "CelebA image", f"restore it from {IMAGES}.zip")


class CelebADataModule(ImageFolderDataModule):
    """CelebA faces, (3, image_size, image_size) in [-1, 1], the official split; see the module docstring."""

    name = "CelebA"
    image_label = "CelebA image"

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
        super().__init__(
            data_dir, image_size, crop, 3, cache_dir=cache_dir, decode_workers=decode_workers, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, corruption=corruption,
        )  # fmt: skip

    @cached_property
    def listing(self) -> Listing:
        """The images folder, the official split lists and the arrays' fingerprint (module docstring)."""
        root = find_root(self.data_dir)
        text = (root / PARTITION).read_text()
        images = (root / IMAGES).resolve()
        key = f"{CACHE_FORMAT}|{images}|{images.stat().st_mtime_ns}|crop{self.crop}|size{self.image_size}|{text}"
        fingerprint = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
        return Listing(root / IMAGES, read_partition(text, root / PARTITION), fingerprint, PARTITION)

    def cache_path(self, split: str) -> Path:
        folder = self.cache_dir or self.listing.root.parent / "fae-cache"
        return folder / f"celeba-{split}-{self.image_size}px-crop{self.crop}-{self.listing.fingerprint}.npy"

    def unreadable_fix(self) -> str:
        return f"restore it from {IMAGES}.zip"

    def missing_fix(self) -> str:
        return f"restore them from {IMAGES}.zip"
