"""``dino-vos eval knn|linear|transfer``: image baselines of a backbone on an ImageFolder.

Each command reads ``--train DIR`` and ``--val DIR`` (``<class>/<images>``), runs one baseline of
:mod:`dino_vos.eval.image.baselines` (which writes ``OUT/<command>.json``) and prints a table. Under
``torchrun`` every rank extracts its share of the features; rank 0 prints and writes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dino_vos.cli.options import FiniteFloat, IntRange, deprecated_alias, with_backbone_spec
from dino_vos.console import console
from dino_vos.defaults import IMAGE_SIZE, KNN_KS, KNN_MEMORY_BUDGET_MB, KNN_TEMPERATURE
from dino_vos.errors import InputError
from dino_vos.limits import (
    MAX_IMAGE_BATCH,
    MAX_IMAGE_SIZE,
    MAX_WORKERS,
    check_memory,
    frame_memory_bytes,
)
from dino_vos.spec import BackboneSpec

if TYPE_CHECKING:
    from dino_vos.eval.image.baselines import BaselineRun


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
            type=IntRange(min=8, max=MAX_IMAGE_SIZE),
            default=IMAGE_SIZE,
            show_default=True,
            help="Crop size fed to the backbone.",
        )
        @click.option(
            "--resize-size",
            type=IntRange(min=8, max=MAX_IMAGE_SIZE),
            default=None,
            help="Short side before the center crop [default: image size * 256/224].",
        )
        @click.option(
            "--batch-size",
            type=IntRange(min=1, max=MAX_IMAGE_BATCH),
            default=batch_size,
            show_default=True,
            help="Images per batch.",
        )
        @click.option(
            "--decode-workers", "workers", type=IntRange(min=0, max=MAX_WORKERS), default=2,
            show_default=True, help="Image-decoding worker processes (DataLoader workers).",
        )  # fmt: skip
        @deprecated_alias(
            "--workers", "--decode-workers", "workers", type=IntRange(min=0, max=MAX_WORKERS)
        )
        @click.option(
            "--cache",
            "cache_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Feature cache folder [default: OUT/features].",
        )
        @deprecated_alias(
            "--cache-dir", "--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path)
        )
        @click.option("--no-cache", is_flag=True, help="Neither read nor write cached features.")
        @with_backbone_spec(short_side=None, seed=True)
        @functools.wraps(func)
        def wrapper(spec: BackboneSpec, **kw: Any) -> Any:
            for split in ("train", "val"):  # checked before torch loads
                folder = kw[f"{split}_dir"]
                if not folder.is_dir():
                    raise InputError(
                        f"{split} folder not found: {folder} (expected {split}/<class>/<images>)"
                    )
            size, batch = kw["image_size"], kw["batch_size"]
            check_memory(
                frame_memory_bytes(size, size, 16, batch),
                f"--image-size {size} with --batch-size {batch}",
                "lower --image-size or --batch-size",
            )
            from dino_vos.eval.image.baselines import open_baseline_run

            out_dir = kw.pop("out_dir")
            cache_dir = kw.pop("cache_dir") or out_dir / "features"
            with open_baseline_run(
                spec,
                kw.pop("train_dir"),
                kw.pop("val_dir"),
                out_dir,
                kw.pop("image_size"),
                kw.pop("resize_size"),
                kw.pop("batch_size"),
                kw.pop("workers"),
                None if kw.pop("no_cache") else cache_dir,
            ) as run:
                return func(run=run, **kw)

        return wrapper

    return decorate


def _accuracy_table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    return table


@click.command("knn")
@click.option(
    "--k",
    "ks",
    type=IntRange(min=1),
    multiple=True,
    help=f"Neighbour counts, repeatable [default: {' '.join(map(str, KNN_KS))}].",
)
@click.option(
    "--temperature",
    type=FiniteFloat(min=0, min_open=True),
    default=KNN_TEMPERATURE,
    show_default=True,
)
@click.option(
    "--memory-budget-mb",
    type=FiniteFloat(min=1),
    default=KNN_MEMORY_BUDGET_MB,
    show_default=True,
    help="Largest similarity chunk (val x train) held at once.",
)
@baseline_options(batch_size=64)
def knn(run: BaselineRun, ks: tuple[int, ...], temperature: float, memory_budget_mb: float) -> None:
    """Weighted k-NN on CLS features (reference protocol): top-1/top-5 for every k."""
    from dino_vos.eval.image.baselines import run_knn

    results = run_knn(run, ks or KNN_KS, temperature, memory_budget_mb)
    if results is None:
        return
    scores = results["results"]
    rows = [[s["k"], s["k_used"], s["top1"], s["top5"]] for s in scores]
    console.print(_accuracy_table("k-NN", ["k", "k used", "top-1 %", "top-5 %"], rows))
    if any(s["k_used"] < s["k"] for s in scores):
        console.print(f"k capped at the {len(run.train)} training images.")
    console.print(f"Results: {run.out_dir / 'knn.json'}")


@click.command("linear")
@click.option("--epochs", type=IntRange(min=1), default=100, show_default=True)
@click.option(
    "--lr",
    type=FiniteFloat(min=0, min_open=True),
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
    type=IntRange(min=1),
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
    from dino_vos.eval.image.baselines import run_linear

    results = run_linear(run, epochs, lr, fast, n_last_blocks, avgpool)
    if results is None:
        return
    rows = [
        [results["best_epoch"], results["best_top1"], results["best_top5"], results["final_top1"]]
    ]
    console.print(
        _accuracy_table(
            f"Linear probe ({results['mode']})",
            ["best epoch", "top-1 %", "top-5 %", "final top-1 %"],
            rows,
        )
    )
    console.print(f"Results: {run.out_dir / 'linear.json'}; classifier: {results['classifier']}")


@click.command("transfer")
@click.option("--epochs", type=IntRange(min=1), default=10, show_default=True)
@click.option(
    "--lr",
    type=FiniteFloat(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="AdamW learning rate of the new head.",
)
@click.option(
    "--backbone-lr-scale",
    type=FiniteFloat(min=0),
    default=0.1,
    show_default=True,
    help="Backbone learning rate = lr * this.",
)
@click.option(
    "--layer-decay",
    type=FiniteFloat(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="Layer-wise lr decay per block from the top (1: off).",
)
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.05, show_default=True)
@click.option("--warmup-epochs", type=FiniteFloat(min=0), default=1.0, show_default=True)
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
    from dino_vos.eval.image.baselines import run_transfer
    from dino_vos.eval.image.transfer import TransferConfig

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
    results = run_transfer(run, config, compare_linear, save_model)
    if results is None:
        return
    labels = [label for label in ("finetune", "linear") if label in results]
    rows = [
        [
            label,
            results[label]["final_top1"],
            results[label]["final_top5"],
            results[label]["best_top1"],
            results[label]["best_epoch"],
        ]
        for label in labels
    ]
    console.print(
        _accuracy_table(
            "Transfer",
            ["run", "final top-1 %", "final top-5 %", "best top-1 %", "best epoch"],
            rows,
        )
    )
    console.print(f"Results: {run.out_dir / 'transfer.json'}")
