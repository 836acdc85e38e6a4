"""``dino-vos eval knn|linear|transfer``: image baselines of a backbone on an ImageFolder.

Each command reads ``--train DIR`` and ``--val DIR`` (``<class>/<images>``), writes
``OUT/<command>.json`` (atomically) and prints a table. Under ``torchrun`` every rank extracts
its share of the features; rank 0 prints and writes.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
from rich.table import Table

from dino_vos.atomic import atomic_write_text
from dino_vos.backbones import Backbone
from dino_vos.cli import backbone_options, load_backbone_from_options
from dino_vos.console import console, progress_bar
from eval.imagefolder import (
    DEFAULT_IMAGE_SIZE,
    ImageFolderSplit,
    check_sizes,
    load_imagefolder,
)
from eval.knn import (
    DEFAULT_KS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_TEMPERATURE,
    FeatureSpec,
    cached_features,
    init_distributed,
    knn_evaluate,
)
from eval.linear import LinearConfig, default_spec, save_classifier, train_linear_probe
from eval.transfer import TransferConfig, train_transfer


@dataclass
class BaselineRun:
    """Everything a baseline command shares: data, backbone, sizes and output folder."""

    backbone: Backbone
    train: ImageFolderSplit
    val: ImageFolderSplit
    out_dir: Path
    image_size: int
    resize_size: int
    batch_size: int
    workers: int
    cache_dir: Path | None
    seed: int
    rank: int
    world: int

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    def progress(self, unit: str = "images"):
        """A rich progress bar on rank 0, a disabled one elsewhere."""
        bar = progress_bar(unit)
        bar.disable = not self.main_process
        return bar

    def features(self, split: str, spec: FeatureSpec, progress: Any = None) -> torch.Tensor:
        return cached_features(
            self.backbone,
            self.train if split == "train" else self.val,
            split,
            spec,
            self.image_size,
            self.resize_size,
            self.cache_dir,
            self.batch_size,
            self.workers,
            progress,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "patch_size": self.backbone.patch_size,
            "embed_dim": self.backbone.embed_dim,
            "train": str(self.train.root),
            "val": str(self.val.root),
            "num_classes": len(self.train.classes),
            "num_train": len(self.train),
            "num_val": len(self.val),
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "world_size": self.world,
        }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def baseline_options(batch_size: int) -> Callable[[Callable], Callable]:
    """Data, size, loader and backbone options; the command receives ``run=BaselineRun``."""

    def decorate(func: Callable) -> Callable:
        @click.option(
            "--train",
            "train_dir",
            required=True,
            type=click.Path(path_type=Path),
            help="Training ImageFolder: one subfolder of images per class.",
        )
        @click.option(
            "--val",
            "val_dir",
            required=True,
            type=click.Path(path_type=Path),
            help="Validation ImageFolder (its classes must exist in --train).",
        )
        @click.option(
            "--out",
            "out_dir",
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="Output folder for the results JSON (and cached features).",
        )
        @click.option(
            "--image-size",
            type=click.IntRange(min=8),
            default=DEFAULT_IMAGE_SIZE,
            show_default=True,
            help="Crop size fed to the backbone.",
        )
        @click.option(
            "--resize-size",
            type=click.IntRange(min=8),
            default=None,
            help="Short side before the center crop [default: image size * 256/224].",
        )
        @click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=batch_size,
            show_default=True,
            help="Images per batch.",
        )
        @click.option(
            "--workers", type=click.IntRange(min=0), default=2, show_default=True,
            help="Image-decoding worker processes.",
        )  # fmt: skip
        @click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Feature cache folder [default: OUT/features].",
        )
        @click.option("--no-cache", is_flag=True, help="Neither read nor write cached features.")
        @click.option("--seed", type=int, default=0, show_default=True)
        @backbone_options
        @functools.wraps(func)
        def wrapper(**kw: Any) -> Any:
            resize_size = check_sizes(kw["image_size"], kw.pop("resize_size"))
            train, val = load_imagefolder(kw.pop("train_dir"), kw.pop("val_dir"))
            rank, world = init_distributed(kw["device"])
            console.quiet = console.quiet or rank != 0  # only rank 0 talks
            try:
                seed = kw.pop("seed")
                torch.manual_seed(seed)  # the same random init on every rank
                backbone = load_backbone_from_options(
                    kw.pop("backbone"),
                    kw.pop("weights"),
                    kw.pop("checkpoint_key"),
                    kw.pop("random_init"),
                    kw.pop("pos_embed"),
                    kw.pop("device"),
                )
                out_dir = kw.pop("out_dir")
                cache_dir = kw.pop("cache_dir") or out_dir / "features"
                run = BaselineRun(
                    backbone,
                    train,
                    val,
                    out_dir,
                    kw.pop("image_size"),
                    resize_size,
                    kw.pop("batch_size"),
                    kw.pop("workers"),
                    None if kw.pop("no_cache") else cache_dir,
                    seed,
                    rank,
                    world,
                )
                return func(run=run, **kw)
            finally:
                if world > 1 and dist.is_initialized():
                    dist.destroy_process_group()

        return wrapper

    return decorate


def _accuracy_table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    return table


def _parse_ks(values: tuple[int, ...]) -> list[int]:
    return sorted(set(values)) if values else list(DEFAULT_KS)


@click.command("knn")
@click.option(
    "--k",
    "ks",
    type=click.IntRange(min=1),
    multiple=True,
    help="Neighbour counts, repeatable [default: 10 20 100 200].",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TEMPERATURE,
    show_default=True,
)
@click.option(
    "--memory-budget-mb",
    type=click.FloatRange(min=1),
    default=DEFAULT_MEMORY_BUDGET_MB,
    show_default=True,
    help="Largest similarity chunk (val x train) held at once.",
)
@baseline_options(batch_size=64)
def knn(run: BaselineRun, ks: tuple[int, ...], temperature: float, memory_budget_mb: float) -> None:
    """Weighted k-NN on CLS features (reference protocol): top-1/top-5 for every k."""
    spec = FeatureSpec(n_last_blocks=1, avgpool=False)
    start = time.perf_counter()
    with run.progress() as progress:
        train_features = run.features("train", spec, progress)
        val_features = run.features("val", spec, progress)
    feature_seconds = time.perf_counter() - start
    scores = knn_evaluate(
        train_features,
        run.train.labels,
        val_features,
        run.val.labels,
        len(run.train.classes),
        _parse_ks(ks),
        temperature,
        memory_budget_mb,
    )
    if not run.main_process:
        return
    results = {
        "command": "knn",
        **run.describe(),
        "temperature": temperature,
        "feature_seconds": feature_seconds,
        "results": [asdict(score) for score in scores],
    }
    write_json(run.out_dir / "knn.json", results)
    rows = [[s.k, s.k_used, s.top1, s.top5] for s in scores]
    console.print(_accuracy_table("k-NN", ["k", "k used", "top-1 %", "top-5 %"], rows))
    if any(s.k_used < s.k for s in scores):
        console.print(f"k capped at the {len(run.train)} training images.")
    console.print(f"Results: {run.out_dir / 'knn.json'}")


@click.command("linear")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=0.001,
    show_default=True,
    help="Base learning rate per 256 images (scaled by the global batch size / 256).",
)
@click.option(
    "--fast",
    is_flag=True,
    help="Train on precomputed center-crop features (no augmentation; one feature pass).",
)
@click.option(
    "--n-last-blocks",
    type=click.IntRange(min=1),
    default=None,
    help="CLS tokens of this many last blocks [default: 4, or 1 for ViT-B-sized models].",
)
@click.option(
    "--avgpool/--no-avgpool",
    default=None,
    help="Add the mean patch token of the last block [default: only for ViT-B-sized models].",
)
@baseline_options(batch_size=256)
def linear(
    run: BaselineRun,
    epochs: int,
    lr: float,
    fast: bool,
    n_last_blocks: int | None,
    avgpool: bool | None,
) -> None:
    """Linear probe of the frozen backbone (reference protocol, or --fast on cached features)."""
    reference = default_spec(run.backbone)
    spec = FeatureSpec(
        n_last_blocks if n_last_blocks is not None else reference.n_last_blocks,
        avgpool if avgpool is not None else reference.avgpool,
    )
    spec.check(run.backbone)
    config = LinearConfig(epochs=epochs, batch_size=run.batch_size, lr=lr, fast=fast, seed=run.seed)
    start = time.perf_counter()
    with run.progress() as progress:
        train_features = run.features("train", spec, progress) if fast else None
        val_features = run.features("val", spec, progress)
        epoch_task = progress.add_task("Linear probe epochs", total=epochs)

        def on_epoch(record: dict[str, float]) -> None:
            progress.advance(epoch_task)
            if run.main_process:
                progress.console.print(
                    f"epoch {record['epoch']:>3}: loss {record['loss']:.4f}  "
                    f"top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}"
                )

        result = train_linear_probe(
            run.backbone,
            run.train,
            train_features,
            val_features,
            run.val.labels,
            spec,
            config,
            run.image_size,
            run.workers,
            progress,
            on_epoch,
        )
    if not run.main_process:
        return
    classifier_path = run.out_dir / "linear_classifier.safetensors"
    metadata = {
        **run.describe(),
        **asdict(spec),
        "classes": list(run.train.classes),
        "epoch": result.best_epoch,
        "top1": result.best_top1,
    }
    save_classifier(classifier_path, result.best_state, metadata)
    results = {
        "command": "linear",
        **run.describe(),
        "mode": "fast" if fast else "reference",
        "features": asdict(spec),
        "config": asdict(config),
        "lr_scaled": config.scaled_lr(1 if fast else run.world),
        "seconds": time.perf_counter() - start,
        "classifier": str(classifier_path),
        **result.summary(),
    }
    write_json(run.out_dir / "linear.json", results)
    rows = [[result.best_epoch, result.best_top1, result.best_top5, results["final_top1"]]]
    console.print(
        _accuracy_table(
            f"Linear probe ({results['mode']})",
            ["best epoch", "top-1 %", "top-5 %", "final top-1 %"],
            rows,
        )
    )
    console.print(f"Results: {run.out_dir / 'linear.json'}; classifier: {classifier_path}")


@click.command("transfer")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="AdamW learning rate of the new head.",
)
@click.option(
    "--backbone-lr-scale",
    type=click.FloatRange(min=0),
    default=0.1,
    show_default=True,
    help="Backbone learning rate = lr * this.",
)
@click.option(
    "--layer-decay",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="Layer-wise lr decay per block from the top (1: off).",
)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option(
    "--linear/--no-linear",
    "compare_linear",
    default=True,
    show_default=True,
    help="Also run a linear-only transfer (frozen backbone, same schedule) for comparison.",
)
@click.option(
    "--save-model", is_flag=True, help="Save the fine-tuned backbone and head (safetensors)."
)
@baseline_options(batch_size=32)
def transfer(
    run: BaselineRun,
    epochs: int,
    lr: float,
    backbone_lr_scale: float,
    layer_decay: float,
    weight_decay: float,
    warmup_epochs: float,
    compare_linear: bool,
    save_model: bool,
) -> None:
    """Fine-tune the backbone with a new linear head (and a linear-only run to compare)."""
    config = TransferConfig(
        epochs=epochs,
        batch_size=run.batch_size,
        lr=lr,
        backbone_lr_scale=backbone_lr_scale,
        layer_decay=layer_decay,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        seed=run.seed,
    )
    summaries = {}
    start = time.perf_counter()
    modes = [True, False] if compare_linear else [True]
    model = None
    with run.progress() as progress:
        for finetune in modes:
            label = "finetune" if finetune else "linear"

            def on_epoch(record: dict[str, float], label: str = label) -> None:
                if run.main_process:
                    progress.console.print(
                        f"{label} epoch {record['epoch']:>3}: loss {record['loss']:.4f}  "
                        f"top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}"
                    )

            result, trained = train_transfer(
                run.backbone,
                run.train,
                run.val,
                config,
                finetune,
                run.image_size,
                run.resize_size,
                run.workers,
                progress,
                on_epoch,
            )
            summaries[label] = result.summary()
            if finetune:
                model = trained
    if not run.main_process:
        return
    results = {
        "command": "transfer",
        **run.describe(),
        "config": asdict(config),
        "seconds": time.perf_counter() - start,
        **summaries,
    }
    if save_model and model is not None:
        from dino_vos.checkpoints import save_backbone_safetensors

        path = run.out_dir / "finetuned_backbone.safetensors"
        save_backbone_safetensors(model.backbone.vit.state_dict(), path, model.backbone.arch or {})
        save_classifier(
            run.out_dir / "finetuned_head.safetensors",
            model.head.state_dict(),
            {**run.describe(), "classes": list(run.train.classes)},
        )
        results["model"] = str(path)
    write_json(run.out_dir / "transfer.json", results)
    rows = [
        [label, s["final_top1"], s["final_top5"], s["best_top1"], s["best_epoch"]]
        for label, s in summaries.items()
    ]
    console.print(
        _accuracy_table(
            "Transfer",
            ["run", "final top-1 %", "final top-5 %", "best top-1 %", "best epoch"],
            rows,
        )
    )
    console.print(f"Results: {run.out_dir / 'transfer.json'}")
