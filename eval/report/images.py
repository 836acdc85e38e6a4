"""The report's pictures: JPEG frames and PNG mask layers at a bounded size.

Masks are drawn as *sprites*: one PNG per frame stacks one layer per object (top to bottom), so
the page can show or hide each object without reading pixels (which ``file://`` pages may not).
A mask layer fills the object in its DAVIS colour, half transparent, with an opaque edge; a
difference layer marks false positives (predicted, not in the ground truth) and false negatives
(missed) of that object in two colours.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from dino_vos.masks import davis_palette

FALSE_POSITIVE = (255, 64, 32)  # predicted where the ground truth has not this object
FALSE_NEGATIVE = (32, 160, 255)  # the object's ground truth that was missed
JPEG_QUALITY = 85


def display_colour(object_id: int) -> tuple[int, int, int]:
    """The DAVIS colour of an id, brightened (largest channel 255) to stand out on frames."""
    colour = davis_palette()[object_id % 256].astype(np.float64)
    scale = 255.0 / colour.max() if colour.max() > 0 else 1.0
    return tuple(int(round(c * scale)) for c in colour)  # type: ignore[return-value]


def display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(H, W) scaled so that the longer side is at most ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == size_hw:
        return rgb
    return cv2.resize(rgb, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if labels.shape == size_hw:
        return labels
    return cv2.resize(labels, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def _encode_layers(layers: np.ndarray, colours: list[tuple[int, int, int]], alphas: list[int]):
    """An indexed PNG of (K, H, W) layer values stacked vertically; value v of any layer is
    palette entry v (0 transparent)."""
    stacked = layers.reshape(-1, layers.shape[-1]).astype(np.uint8)
    image = Image.fromarray(stacked, mode="P")
    palette = [0, 0, 0]
    for colour in colours:
        palette.extend(colour)
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True, transparency=bytes([0, *alphas]))
    return buffer.getvalue()


def _edges(mask: np.ndarray) -> np.ndarray:
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=0)
    return mask & ~eroded.astype(bool)


def mask_sprite(labels: np.ndarray, object_ids: list[int]) -> bytes:
    """One layer per object: its pixels half transparent in its (brightened DAVIS) colour, its
    edge opaque."""
    layers = np.zeros((len(object_ids), *labels.shape), np.uint8)
    colours, alphas = [], []
    for index, object_id in enumerate(object_ids):
        mask = labels == object_id
        fill, edge = 1 + 2 * index, 2 + 2 * index
        layers[index][mask] = fill
        layers[index][_edges(mask)] = edge
        colour = display_colour(object_id)
        colours += [colour, colour]
        alphas += [110, 255]
    return _encode_layers(layers, colours, alphas)


def difference_sprite(labels: np.ndarray, truth: np.ndarray, object_ids: list[int]) -> bytes:
    """One layer per object: false positives in one colour, false negatives in another."""
    layers = np.zeros((len(object_ids), *labels.shape), np.uint8)
    for index, object_id in enumerate(object_ids):
        predicted, expected = labels == object_id, truth == object_id
        layers[index][predicted & ~expected] = 1
        layers[index][expected & ~predicted] = 2
    return _encode_layers(layers, [FALSE_POSITIVE, FALSE_NEGATIVE], [210, 210])
