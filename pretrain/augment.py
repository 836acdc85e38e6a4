"""DINO multi-crop augmentation on uint8 images (docs/protocol.md#pretraining).

Global crop 1: blur p=1.0. Global crop 2: blur p=0.1 and solarisation p=0.2. Local crops: blur
p=0.5. Every crop: horizontal flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 in a random
order, grayscale p=0.2; blur sigma ~ U(0.1, 2.0).

The random draws are torchvision's (``RandomResizedCrop.get_params``, ``ColorJitter.get_params``)
from the torch generator, so a seeded sample gives the same crops anywhere. The pixel work is
done on uint8 throughout: the crop is a view of the decoded image, resized by torchvision's uint8
antialiased bicubic kernel (Pillow's filter; results within one level of Pillow's), then look-up
tables for brightness, contrast and solarisation (Pillow's formulas, truncation
included), OpenCV for the saturation blend, the hue shift (HSV with hue in 0..255) and grayscale,
and an exact separable Gaussian (+-3 sigma, edge pixels repeated) for the blur; the reference
uses Pillow's box-blur approximation of the Gaussian. ``tools/bench_augment.py`` measures the
speed and the per-operation pixel differences against the reference ``DataAugmentationDINO``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import ColorJitter, InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2.functional import resize

from dino_vos.pretrain.config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)
FLIP_P, JITTER_P, GRAYSCALE_P = 0.5, 0.8, 0.2
#: Colour jitter ranges: brightness, contrast, saturation factors and the hue shift.
BRIGHTNESS, CONTRAST, SATURATION, HUE = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
SOLARIZE_THRESHOLD = 128
CROP_RATIO = (3 / 4, 4 / 3)

_IDENTITY = np.arange(256, dtype=np.float32)
_SOLARIZE = np.where(_IDENTITY < SOLARIZE_THRESHOLD, _IDENTITY, 255 - _IDENTITY).astype(np.uint8)


@dataclass(frozen=True)
class CropRecipe:
    """One crop's output size, scale range and probabilities of blur and solarisation."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


def _chance(p: float) -> bool:
    return p >= 1.0 or (p > 0.0 and float(torch.rand(1)) < p)


def _blend_table(factor: float, base: float) -> np.ndarray:
    """Pillow's ``Image.blend(base, image, factor)`` per value: truncated, clipped to 0..255."""
    values = np.float32(base) + np.float32(factor) * (_IDENTITY - np.float32(base))
    return np.clip(values, 0, 255).astype(np.uint8)


def gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma (Pillow's ``convert("L")``) as (H, W) uint8."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(image, _blend_table(factor, 0.0))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean gray level (rounded to an integer, as Pillow does)."""
    mean = int(float(gray(image).mean()) + 0.5)
    return cv2.LUT(image, _blend_table(factor, mean))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's gray version; ``-0.5`` turns OpenCV's rounding into truncation."""
    degenerate = cv2.cvtColor(gray(image), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, degenerate, 1.0 - factor, -0.5)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue channel (0..255 on a circle) by ``int(shift * 255)`` steps."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0]
    hsv[..., 0] = (hue.astype(np.int16) + int(shift * 255)) % 256
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(gray(image), cv2.COLOR_GRAY2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian of standard deviation ``sigma`` over +-3 sigma, edges repeated."""
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = cv2.getGaussianKernel(2 * radius + 1, sigma, cv2.CV_32F)
    return cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)


def solarize(image: np.ndarray) -> np.ndarray:
    return cv2.LUT(image, _SOLARIZE)


def color_jitter(image: np.ndarray) -> np.ndarray:
    """torchvision's ColorJitter draws (random order of the 4 ops, uniform factors)."""
    order, brightness, contrast, saturation, hue = ColorJitter.get_params(
        BRIGHTNESS, CONTRAST, SATURATION, HUE
    )
    for index in order.tolist():
        if index == 0:
            image = adjust_brightness(image, float(brightness))
        elif index == 1:
            image = adjust_contrast(image, float(contrast))
        elif index == 2:
            image = adjust_saturation(image, float(saturation))
        else:
            image = adjust_hue(image, float(hue))
    return image


def resized_crop(picture: torch.Tensor, box: Sequence[int], size: int) -> np.ndarray:
    """The ``(top, left, height, width)`` box of a (3, H, W) uint8 image resized to ``size``
    squared by torchvision's uint8 antialiased bicubic kernel (Pillow's filter, results within
    one level of Pillow's), as a contiguous (size, size, 3) array."""
    top, left, height, width = box
    region = picture[:, top : top + height, left : left + width]
    resized = resize(region, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return np.ascontiguousarray(resized.permute(1, 2, 0).numpy())


class _Normalizer:
    """uint8 (H, W, 3) -> float32 (3, H, W) ``(x / 255 - mean) / std``."""

    def __init__(self) -> None:
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        chw = torch.from_numpy(image).permute(2, 0, 1)
        out = torch.empty(chw.shape, dtype=torch.float32)
        out.copy_(chw)
        return out.mul_(self.scale).sub_(self.shift)


class MultiCropAugmentation:
    """Image (RGB uint8 (H, W, 3) array or PIL image) -> [global1, global2, local1 .. localN]
    normalised float32 tensors (3, size, size)."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        local_number: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
    ) -> None:
        self.local_number = local_number
        g_scale = (float(global_scale[0]), float(global_scale[1]))
        l_scale = (float(local_scale[0]), float(local_scale[1]))
        self.recipes = [
            CropRecipe(global_size, g_scale, blur_p=1.0),
            CropRecipe(global_size, g_scale, blur_p=0.1, solarize_p=0.2),
        ] + [CropRecipe(local_size, l_scale, blur_p=0.5)] * local_number
        self.normalize = _Normalizer()

    @classmethod
    def from_config(cls, crops: CropsConfig) -> MultiCropAugmentation:
        return cls(
            crops.global_size,
            crops.local_size,
            crops.local_number,
            crops.global_scale,
            crops.local_scale,
        )

    @property
    def num_crops(self) -> int:
        return 2 + self.local_number

    def crop(self, picture: torch.Tensor, recipe: CropRecipe) -> np.ndarray:
        """RandomResizedCrop (torchvision's draw) + horizontal flip."""
        box = RandomResizedCrop.get_params(picture, recipe.scale, CROP_RATIO)
        image = resized_crop(picture, box, recipe.size)
        return cv2.flip(image, 1) if _chance(FLIP_P) else image

    def augment(self, picture: torch.Tensor, recipe: CropRecipe) -> np.ndarray:
        """One crop as uint8 (size, size, 3), before normalisation."""
        image = self.crop(picture, recipe)
        if _chance(JITTER_P):
            image = color_jitter(image)
        if _chance(GRAYSCALE_P):
            image = to_grayscale(image)
        if _chance(recipe.blur_p):
            image = gaussian_blur(image, float(torch.empty(1).uniform_(*BLUR_SIGMA)))
        if _chance(recipe.solarize_p):
            image = solarize(image)
        return image

    def __call__(self, image: np.ndarray | Image.Image) -> list[torch.Tensor]:
        if isinstance(image, Image.Image):
            image = np.array(image.convert("RGB"))  # writable (np.asarray's view is read-only)
        picture = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # no copy
        return [self.normalize(self.augment(picture, recipe)) for recipe in self.recipes]
