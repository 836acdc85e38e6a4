"""The image baselines of a backbone on an ImageFolder: k-NN, linear probe, transfer.

:func:`open_baseline_run` reads ``train``/``val`` (``<class>/<images>``), joins the ``torchrun``
group and builds the backbone from a :class:`~dino_vos.spec.BackboneSpec`; :func:`run_knn`,
:func:`run_linear` and :func:`run_transfer` each run one algorithm (:mod:`~dino_vos.eval.image.knn`,
:mod:`~dino_vos.eval.image.linear`, :mod:`~dino_vos.eval.image.transfer`) and write
``OUT/<baseline>.json`` atomically on rank 0, returning its content (None on other ranks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from dino_vos.atomic import atomic_write_json
from dino_vos.backbones import Backbone
from dino_vos.console import console, progress_bar
from dino_vos.defaults import KNN_KS, KNN_MEMORY_BUDGET_MB, KNN_TEMPERATURE
from dino_vos.distributed import cleanup, init_distributed
from dino_vos.errors import InputError, param
from dino_vos.eval.image.image_features import FeatureSpec, cached_image_features
from dino_vos.eval.image.imagefolder import ImageFolderSplit, check_sizes, load_imagefolder
from dino_vos.eval.image.knn import knn_evaluate
from dino_vos.eval.image.linear import (
    LinearConfig,
    default_spec,
    save_classifier,
    train_linear_probe,
)
from dino_vos.eval.image.transfer import TransferConfig, train_transfer
from dino_vos.features import backbone_settings
from dino_vos.outputs import (
    check_not_an_input,
    check_not_locked,
    check_writable,
    locked_output_on_main_rank,
)
from dino_vos.spec import BackboneSpec


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

    def progress(self, unit: str = "images") -> Progress:
        """A rich progress bar on rank 0, a disabled one elsewhere."""
        bar = progress_bar(unit)
        bar.disable = not self.main_process
        return bar

    def features(self, split: str, spec: FeatureSpec, progress: Any = None) -> torch.Tensor:
        return cached_image_features(
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
            **backbone_settings(self.backbone),
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


@contextmanager
def open_baseline_run(
    spec: BackboneSpec,
    train_dir: Path,
    val_dir: Path,
    out_dir: Path,
    image_size: int,
    resize_size: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    cache_dir: Path | None = None,
) -> Iterator[BaselineRun]:
    """Check the data, join the process group, build the backbone; leave the group at the end.

    ``cache_dir`` None disables the feature cache; the backbone that is built is reported.
    """
    resize_size = check_sizes(image_size, resize_size)
    train, val = load_imagefolder(train_dir, val_dir)
    inputs = [train_dir, val_dir]
    check_baseline_outputs(out_dir, cache_dir, inputs)
    with locked_output_on_main_rank(out_dir, inputs=inputs):  # one run per folder
        info = init_distributed(spec.device)
        console.quiet = console.quiet or not info.is_main  # only rank 0 talks
        try:
            backbone = spec.build_backbone(announce=True)
            yield BaselineRun(
                backbone,
                train,
                val,
                out_dir,
                image_size,
                resize_size,
                batch_size,
                workers,
                cache_dir,
                spec.seed,
                info.rank,
                info.world_size,
            )
        finally:
            cleanup(info)


def check_baseline_outputs(
    out_dir: Path, cache_dir: Path | None, inputs: Sequence[str | Path]
) -> None:
    """The output rules (:mod:`dino_vos.outputs`) for ``--out`` and the feature cache: neither
    is, lies inside or holds ``--train``/``--val``; both writable; ``--out`` not in use."""
    check_not_an_input(out_dir, inputs, "out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{param('out_dir', out_dir)} is a file: give a folder")
    check_not_locked(out_dir)
    check_writable(out_dir)
    if cache_dir is not None:
        check_not_an_input(cache_dir, inputs, "cache_dir")
        check_writable(cache_dir, "cache_dir")


def _epoch_printer(run: BaselineRun, progress: Progress, label: str = "epoch"):
    def on_epoch(record: dict[str, float]) -> None:
        if run.main_process:
            progress.console.print(
                f"{label} {record['epoch']:>3}: loss {record['loss']:.4f}  "
                f"top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}"
            )

    return on_epoch


def run_knn(
    run: BaselineRun,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    memory_budget_mb: float = KNN_MEMORY_BUDGET_MB,
) -> dict[str, Any] | None:
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
        sorted(set(ks)),
        temperature,
        memory_budget_mb,
    )
    if not run.main_process:
        return None
    results = {
        "command": "knn",
        **run.describe(),
        "temperature": temperature,
        "feature_seconds": feature_seconds,
        "results": [asdict(score) for score in scores],
    }
    atomic_write_json(run.out_dir / "knn.json", results)
    return results


def run_linear(
    run: BaselineRun,
    epochs: int = 100,
    lr: float = 0.001,
    fast: bool = False,
    n_last_blocks: int | None = None,
    avgpool: bool | None = None,
) -> dict[str, Any] | None:
    """Linear probe of the frozen backbone (reference protocol, or ``fast`` on cached features);
    also saves the best classifier as ``OUT/linear_classifier.safetensors``."""
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
        printer = _epoch_printer(run, progress)

        def on_epoch(record: dict[str, float]) -> None:
            progress.advance(epoch_task)
            printer(record)

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
        return None
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
    atomic_write_json(run.out_dir / "linear.json", results)
    return results


def run_transfer(
    run: BaselineRun,
    config: TransferConfig,
    compare_linear: bool = True,
    save_model: bool = False,
) -> dict[str, Any] | None:
    """Fine-tune the backbone with a new linear head (and a linear-only run to compare);
    ``save_model`` writes the fine-tuned backbone and head as safetensors."""
    summaries = {}
    start = time.perf_counter()
    modes = [True, False] if compare_linear else [True]
    model = None
    with run.progress() as progress:
        for finetune in modes:
            label = "finetune" if finetune else "linear"
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
                _epoch_printer(run, progress, f"{label} epoch"),
            )
            summaries[label] = result.summary()
            if finetune:
                model = trained
    if not run.main_process:
        return None
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
    atomic_write_json(run.out_dir / "transfer.json", results)
    return results
