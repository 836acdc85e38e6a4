"""Weighted k-NN classification of frozen backbone features (REFERENCE section 6).

Protocol: images resized to 256 (bicubic) and center-cropped to 224, CLS token of the last
block after the final norm, L2-normalised; for each val image the k most cosine-similar train
images vote for their class with weight ``exp(sim / 0.07)``. All k are scored from one
neighbour search. Similarities are computed chunk by chunk so that the (val x train) matrix
never exceeds a memory budget. Ties are resolved deterministically: among equally similar
neighbours the lower train index is taken first, among classes with equal scores the lower
class index ranks first (so chunking never changes the results).

This module also holds the feature extraction shared by the baselines: a sharded extraction
under ``torchrun`` (each rank one contiguous block, gathered with ``all_gather``) and a
safetensors cache on disk, keyed by the backbone, its weights, the image sizes and the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import Progress
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from dino_vos.atomic import atomic_path
from dino_vos.backbones import Backbone
from dino_vos.console import console
from dino_vos.errors import InputError
from eval.imagefolder import ImageFolderDataset, ImageFolderSplit, check_sizes, eval_transform

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_MEMORY_BUDGET_MB = 512
#: Bytes held per (val, train) pair while a chunk is ranked: similarity + sorted value + index.
BYTES_PER_PAIR = 16
CACHE_VERSION = "1"


# --------------------------------------------------------------------------- features


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
                f"--n-last-blocks {self.n_last_blocks} does not fit {backbone.name}: it has "
                f"{backbone.depth} blocks"
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


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the ``torchrun`` process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world_info()


def shard_range(total: int, rank: int, world: int) -> range:
    """The contiguous block of ``total`` items that ``rank`` of ``world`` handles."""
    per_rank = math.ceil(total / world) if total else 0
    return range(min(total, rank * per_rank), min(total, (rank + 1) * per_rank))


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's block (rank order) into (total, ...); padded ``all_gather``."""
    rank, world = world_info()
    if world == 1:
        return local
    per_rank = math.ceil(total / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    pieces = [part[: len(shard_range(total, r, world))] for r, part in enumerate(parts)]
    return torch.cat(pieces)


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
def extract_features(
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


def weights_fingerprint(backbone: Backbone) -> str:
    """``backbone.weights_id``, or a hash of the tensors for random-init weights."""
    if backbone.weights_id != "random":
        return backbone.weights_id
    digest = hashlib.sha1()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"random:{digest.hexdigest()[:16]}"


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]
) -> None:
    """Write a safetensors file atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
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


def cached_features(
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
    """:func:`extract_features`, reused from / stored to ``cache_dir`` (None: no cache).

    The file ``<split>-<key>.safetensors`` records backbone name, weights id, sizes, feature
    spec, split and a fingerprint of the files; any difference means a different file.
    """
    resize_size = check_sizes(image_size, resize_size)
    metadata = {
        "version": CACHE_VERSION,
        "backbone": backbone.name,
        "weights_id": weights_fingerprint(backbone),
        "arch": json.dumps(backbone.arch, sort_keys=True),
        "pos_embed": backbone.pos_embed_mode,
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
    features = extract_features(
        backbone, split, spec, image_size, resize_size, batch_size, workers, progress,
        description=f"{split_name} features",
    )  # fmt: skip
    if path is not None and world_info()[0] == 0:
        write_safetensors({"features": features, "labels": split.labels}, path, metadata)
    return features


# --------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class KNNScore:
    """Accuracy (percent) for one k; ``k_used`` is k capped by the training-set size."""

    k: int
    k_used: int
    top1: float
    top5: float


def chunk_sizes(num_test: int, num_train: int, k: int, memory_budget_mb: float) -> tuple[int, int]:
    """(val rows, train columns) per similarity chunk so that a chunk fits the budget."""
    pairs = max(1, int(memory_budget_mb * 2**20) // BYTES_PER_PAIR)
    test_chunk = max(1, min(num_test, pairs // max(1, num_train)))
    train_chunk = max(1, min(num_train, max(k, pairs // test_chunk)))
    return test_chunk, train_chunk


def _sorted_desc(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sort(values, dim=1, descending=True, stable=True)


def nearest_neighbours(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    chunks: tuple[int, int] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (val rows, top-k similarities, train indices) per val chunk, most similar first.

    ``chunks`` forces (val rows, train columns) per chunk instead of the memory budget.
    """
    num_test, num_train = len(test), len(train)
    k = min(k, num_train)
    test_chunk, train_chunk = chunks or chunk_sizes(num_test, num_train, k, memory_budget_mb)
    for start in range(0, num_test, test_chunk):
        rows = slice(start, min(num_test, start + test_chunk))
        best_sim = test.new_zeros((rows.stop - rows.start, 0))
        best_idx = torch.zeros_like(best_sim, dtype=torch.long)
        for col in range(0, num_train, train_chunk):
            sim = test[rows] @ train[col : col + train_chunk].T
            sim, idx = _sorted_desc(sim)
            # Earlier candidates have lower train indices: a stable sort keeps them first on ties.
            best_sim = torch.cat([best_sim, sim[:, :k]], dim=1)
            best_idx = torch.cat([best_idx, idx[:, :k] + col], dim=1)
            best_sim, order = _sorted_desc(best_sim)
            best_sim, best_idx = best_sim[:, :k], best_idx.gather(1, order)[:, :k]
        yield rows, best_sim, best_idx


