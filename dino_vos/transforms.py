"""Frame normalisation shared by propagation, attention and features (sizes: dino_vos.spec)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The reference video-segmentation script normalises with std 0.228 for the red channel.
REFERENCE_VIDEO_STD = (0.228, 0.224, 0.225)
#: The std of each ``ResizeSpec.normalisation`` (docs/protocol.md#frame-preprocessing).
FRAME_STDS = {"video": REFERENCE_VIDEO_STD, "imagenet": IMAGENET_STD}


def frame_to_tensor(
    image: np.ndarray,
    size: tuple[int, int],
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = REFERENCE_VIDEO_STD,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Resize an RGB uint8 image and normalise: ``bilinear`` as cv2.resize in the DINO
    reference, ``bicubic`` as torchvision's resize of a PIL image (PIL's antialiased bicubic) in
    the DINOv3 notebook (docs/protocol.md#frame-preprocessing).

    Returns a float32 tensor (3, H, W).
    """
    height, width = size
    if image.shape[:2] != (height, width):
        if interpolation == "bicubic":
            pil = Image.fromarray(np.ascontiguousarray(image))
            image = np.array(pil.resize((width, height), Image.Resampling.BICUBIC))
        elif interpolation == "bilinear":
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        else:
            raise ValueError(f"unknown interpolation {interpolation!r}: use bilinear or bicubic")
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)
