"""Frame resizing rules and normalisation shared by propagation, attention and features."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch

ResizeRule = Literal["reference", "patch"]
RESIZE_RULES: tuple[str, ...] = ("reference", "patch")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The reference video-segmentation script normalises with std 0.228 for the red channel.
REFERENCE_VIDEO_STD = (0.228, 0.224, 0.225)


def resized_frame_size(
    height: int,
    width: int,
    short_side: int | None = 480,
    rule: ResizeRule = "reference",
    patch_size: int = 8,
) -> tuple[int, int]:
    """Network input size (H, W) for an original frame of ``height`` x ``width``.

    ``reference``: short side -> ``short_side``, long side -> floor(long * short_side / short /
    64) * 64; square frames become short_side (H) x floor(short_side / 64) * 64 (W), as the
    reference frame reader does. ``patch``: scale the short side to ``short_side`` (or keep the
    size when None) and round each side to the nearest multiple of ``patch_size``.
    """
    if rule == "reference":
        target = short_side or min(height, width)
        if height > width:
            out_w = target
            out_h = int((target * height / width) // 64 * 64)
        else:
            out_h = target
            out_w = int((target * width / height) // 64 * 64)
        return max(out_h, 64), max(out_w, 64)
    if rule == "patch":
        scale = 1.0 if short_side is None else short_side / min(height, width)
        out_h = max(patch_size, round(height * scale / patch_size) * patch_size)
        out_w = max(patch_size, round(width * scale / patch_size) * patch_size)
        return out_h, out_w
    raise ValueError(f"unknown resize rule '{rule}': use one of {', '.join(RESIZE_RULES)}")


def frame_to_tensor(
    image: np.ndarray,
    size: tuple[int, int],
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = REFERENCE_VIDEO_STD,
) -> torch.Tensor:
    """Resize an RGB uint8 image (bilinear, as cv2.resize in the reference) and normalise.

    Returns a float32 tensor (3, H, W).
    """
    height, width = size
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)