def weighted_vote(
    similarities: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Class scores (B, C): sum of exp(sim / T) over the neighbours of each class."""
    weights = (similarities / temperature).exp()
    scores = weights.new_zeros((len(weights), num_classes))
    return scores.scatter_add_(1, neighbour_labels, weights)


def rank_classes(scores: torch.Tensor, top: int = 5) -> torch.Tensor:
    """Top ``top`` class indices per row, best first; equal scores rank the lower index first."""
    return _sorted_desc(scores)[1][:, : min(top, scores.shape[1])]


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    chunks: tuple[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Top-5 class predictions (N_test, min(5, C)) for every k, from one neighbour search.

    Features must be L2-normalised (the dot product is the cosine similarity).
    """
    if len(train_features) == 0:
        raise InputError("k-NN needs at least one training image")
    if not ks or min(ks) < 1:
        raise InputError(f"k values must be positive integers, got {list(ks)}")
    k_max = min(max(ks), len(train_features))
    top = min(5, num_classes)
    predictions = {k: torch.zeros((len(test_features), top), dtype=torch.long) for k in ks}
    train_labels = train_labels.to(train_features.device)
    neighbours = nearest_neighbours(train_features, test_features, k_max, memory_budget_mb, chunks)
    for rows, sims, idx in neighbours:
        labels = train_labels[idx]
        for k in ks:
            used = min(k, k_max)
            scores = weighted_vote(sims[:, :used], labels[:, :used], num_classes, temperature)
            predictions[k][rows] = rank_classes(scores, top).cpu()
    return predictions


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of ranked predictions (N, >=1)."""
    if len(targets) == 0:
        return 0.0, 0.0
    hits = predictions.eq(targets.view(-1, 1).to(predictions.device))
    top1 = hits[:, :1].any(dim=1).float().mean().item()
    top5 = hits[:, :5].any(dim=1).float().mean().item()
    return 100.0 * top1, 100.0 * top5


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    chunks: tuple[int, int] | None = None,
) -> list[KNNScore]:
    """L2-normalise the features and score top-1/top-5 for every k (sorted ascending)."""
    ks = sorted(set(ks))
    predictions = knn_predict(
        F.normalize(train_features.float(), dim=1),
        train_labels,
        F.normalize(test_features.float(), dim=1),
        num_classes,
        ks,
        temperature,
        memory_budget_mb,
        chunks,
    )
    k_cap = len(train_features)
    return [KNNScore(k, min(k, k_cap), *accuracy(predictions[k], test_labels)) for k in ks]
