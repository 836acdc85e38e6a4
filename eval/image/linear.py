"""Linear probe of a frozen backbone (docs/protocol.md#image-baselines, DINO ``eval_linear``).

- Features: CLS tokens of the last 4 blocks concatenated for ViT-S-sized models, the last CLS
  token with the mean patch token for ViT-B-sized ones (``default_spec``; both after the final
  norm); flags choose any other combination.
- Classifier: ``nn.Linear`` initialised N(0, 0.01), bias 0; SGD momentum 0.9, no weight decay,
  lr = base_lr * global batch / 256 (base 0.001), cosine schedule over the epochs (per epoch).
- Reference mode: every epoch runs the frozen backbone on RandomResizedCrop + flip views of the
  training images; val images use resize + center crop (their features are computed once).
- Fast mode (``fast=True``): the classifier is trained on precomputed center-crop features of
  the training images (cached on disk), without augmentation. It costs one feature pass instead
  of one per epoch and usually lands a little below the reference mode.

Top-1/top-5 are measured on the val split after every epoch; the best epoch's classifier is
kept (and saved as safetensors with keys ``linear.weight``/``linear.bias``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from dino_vos.backbones import Backbone
from dino_vos.distributed import world_info
from dino_vos.eval.image.image_features import (
    FeatureSpec,
    image_features,
    iterate_loader,
    make_loader,
    write_safetensors,
)
from dino_vos.eval.image.imagefolder import ImageFolderDataset, ImageFolderSplit, train_transform
from dino_vos.eval.image.knn import accuracy, rank_classes

#: Embedding width from which the ViT-B protocol (last CLS + mean patch token) is the default.
VIT_B_DIM = 768


def default_spec(backbone: Backbone) -> FeatureSpec:
    """Reference features: 4 last CLS tokens (ViT-S and smaller), CLS + mean patch (ViT-B+)."""
    if backbone.embed_dim >= VIT_B_DIM:
        return FeatureSpec(n_last_blocks=1, avgpool=True)
    return FeatureSpec(n_last_blocks=min(4, backbone.depth), avgpool=False)


class LinearClassifier(nn.Module):
    """The reference linear layer: N(0, 0.01) weights, zero bias."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


@dataclass
class LinearConfig:
    """Training settings; ``lr`` is the base rate per 256 images (reference 0.001)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    fast: bool = False
    seed: int = 0

    def scaled_lr(self, world: int = 1) -> float:
        return self.lr * self.batch_size * world / 256


@dataclass
class LinearResult:
    """Per-epoch history, the best epoch and its classifier state."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_top1: float = -1.0
    best_top5: float = 0.0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "best_epoch": self.best_epoch,
            "best_top1": self.best_top1,
            "best_top5": self.best_top5,
            "final_top1": self.history[-1]["top1"] if self.history else None,
            "history": self.history,
        }


Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def evaluate_classifier(
    classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Top-1/top-5 accuracy (percent) of ``classifier`` on precomputed features."""
    classifier.eval()
    device = next(classifier.parameters()).device
    ranked = [
        rank_classes(classifier(features[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(features), batch_size)
    ]
    return accuracy(torch.cat(ranked), labels) if ranked else (0.0, 0.0)


def train_classifier(
    classifier: nn.Module,
    batches: Batches,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    config: LinearConfig,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LinearResult:
    """The reference optimisation loop; ``batches(epoch)`` yields (features, labels)."""
    _, world = world_info()
    model: nn.Module = classifier
    if world > 1 and not config.fast:
        model = DistributedDataParallel(classifier)
    optimizer = torch.optim.SGD(
        classifier.parameters(),
        lr=config.scaled_lr(world if not config.fast else 1),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs, eta_min=0)
    device = next(classifier.parameters()).device
    result = LinearResult()
    for epoch in range(config.epochs):
        model.train()
        total_loss, seen = 0.0, 0
        lr = optimizer.param_groups[0]["lr"]
        for features, labels in batches(epoch):
            labels = labels.to(device)
            loss = F.cross_entropy(model(features.to(device)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
        scheduler.step()
        top1, top5 = evaluate_classifier(classifier, val_features, val_labels)
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / max(seen, 1),
            "lr": lr,
            "top1": top1,
            "top5": top5,
        }
        result.history.append(record)
        if top1 > result.best_top1:
            result.best_epoch, result.best_top1, result.best_top5 = epoch + 1, top1, top5
            result.best_state = copy.deepcopy(classifier.state_dict())
        if on_epoch is not None:
            on_epoch(record)
    return result


def feature_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0
) -> Batches:
    """Fast mode: shuffled mini-batches of precomputed features (a new order every epoch)."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield features[index], labels[index]

    return batches


def augmented_batches(
    backbone: Backbone,
    split: ImageFolderSplit,
    spec: FeatureSpec,
    image_size: int,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> Batches:
    """Reference mode: frozen-backbone features of augmented views, recomputed every epoch."""
    dataset = ImageFolderDataset(split, train_transform(image_size))
    rank, world = world_info()
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if world > 1 else None
    )
    loader = make_loader(dataset, batch_size, workers, shuffle=True, sampler=sampler)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if sampler is not None:
            sampler.set_epoch(epoch)
        torch.manual_seed(seed + epoch)
        task = None
        if progress is not None:
            task = progress.add_task(f"Epoch {epoch + 1} (augmented)", total=len(dataset))
        backbone.eval()
        for images, labels in iterate_loader(loader):
            with torch.no_grad():
                features = image_features(backbone, images.to(backbone.device), spec)
            yield features, labels
            if progress is not None and task is not None:
                progress.advance(task, len(labels) * world)
        if progress is not None and task is not None:
            progress.remove_task(task)

    return batches


def train_linear_probe(
    backbone: Backbone,
    train_split: ImageFolderSplit,
    train_features: torch.Tensor | None,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    spec: FeatureSpec,
    config: LinearConfig,
    image_size: int = 224,
    workers: int = 0,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LinearResult:
    """Train the linear probe; fast mode needs ``train_features`` (center-crop features)."""
    torch.manual_seed(config.seed)
    classifier = LinearClassifier(spec.dim(backbone), len(train_split.classes))
    classifier = classifier.to(backbone.device)
    if config.fast:
        if train_features is None:
            raise ValueError("fast mode needs precomputed train features")
        batches = feature_batches(
            train_features, train_split.labels, config.batch_size, config.seed
        )
    else:
        batches = augmented_batches(
            backbone, train_split, spec, image_size, config.batch_size, workers, config.seed,
            progress,
        )  # fmt: skip
    return train_classifier(classifier, batches, val_features, val_labels, config, on_epoch)


def save_classifier(
    path: Path, state: dict[str, torch.Tensor], metadata: dict[str, object]
) -> None:
    """Write the classifier (``linear.weight``, ``linear.bias``) with JSON-encoded metadata."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    write_safetensors(dict(state), path, meta)
