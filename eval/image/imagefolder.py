"""ImageFolder datasets (``train/<class>/*``, ``val/<class>/*``) and the baseline transforms.

Images are decoded with :func:`dino_vos.sources.read_image` (RGB uint8, a clear error naming the
file when it cannot be read) and transformed with ``torchvision.transforms.v2``:

- evaluation: resize the short side to ``resize_size`` (bicubic), center crop ``image_size``,
  normalise with the ImageNet mean/std (docs/protocol.md#image-baselines: 256 -> 224);
- training: ``RandomResizedCrop(image_size)`` + horizontal flip, same normalisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from dino_vos.defaults import IMAGE_SIZE, RESIZE_SIZE
from dino_vos.errors import InputError, param
from dino_vos.sources import IMAGE_SUFFIXES, natural_key, read_image
from dino_vos.transforms import IMAGENET_MEAN, IMAGENET_STD

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImageFolderSplit:
    """One split of an ImageFolder: class names (shared with train) and (path, label) samples."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def fingerprint(self) -> str:
        """A hash of the file list, sizes and modification times (for feature caches)."""
        digest = hashlib.sha1()
        for path, label in self.samples:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}|{label}|{stat.st_size}|".encode())
            digest.update(f"{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


def _class_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def scan_split(root: str | Path, split: str = "train") -> tuple[list[str], dict[str, list[Path]]]:
    """Class folders of ``root`` (sorted) and their image files; errors name what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{split} folder not found: {root} (expected {split}/<class>/<images>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(
            f"no class folders in {root}: an ImageFolder needs one subfolder per class "
            f"({split}/<class>/<images>)"
        )
    images = {}
    for name in classes:
        files = _class_images(root / name)
        if not files:
            raise InputError(
                f"class '{name}' in {root} has no images ({', '.join(IMAGE_SUFFIXES)}): add images "
                "or remove the folder"
            )
        images[name] = files
    return classes, images


def load_split(
    root: str | Path, split: str = "train", classes: Sequence[str] | None = None
) -> ImageFolderSplit:
    """Read one split; ``classes`` (the train classes) fixes the label of each class name."""
    root = Path(root)
    found, images = scan_split(root, split)
    reference = list(classes) if classes is not None else found
    index = {name: i for i, name in enumerate(reference)}
    missing = [name for name in found if name not in index]
    if missing:
        raise InputError(
            f"class '{missing[0]}' of the {split} folder {root} is missing from train "
            f"({len(missing)} such class{'es' * (len(missing) > 1)}): every {split} class needs "
            "training images"
        )
    samples = tuple((path, index[name]) for name in found for path in images[name])
    return ImageFolderSplit(root, tuple(reference), samples)


def load_imagefolder(
    train: str | Path, val: str | Path
) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """Train and val splits with one class index; val may hold a subset of the train classes."""
    train_split = load_split(train, "train")
    if len(train_split.classes) < 2:
        raise InputError(
            f"train folder {train} has only {len(train_split.classes)} class: a classifier needs "
            "at least 2 class folders"
        )
    return train_split, load_split(val, "val", train_split.classes)


def check_sizes(image_size: int, resize_size: int | None) -> int:
    """The resize size for ``image_size`` (default keeps the reference 256/224 ratio)."""
    if image_size < 8:
        raise InputError(
            f"{param('image_size', image_size)} is too small: use at least 8 pixels"
        )
    if resize_size is None:
        return round(image_size * RESIZE_SIZE / IMAGE_SIZE)
    if resize_size < image_size:
        raise InputError(
            f"{param('resize_size', resize_size)} is smaller than "
            f"{param('image_size', image_size)}: the center crop must fit inside the resized image"
        )
    return resize_size


def _normalise() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(image_size: int = IMAGE_SIZE, resize_size: int | None = None) -> v2.Compose:
    """Resize short side (bicubic) + center crop + ImageNet normalisation, on uint8 (3,H,W)."""
    resize_size = check_sizes(image_size, resize_size)
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_normalise(),
        ]
    )


def train_transform(image_size: int = IMAGE_SIZE) -> v2.Compose:
    """RandomResizedCrop + horizontal flip + ImageNet normalisation (linear probe, transfer)."""
    check_sizes(image_size, None)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            *_normalise(),
        ]
    )


class ImageFolderDataset(Dataset):
    """(image tensor, label) pairs of a split, optionally restricted to ``indices``."""

    def __init__(
        self,
        split: ImageFolderSplit,
        transform: Transform,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.split = split
        self.transform = transform
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        path, label = self.split.samples[self.indices[item]]
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()
        return self.transform(image), label
