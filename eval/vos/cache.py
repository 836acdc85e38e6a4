"""On-disk cache of per-frame patch features, so runs that differ only in propagation skip the ViT.

:class:`FeatureCache` wraps a :class:`dino_vos.features.BatchExtractor` (the one extraction code
path) as a :class:`dino_vos.features.FeatureExtractor`. Files are fp16 safetensors at::

    ROOT/<backbone>-<resize key>-<key hash>/<sequence>/<frame name>.safetensors

The key hash covers a hash of the weights' tensors (not their file name), the position-embedding
mode, the resize rule and the normalisation; every file also records a hash of its frame's
pixels, so a changed frame is recomputed. Features are returned rounded to fp16 on a miss too,
which makes a cold and a warm cache give identical propagations.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from dino_vos.atomic import atomic_entry, atomic_write_json
from dino_vos.backbones import weights_fingerprint
from dino_vos.features import BatchExtractor
from dino_vos.sources import Frame

TENSOR_NAME = "features"
KEY_FILE = "cache-key.json"


def image_digest(image: np.ndarray) -> str:
    """Hash of a frame's pixels and shape."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


@dataclass
class CacheStats:
    """Hit and miss counts."""

    hits: int = 0
    misses: int = 0

    @property
    def total(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    def add(self, other: CacheStats) -> None:
        self.hits += other.hits
        self.misses += other.misses


def _folder_name(features: BatchExtractor, key: dict[str, Any]) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", features.backbone.name).strip("_")
    key_hash = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8)
    return f"{name}-{features.resize.key()}-{key_hash.hexdigest()}"


class FeatureCache:
    """A caching :class:`FeatureExtractor` around a :class:`BatchExtractor`.

    ``for_sequence(name)`` gives a view that stores under that sequence's folder and shares
    this cache's :class:`CacheStats`.
    """

    def __init__(
        self,
        features: BatchExtractor,
        root: str | Path,
        fingerprint: str | None = None,
        sequence: str = "",
        stats: CacheStats | None = None,
    ) -> None:
        self.features = features
        self.patch_size = features.patch_size
        self.fingerprint = fingerprint or weights_fingerprint(features.backbone)
        self.key = features.settings(self.fingerprint)
        self.root = Path(root)
        self.folder = self.root / _folder_name(features, self.key)
        self.sequence = sequence
        self.stats = stats if stats is not None else CacheStats()

    def for_sequence(self, sequence: str) -> FeatureCache:
        return FeatureCache(self.features, self.root, self.fingerprint, sequence, self.stats)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.features.input_size(height, width)

    def path(self, frame: Frame) -> Path:
        return self.folder / self.sequence / f"{frame.name}.safetensors"

    def _load(self, path: Path, frame: Frame, digest: str) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("image") != digest:
                    return None
                tensor = handle.get_tensor(TENSOR_NAME)
        except (SafetensorError, OSError, ValueError, KeyError):
            return None  # damaged file: recompute and overwrite
        height, width = self.input_size(*frame.image.shape[:2])
        grid = (height // self.patch_size, width // self.patch_size)
        return tensor if tensor.ndim == 3 and tuple(tensor.shape[:2]) == grid else None

    def _store(self, path: Path, features: torch.Tensor, digest: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / KEY_FILE
        if not key_file.is_file():
            atomic_write_json(key_file, self.key)
        data = save_safetensors({TENSOR_NAME: features.cpu().contiguous()}, {"image": digest})
        with atomic_entry(path) as tmp:  # a temporary name, renamed, under the entry's lock
            tmp.write_bytes(data)

    def __call__(self, frame: Frame) -> torch.Tensor:
        """(h, w, D) float32 features on the backbone's device (fp16-rounded)."""
        path = self.path(frame)
        digest = image_digest(frame.image)
        cached = self._load(path, frame, digest)
        if cached is not None:
            self.stats.hits += 1
            return cached.to(self.features.backbone.device, torch.float32)
        half = self.features(frame).to(torch.float16)
        self._store(path, half, digest)
        self.stats.misses += 1
        return half.float()
