"""Image features (one vector per image) of a frozen backbone for the image baselines (k-NN,
linear probe, transfer); the patch features of frames are :mod:`dino_vos.features`.

One extraction path for the three baselines: the evaluation transform of
``docs/protocol.md#image-baselines``, a sharded extraction under ``torchrun`` (each rank one
contiguous block, gathered with ``all_gather``) and a safetensors cache on disk keyed by the
backbone, a content hash of its weights, the image sizes, the feature spec and the files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from dino_vos.atomic import atomic_entry
from dino_vos.backbones import Backbone
from dino_vos.console import console
from dino_vos.distributed import gather_shards, shard_range, world_info
from dino_vos.errors import InputError, param
from dino_vos.eval.image.imagefolder import (
    ImageFolderDataset,
    ImageFolderSplit,
    check_sizes,
    eval_transform,
)
from dino_vos.features import backbone_settings

#: Bump when the cached tensors change meaning (2: weights keyed by their content hash).
CACHE_VERSION = "2"


@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens make an image feature.

    ``n_last_blocks`` CLS tokens (after the final norm) of the last blocks, concatenated;
    ``avgpool`` adds the mean patch token of the last block. With one block this interleaves the
    two vectors exactly as the DINO reference linear evaluation does (so its heads load).
    """

    n_last_blocks: int = 1
    avgpool: bool = False

    def dim(self, backbone: Backbone) -> int:
        return backbone.embed_dim * (self.n_last_blocks + int(self.avgpool))

    def check(self, backbone: Backbone) -> None:
        if not 1 <= self.n_last_blocks <= backbone.depth:
            raise InputError(
                f"{param('n_last_blocks', self.n_last_blocks)} does not fit {backbone.name}: "
                f"it has {backbone.depth} blocks"
            )


def image_features(backbone: Backbone, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """(B, spec.dim) features of a normalised image batch (B, 3, H, W)."""
    layers = list(range(-spec.n_last_blocks, 0))
    tokens, grid = backbone.forward_tokens(images, layers=layers)
    split = [backbone.split_tokens(t, grid) for t in tokens]
    cls = torch.cat([c for c, _ in split], dim=-1)
    if not spec.avgpool:
        return cls
    patch_mean = split[-1][1].mean(dim=(1, 2))
    if spec.n_last_blocks == 1:  # reference layout: [cls_0, mean_0, cls_1, mean_1, ...]
        return torch.stack([cls, patch_mean], dim=-1).flatten(1)
    return torch.cat([cls, patch_mean], dim=-1)


def iterate_loader(loader: Iterable) -> Iterator:
    """Iterate a DataLoader, turning image errors from workers back into one-line errors."""
    try:
        yield from loader
    except InputError as exc:
        line = str(exc).strip().splitlines()[-1]
        raise InputError(line.split("InputError: ", 1)[-1]) from None


def make_loader(
    dataset: ImageFolderDataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    sampler: Any = None,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
    )


@torch.no_grad()
def extract_image_features(
    backbone: Backbone,
    split: ImageFolderSplit,
    spec: FeatureSpec,
    image_size: int,
    resize_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress | None = None,
    description: str = "Features",
) -> torch.Tensor:
    """(N, spec.dim) float32 features of every image of ``split`` (eval transform).

    Under an initialised process group each rank computes its block and all ranks get the
    gathered result.
    """
    spec.check(backbone)
    rank, world = world_info()
    indices = shard_range(len(split), rank, world)
    dataset = ImageFolderDataset(split, eval_transform(image_size, resize_size), indices)
    loader = make_loader(dataset, batch_size, workers)
    task = progress.add_task(description, total=len(split)) if progress is not None else None
    chunks = []
    was_training = backbone.training
    backbone.eval()
    for images, _ in iterate_loader(loader):
        feats = image_features(backbone, images.to(backbone.device), spec)
        chunks.append(feats.float())
        if progress is not None and task is not None:
            progress.advance(task, len(images) * world)  # approximate under torchrun
    backbone.train(was_training)
    local = torch.cat(chunks) if chunks else torch.zeros(0, spec.dim(backbone))
    return gather_shards(local.to(backbone.device), len(split)).cpu()


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename),
    under the entry's lock: runs that share a cache write an entry one at a time."""
    with atomic_entry(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)


def _read_cache(path: Path, metadata: dict[str, str]) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            if dict(handle.metadata() or {}) != metadata:
                return None
            return handle.get_tensor("features")
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        console.print(f"[yellow]Ignoring unreadable feature cache {path}: {exc}[/]")
        return None


def cached_image_features(
    backbone: Backbone,
    split: ImageFolderSplit,
    split_name: str,
    spec: FeatureSpec,
    image_size: int,
    resize_size: int | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """:func:`extract_image_features`, reused from / stored to ``cache_dir`` (None: no cache).

    The file ``<split>-<key>.safetensors`` records backbone name, weights id, sizes, feature
    spec, split and a fingerprint of the files; any difference means a different file.
    """
    resize_size = check_sizes(image_size, resize_size)
    metadata = {
        "version": CACHE_VERSION,
        **backbone_settings(backbone),
        "weights_id": backbone.weights_id,
        "arch": json.dumps(backbone.arch, sort_keys=True),
        "image_size": str(image_size),
        "resize_size": str(resize_size),
        "split": split_name,
        "root": str(split.root.resolve()),
        "files": split.fingerprint(),
        "classes": json.dumps(list(split.classes)),
        "num_images": str(len(split)),
        **{k: json.dumps(v) for k, v in asdict(spec).items()},
    }
    key = hashlib.sha1(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"{split_name}-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        features = _read_cache(path, metadata)
        if features is not None:
            console.print(f"Reusing cached {split_name} features: {path}")
            return features
    features = extract_image_features(
        backbone, split, spec, image_size, resize_size, batch_size, workers, progress,
        description=f"{split_name} features",
    )  # fmt: skip
    if path is not None and world_info()[0] == 0:
        write_safetensors({"features": features, "labels": split.labels}, path, metadata)
    return features
