"""Transfer to a small ImageFolder dataset: fine-tuning, and a linear-only run to compare.

Both runs put a new linear head (N(0, 0.01), bias 0) on the CLS token after the final norm and
train with AdamW, a linear warm-up and a per-step cosine schedule, on RandomResizedCrop + flip
views; val uses resize + center crop.

Layer-wise settings (kept simple):

- the head learns at ``lr``; every backbone parameter at ``lr * backbone_lr_scale`` (0.1);
- ``layer_decay`` < 1 additionally scales block ``i`` (of ``depth``) by
  ``layer_decay ** (depth - i)`` and the embeddings by ``layer_decay ** (depth + 1)`` (BEiT-style
  layer-wise decay); the default 1.0 turns this off;
- weight decay (0.05) applies to matrices only: biases, norms, position embedding and class
  token get none.

``finetune=False`` freezes the backbone (eval mode, no gradient): the linear-only transfer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from dino_vos.backbones import Backbone
from dino_vos.distributed import shard_range, world_info
from dino_vos.eval.image.image_features import iterate_loader, make_loader
from dino_vos.eval.image.imagefolder import (
    ImageFolderDataset,
    ImageFolderSplit,
    eval_transform,
    train_transform,
)
from dino_vos.eval.image.knn import rank_classes
from dino_vos.eval.image.linear import LinearClassifier

NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token")


@dataclass
class TransferConfig:
    """Optimisation settings for one transfer run (``lr`` is the head's absolute rate)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 1e-3
    seed: int = 0


class TransferModel(nn.Module):
    """Backbone + linear head on the CLS token after the final norm."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearClassifier(backbone.embed_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (tokens,), grid = self.backbone.forward_tokens(images)
        return self.head(self.backbone.split_tokens(tokens, grid)[0])


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for the final norm and the rest."""
    if name.startswith("vit.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("vit.patch_embed", "vit.pos_embed", "vit.cls_token", "vit.reg_token")):
        return 0
    return depth + 1


def param_groups(model: TransferModel, config: TransferConfig) -> list[dict[str, object]]:
    """AdamW groups: the head at ``lr``, backbone layers scaled, no decay on vectors/tokens."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    depth = model.backbone.depth
    named = [(f"head.{n}", p, 1.0) for n, p in model.head.named_parameters()]
    for name, param in model.backbone.named_parameters():
        scale = config.backbone_lr_scale * config.layer_decay ** (depth + 1 - layer_id(name, depth))
        named.append((name, param, scale))
    for name, param, scale in named:
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES
        key = (scale, 0.0 if no_decay else config.weight_decay)
        groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": config.lr * scale, "weight_decay": wd}
        for (scale, wd), params in groups.items()
    ]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TransferResult:
    """Per-epoch val accuracy of one run."""

    mode: str
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        best = max(self.history, key=lambda r: r["top1"]) if self.history else {}
        return {
            "mode": self.mode,
            "final_top1": self.history[-1]["top1"] if self.history else None,
            "final_top5": self.history[-1]["top5"] if self.history else None,
            "best_top1": best.get("top1"),
            "best_epoch": best.get("epoch"),
            "history": self.history,
        }


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    split: ImageFolderSplit,
    image_size: int,
    resize_size: int | None,
    batch_size: int,
    workers: int = 0,
) -> tuple[float, float]:
    """Top-1/top-5 (percent) on center crops; each rank scores its block, counts are summed."""
    rank, world = world_info()
    dataset = ImageFolderDataset(
        split, eval_transform(image_size, resize_size), shard_range(len(split), rank, world)
    )
    model.eval()
    device = next(model.parameters()).device
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in iterate_loader(make_loader(dataset, batch_size, workers)):
        correct = rank_classes(model(images.to(device))).eq(labels.to(device).view(-1, 1))
        hits[0] += correct[:, :1].any(dim=1).sum()
        hits[1] += correct[:, :5].any(dim=1).sum()
    if world > 1:
        torch.distributed.all_reduce(hits)
    top1, top5 = (100 * hits / max(1, len(split))).tolist()
    return top1, top5


def train_transfer(
    backbone: Backbone,
    train_split: ImageFolderSplit,
    val_split: ImageFolderSplit,
    config: TransferConfig,
    finetune: bool = True,
    image_size: int = 224,
    resize_size: int | None = None,
    workers: int = 0,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[TransferResult, TransferModel]:
    """Fine-tune (or, with ``finetune=False``, train only the head of) a copy of ``backbone``."""
    torch.manual_seed(config.seed)
    model = TransferModel(copy.deepcopy(backbone), len(train_split.classes))
    model = model.to(backbone.device)
    model.backbone.requires_grad_(finetune)
    rank, world = world_info()
    dataset = ImageFolderDataset(train_split, train_transform(image_size))
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(dataset, world, rank, shuffle=True, seed=config.seed)
        if world > 1
        else None
    )
    loader = make_loader(
        dataset, config.batch_size, workers, shuffle=True, sampler=sampler, drop_last=False
    )
    steps = config.epochs * len(loader)
    warmup = min(steps, round(config.warmup_epochs * len(loader)))
    optimizer = torch.optim.AdamW(param_groups(model, config))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps, warmup, config.min_lr_ratio)
    )
    trained: nn.Module = model if finetune else model.head
    wrapped = DistributedDataParallel(trained) if world > 1 else trained
    mode = "finetune" if finetune else "linear"
    result = TransferResult(mode)
    for epoch in range(config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train(finetune)
        model.head.train()
        task = None
        if progress is not None:
            task = progress.add_task(f"{mode} epoch {epoch + 1}", total=len(dataset))
        total_loss, seen = 0.0, 0
        for images, labels in iterate_loader(loader):
            images, labels = images.to(backbone.device), labels.to(backbone.device)
            if finetune:
                logits = wrapped(images)
            else:
                with torch.no_grad():
                    (tokens,), grid = model.backbone.forward_tokens(images)
                    cls = model.backbone.split_tokens(tokens, grid)[0]
                logits = wrapped(cls)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            if progress is not None and task is not None:
                progress.advance(task, len(labels) * world)
        if progress is not None and task is not None:
            progress.remove_task(task)
        top1, top5 = evaluate_model(
            model, val_split, image_size, resize_size, config.batch_size, workers
        )
        record = {"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "top1": top1, "top5": top5}
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return result, model
