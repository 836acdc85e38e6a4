"""DINO multi-crop augmentation on torchvision transforms v2 (docs/protocol.md#pretraining).

Global crop 1: blur p=1.0. Global crop 2: blur p=0.1 and solarisation p=0.2. Local crops: blur
p=0.5. Every crop: horizontal flip p=0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale
p=0.2; blur sigma ~ U(0.1, 2.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from dino_vos.pretrain.config import CropsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)
BLUR_KERNEL = 9


def _blur(p: float) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=BLUR_KERNEL, sigma=BLUR_SIGMA)], p=p)


def _flip_and_color_jitter() -> list[v2.Transform]:
    return [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply(
            [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
        ),
        v2.RandomGrayscale(p=0.2),
    ]


def _normalize() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _crop(size: int, scale: Sequence[float]) -> v2.Transform:
    return v2.RandomResizedCrop(
        size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
    )


class MultiCropAugmentation:
    """Image (H, W, 3) uint8 RGB -> [global1, global2, local1 .. localN] normalised tensors."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        local_number: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
    ) -> None:
        self.local_number = local_number
        self.to_image = v2.ToImage()
        self.global1 = v2.Compose(
            [_crop(global_size, global_scale), *_flip_and_color_jitter(), _blur(1.0), *_normalize()]
        )
        self.global2 = v2.Compose(
            [
                _crop(global_size, global_scale),
                *_flip_and_color_jitter(),
                _blur(0.1),
                v2.RandomSolarize(threshold=128, p=0.2),
                *_normalize(),
            ]
        )
        self.local = v2.Compose(
            [_crop(local_size, local_scale), *_flip_and_color_jitter(), _blur(0.5), *_normalize()]
        )

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

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        picture = self.to_image(image)
        crops = [self.global1(picture), self.global2(picture)]
        crops += [self.local(picture) for _ in range(self.local_number)]
        return [c.as_subclass(torch.Tensor) for c in crops]
