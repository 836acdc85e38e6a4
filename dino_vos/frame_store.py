"""A clip's frames and patch features on disk, written once in order, read back in any order.

Backward and bidirectional propagation visit frames from the last keyframe towards the first.
Decoding a video backwards frame by frame is slow (every seek decodes from the previous key
frame) and holding the decoded clip in memory does not scale, so a first pass streams the video
once, embeds every frame and stores both in a temporary folder (``.npy`` files, memory-mapped
on reading); propagation then runs over the store in either order with flat memory. The cost is
disk: about ``h * w * D * 4`` bytes of features plus the frame's pixels per frame (10 MB at
480p with ViT-S/8). See docs/protocol.md#keyframes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from dino_vos.sources import Frame


class FrameStore:
    """Frames and their (h, w, D) features by frame index; a context manager that deletes its
    temporary folder on exit."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="dino-vos-frames-", dir=directory)
        self.root = Path(self._tmp.name)
        self._names: dict[int, str] = {}
        self._device: dict[str, torch.device] = {}

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def __contains__(self, index: int) -> bool:
        return index in self._names

    def put(self, frame: Frame, features: torch.Tensor) -> None:
        """Store one frame and its features (moved to the CPU; returned on their device)."""
        np.save(self.root / f"{frame.index}.image.npy", frame.image, allow_pickle=False)
        self.save_tensor(f"{frame.index}.features", features)
        self._names[frame.index] = frame.name

    def frame(self, index: int) -> Frame:
        image = np.load(self.root / f"{index}.image.npy", mmap_mode="r", allow_pickle=False)
        return Frame(index, self._names[index], np.asarray(image))

    def features(self, index: int) -> torch.Tensor:
        return self.load_tensor(f"{index}.features")

    def save_tensor(self, key: str, tensor: torch.Tensor) -> None:
        """Store any tensor under ``key`` (for example a soft label map of a first pass)."""
        np.save(self.root / f"{key}.npy", tensor.detach().to("cpu").numpy(), allow_pickle=False)
        self._device[key] = tensor.device

    def load_tensor(self, key: str) -> torch.Tensor:
        array = np.load(self.root / f"{key}.npy", allow_pickle=False)
        return torch.from_numpy(array).to(self._device[key])
