"""Frame -> patch features: the one code path used by propagation, ``features`` and the cache."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from dino_vos.backbones import Backbone
from dino_vos.sources import Frame
from dino_vos.spec import ResizeSpec
from dino_vos.transforms import IMAGENET_MEAN, REFERENCE_VIDEO_STD, frame_to_tensor


class FeatureExtractor(Protocol):
    """Turns a frame into an (h, w, D) patch-feature grid.

    ``input_size`` gives the network input size for an original frame size; the patch grid is
    that size divided by ``patch_size``. Implementations may cache by ``frame.name``.
    """

    patch_size: int

    def input_size(self, height: int, width: int) -> tuple[int, int]: ...

    def __call__(self, frame: Frame) -> torch.Tensor: ...


class BackboneFeatures:
    """Patch features of a :class:`Backbone` (last block, final norm) for single frames."""

    def __init__(
        self,
        backbone: Backbone,
        resize: ResizeSpec | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = REFERENCE_VIDEO_STD,
    ) -> None:
        self.backbone = backbone
        self.resize = resize or ResizeSpec()
        self.mean, self.std = mean, std
        self.patch_size = backbone.patch_size

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.resize.size_for(height, width, self.patch_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        size = self.input_size(*image.shape[:2])
        return frame_to_tensor(image, size, self.mean, self.std)

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> torch.Tensor:
        """(h, w, D) patch features of one RGB uint8 image."""
        batch = self.preprocess(image)[None].to(self.backbone.device)
        return self.backbone(batch)[0]

    def __call__(self, frame: Frame) -> torch.Tensor:
        return self.extract(frame.image)
