"""Label masks: reading DAVIS-style annotations, object-id bookkeeping, indexed PNG output."""

from __future__ import annotations

import difflib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from dino_vos.atomic import atomic_write_bytes
from dino_vos.errors import InputError

if TYPE_CHECKING:
    import torch

    from dino_vos.sources import FrameSource

VOID_LABEL = 255


@lru_cache(maxsize=1)
def davis_palette() -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map: 256 RGB entries built from the index bits."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


#: Image formats whose compression changes pixel values (and so object ids).
LOSSY_FORMATS = frozenset({"JPEG", "MPO"})


def read_mask(path: str | Path) -> np.ndarray:
    """Read an annotation PNG as (H, W) uint8 object ids (0 background, 255 void).

    Accepts indexed (palette) PNGs (DAVIS 2017: the indices are the ids), grayscale 0/255 PNGs
    (DAVIS 2016: 255 is the single object, id 1) and any single-channel PNG of integer labels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mask not found: {path} (give the first frame's annotation PNG)")
    try:
        with Image.open(path) as image:
            image.load()
            mode, file_format = image.mode, image.format
            array = np.array(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read mask {path}: the file is corrupt or not an image") from exc
    if file_format in LOSSY_FORMATS:
        raise InputError(
            f"mask {path} is a {file_format} image: lossy compression invents object ids along "
            "every edge; save the annotation as a PNG of object ids"
        )
    if mode in ("RGB", "RGBA"):
        rgb = array[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
        ):
            raise InputError(
                f"mask {path} is a colour image: save it as an indexed (palette) or grayscale PNG "
                "of object ids"
            )
        array, mode = rgb[..., 0], "L"
    if array.ndim != 2:
        raise InputError(f"mask {path} must be single-channel, got shape {array.shape}")
    if mode == "1":
        return array.astype(np.uint8)
    if mode != "P" and set(_present_values(array)) <= {0, 255}:
        return (array == 255).astype(np.uint8)  # DAVIS 2016 style 0/255 mask
    if array.max() > VOID_LABEL or array.min() < 0:
        raise InputError(f"mask {path} has labels outside 0..255: store object ids 1..254")
    return array.astype(np.uint8)


def _present_values(array: np.ndarray) -> list[int]:
    """The distinct values of a label image (a histogram for uint8, faster than np.unique)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256)).tolist()
    return np.unique(array).tolist()


