"""Training images: folders of images or frames (recursive, labels ignored) and video files.

Videos are decoded by :func:`dino_vos.sources.open_video` (decord, or OpenCV where decord is
missing or mis-decodes), like the videos given to propagation.

Unreadable files are skipped and counted (the count reaches the log), never a crash. Each
sample's augmentation is seeded from (seed, epoch, position), so the crops do not depend on the
number of loader workers and a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from dino_vos.errors import InputError, param
from dino_vos.sources import IMAGE_SUFFIXES, VIDEO_SUFFIXES, natural_key, open_video, read_image

MAX_CONSECUTIVE_FAILURES = 64
VIDEO_CACHE_SIZE = 4


@dataclass(frozen=True)
class Sample:
    """One training image: an image file, or frame ``frame`` of a video file."""

    path: str
    frame: int = -1


@dataclass
class ScanResult:
    samples: list[Sample]
    images: int = 0
    videos: int = 0
    unreadable_videos: int = 0


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort(key=natural_key)
        for name in sorted(files, key=natural_key):
            if not name.startswith("."):
                yield Path(folder) / name


def scan_paths(paths: Sequence[str | Path], video_stride: int = 1) -> ScanResult:
    """Collect images (any folder depth) and video frames (every ``video_stride``-th)."""
    if not paths:
        raise InputError(
            f"no training data: pass {param('data.paths', 'DIR')} (a folder of images or videos)"
        )
    result = ScanResult(samples=[])
    for root in map(Path, paths):
        if not root.exists():
            raise InputError(f"data path not found: {root}")
        for file in _walk(root) if root.is_dir() else [root]:
            suffix = file.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                result.samples.append(Sample(str(file)))
                result.images += 1
            elif suffix in VIDEO_SUFFIXES:
                try:
                    length = len(open_video(file))
                except InputError:
                    result.unreadable_videos += 1
                    continue
                result.samples += [Sample(str(file), i) for i in range(0, length, video_stride)]
                result.videos += 1
    if not result.samples:
        raise InputError(
            f"no images or videos found under {', '.join(map(str, paths))} "
            f"(images: {', '.join(IMAGE_SUFFIXES)}; videos: {', '.join(VIDEO_SUFFIXES)})"
        )
    return result


class MultiCropDataset(Dataset):
    """Items are ``(index, seed)`` pairs; returns (list of crops, number of files skipped)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[np.ndarray], Any]):
        self.samples = list(samples)
        self.transform = transform
        self._videos: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.samples)

    def _video(self, path: str) -> Any:
        if path not in self._videos:
            if len(self._videos) >= VIDEO_CACHE_SIZE:
                self._videos.popitem(last=False)
            self._videos[path] = open_video(path)
        self._videos.move_to_end(path)
        return self._videos[path]

    def load(self, sample: Sample) -> np.ndarray:
        """Decode one sample as RGB uint8 (H, W, 3)."""
        if sample.frame < 0:
            return read_image(Path(sample.path))
        return self._video(sample.path).read_frame(sample.frame)

    def __getitem__(self, item: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        index, seed = item
        for skipped in range(min(MAX_CONSECUTIVE_FAILURES, len(self.samples))):
            sample = self.samples[(index + skipped) % len(self.samples)]
            try:
                image = self.load(sample)
            except Exception:  # noqa: BLE001 - any decoder error means "skip this file"
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image), skipped
        raise InputError(
            f"{MAX_CONSECUTIVE_FAILURES} files in a row could not be decoded (from "
            f"{self.samples[index].path}): check the data folder"
        )


class EpochSampler(DistributedSampler):
    """A DistributedSampler yielding ``(index, augmentation seed)``; can start mid-epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (its shuffle and seeds) and skip its first ``start`` samples."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        rng = np.random.default_rng([self.seed, self.epoch])
        seeds = rng.integers(0, 2**62, size=self.total_size)
        seeds = seeds[self.rank : self.total_size : self.num_replicas].tolist()
        for position in range(self.start, len(indices)):
            yield indices[position], seeds[position]

    def __len__(self) -> int:
        return self.num_samples - self.start


def loader_worker_init(_worker_id: int) -> None:
    """One OpenCV thread per loader worker (the workers are the parallelism)."""
    cv2.setNumThreads(1)


def collate_crops(
    batch: Sequence[tuple[list[torch.Tensor], int]],
) -> tuple[list[torch.Tensor], int]:
    """Stack crop ``i`` of every sample; sum the skipped-file counts."""
    crops = [torch.stack(group) for group in zip(*(item[0] for item in batch), strict=True)]
    return crops, sum(item[1] for item in batch)