@dataclass(frozen=True)
class ObjectIds:
    """The object ids of a first-frame mask; channel 0 is background, channel i is ids[i]."""

    ids: tuple[int, ...]

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> ObjectIds:
        present = sorted(int(v) for v in np.unique(mask) if v not in (0, VOID_LABEL))
        return cls((0, *present))

    @property
    def num_channels(self) -> int:
        return len(self.ids)

    def to_channels(self, mask: np.ndarray) -> np.ndarray:
        """Map ids to channel indices; void (and unknown ids) become -1."""
        lookup = np.full(256, -1, dtype=np.int64)
        lookup[list(self.ids)] = np.arange(len(self.ids))
        return lookup[mask.astype(np.uint8)]

    def to_ids(self, channels: np.ndarray) -> np.ndarray:
        """Map channel indices back to object ids (uint8)."""
        return np.asarray(self.ids, dtype=np.uint8)[channels]

    def one_hot(self, mask: np.ndarray) -> torch.Tensor:
        """(C, H, W) float one-hot label map; void pixels get an all-zero vector."""
        import torch  # here only: reading and checking masks needs no torch

        channels = torch.from_numpy(self.to_channels(mask))
        onehot = torch.zeros(self.num_channels, *channels.shape, dtype=torch.float32)
        valid = channels >= 0
        onehot[:, valid] = torch.nn.functional.one_hot(channels[valid], self.num_channels).T.float()
        return onehot


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label image, as PIL does it (the reference uses PIL)."""
    if labels.shape == tuple(size_hw):
        return labels
    image = Image.fromarray(labels.astype(np.uint8))
    return np.array(image.resize((size_hw[1], size_hw[0]), Image.Resampling.NEAREST))


def downsample_labels(labels: np.ndarray, size_hw: tuple[int, int], mode: str) -> np.ndarray:
    """A label image at ``size_hw``, resized as a protocol says (docs/protocol.md#protocols):
    ``pil-nearest`` (:func:`resize_labels`, the DINO reference) or ``nearest-exact`` (torch's
    ``F.interpolate(mode="nearest-exact")`` of the float mask, the DINOv3 notebook)."""
    if mode == "pil-nearest":
        return resize_labels(labels, size_hw)
    if mode != "nearest-exact":
        raise ValueError(f"unknown mask downsampling {mode!r}")
    import torch  # here only: reading and checking masks needs no torch

    mask = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)).float()[None, None]
    small = torch.nn.functional.interpolate(mask, tuple(size_hw), mode="nearest-exact")
    return small[0, 0].to(torch.uint8).numpy()


def encode_indexed_png(labels: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) uint8 label image with the DAVIS palette."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_indexed_png(path: str | Path, labels: np.ndarray) -> None:
    """Atomically write an indexed PNG (DAVIS palette) whose pixel values are the labels."""
    atomic_write_bytes(path, encode_indexed_png(labels))


def check_mask_size(mask: np.ndarray, source: FrameSource, frame_index: int = 0) -> None:
    """Refuse a mask whose size differs from the frames of ``source``."""
    if mask.shape != tuple(source.frame_size):
        h, w = source.frame_size
        raise InputError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but frame {frame_index} of {source.path} is "
            f"{w}x{h}: give the annotation of this video's frame {frame_index}"
        )


def read_annotation(
    mask: str | Path | np.ndarray, source: FrameSource, frame_index: int = 0
) -> np.ndarray:
    """A mask (PNG path or label array) checked against the frame size of ``source``."""
    array = read_mask(mask) if isinstance(mask, (str, Path)) else np.asarray(mask)
    check_mask_size(array, source, frame_index)
    return array


def require_objects(mask: np.ndarray, name: str | Path) -> None:
    """Refuse an annotation without any object id (only background 0 and void 255)."""
    if not np.any((mask > 0) & (mask < VOID_LABEL)):
        raise InputError(
            f"mask {name} has no object (only background and void): nothing to propagate; "
            "give an annotation with object ids 1..254"
        )


def frame_index(source: FrameSource, frame: str) -> int:
    """The index of ``frame`` (an index, or a frame name such as ``00040``) in ``source``."""
    names = source.frame_names()
    if frame in names:
        return names.index(frame)
    try:
        index = int(frame)
    except ValueError:
        index = -1
    if not 0 <= index < len(names):
        raise InputError(
            f"no frame {frame!r} in {source.path}: give a frame index 0..{len(names) - 1} or a "
            f"frame name such as {names[0]}"
        )
    return index


def nearest_names(name: str, names: Sequence[str], count: int = 3) -> list[str]:
    """Up to ``count`` of ``names`` closest to ``name``: by number when both are numbers (frame
    ``0003`` -> ``00003``), else by spelling."""
    if name.isdigit() and all(other.isdigit() for other in names):
        return sorted(names, key=lambda other: (abs(int(other) - int(name)), other))[:count]
    return difflib.get_close_matches(name, names, n=count, cutoff=0.0)


def read_keyframes(
    source: FrameSource,
    masks: Sequence[tuple[str | None, str | Path]] = (),
    masks_dir: str | Path | None = None,
    limited: bool = False,
) -> dict[int, np.ndarray]:
    """Annotations by frame index: ``masks`` are (frame, file) pairs, the frame an index or a
    frame name (None: the first frame); ``masks_dir`` holds sparse PNGs named like the frames
    (YouTube-VOS ``Annotations/``), and a PNG named like no frame is refused (``limited``: the
    source is cut short, so PNGs named after its last frame are skipped). Sizes are checked;
    the first keyframe must show an object."""
    given: list[tuple[int, Path]] = []
    for frame, file in masks:
        given.append((0 if frame is None else frame_index(source, frame), Path(file)))
    if masks_dir is not None:
        folder = Path(masks_dir)
        if not folder.is_dir():
            raise InputError(f"masks folder {folder} is not a folder of annotation PNGs")
        names = {name: i for i, name in enumerate(source.frame_names())}
        files = sorted(folder.glob("*.png"))
        if not files:
            raise InputError(
                f"no annotation in {folder} is named like a frame of {source.path} (for example "
                f"{source.frame_names()[0]}.png)"
            )
        if limited:  # annotations of frames after the --max-frames cut are not needed
            from dino_vos.sources import natural_key

            last = natural_key(source.frame_names()[-1])
            files = [f for f in files if f.stem in names or natural_key(f.stem) < last]
        for file in files:
            if file.stem not in names:
                nearest = ", ".join(f"{name}.png" for name in nearest_names(file.stem, list(names)))
                raise InputError(
                    f"masks folder {folder}: {file.name} is named like no frame of {source.path} "
                    f"(nearest: {nearest}); rename it to the frame it annotates"
                )
        given += [(names[file.stem], file) for file in files]
    keyframes: dict[int, np.ndarray] = {}
    for index, path in given:
        if index in keyframes:
            raise InputError(f"two annotations for frame {index}: give one mask per frame")
        keyframes[index] = read_annotation(path, source, index)
    if not keyframes:
        raise InputError("no annotation given: give a mask of the first frame or a masks folder")
    first = min(keyframes)
    require_objects(keyframes[first], f"of frame {first}")
    return keyframes
