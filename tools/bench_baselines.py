"""Image baselines on a small real ImageFolder built from DAVIS-2016 train (prints JSON).

python tools/bench_baselines.py [--backbone dino_vits16] [--weights TEACHER.pth]
    [--stride 4] [--image-size 224] [--linear-epochs 100] [--linear-reference-epochs 0]
    [--transfer-epochs 2] [--transfer-image-size 112]

Classes are the 30 sequences of ``../shared/data/davis2016-train-240p`` (first half of each
sequence's frames -> train, second half -> val, every ``--stride``-th frame; see
``tools/make_davis_imagefolder.py``). Without ``--weights`` the backbone is random-init; with
``--weights`` (e.g. a ``cpu_tiny`` teacher) the file's backbone is measured and, unless
``--no-random-baseline``, a random-init copy of the same architecture as well.

Per backbone: features/s of the frozen forward (eval transform, batch ``--batch-size``), k-NN
top-1/top-5 for k in 10/20/100/200 on the last CLS token, the linear probe in fast mode on the
reference features (4 last CLS tokens, or CLS + mean patch for ViT-B), swept over a few base
learning rates (the reference 0.001 under-trains a few hundred images; the best on val is
reported, as linear-probe sweeps do) and, optionally, in the reference mode (augmented views
every epoch, at the best lr), then transfer: fine-tuning and linear-only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

from dino_vos.backbones import Backbone, load_backbone
from dino_vos.eval.image.image_features import FeatureSpec, extract_image_features
from dino_vos.eval.image.imagefolder import ImageFolderSplit, load_imagefolder
from dino_vos.eval.image.knn import knn_evaluate
from dino_vos.eval.image.linear import LinearConfig, default_spec, train_linear_probe
from dino_vos.eval.image.transfer import TransferConfig, train_transfer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_davis_imagefolder import DEFAULT_SRC, build  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="DAVIS root.")
    parser.add_argument("--data", type=Path, default=None, help="Existing ImageFolder root.")
    parser.add_argument("--stride", type=int, default=4, help="Keep every N-th frame.")
    parser.add_argument("--backbone", default=None, help="[default: dino_vits16]")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--no-random-baseline", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument(
        "--linear-lrs",
        default="0.001,0.01,0.1,1",
        help="Base lrs per 256 images swept in fast mode (0.001 is the reference).",
    )
    parser.add_argument("--linear-batch-size", type=int, default=256)
    parser.add_argument("--linear-reference-epochs", type=int, default=0)
    parser.add_argument("--transfer-epochs", type=int, default=2)
    parser.add_argument("--transfer-image-size", type=int, default=112)
    parser.add_argument("--transfer-batch-size", type=int, default=16)
    parser.add_argument("--transfer-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_copy(backbone: Backbone) -> Backbone:
    """A random-init backbone with the same architecture (from its recorded ``arch``)."""
    arch = backbone.arch or {"model": "vit_small_patch16_224", "kwargs": {}}
    vit = timm.create_model(
        arch["model"], pretrained=False, num_classes=0, dynamic_img_size=True, **arch["kwargs"]
    )
    name = backbone.name.replace(" (random init)", "")
    return Backbone(vit, f"{name} (random init)", backbone.pos_embed_mode, arch).eval()


def last_cls(features: torch.Tensor, spec: FeatureSpec, dim: int) -> torch.Tensor:
    """The last block's CLS token out of reference linear features."""
    if spec.avgpool and spec.n_last_blocks == 1:
        return features[:, 0::2]
    return features[:, (spec.n_last_blocks - 1) * dim : spec.n_last_blocks * dim]


def compact(history: list[dict[str, float]]) -> list[float]:
    return [round(record["top1"], 2) for record in history]


def bench_backbone(
    backbone: Backbone, train: ImageFolderSplit, val: ImageFolderSplit, args: argparse.Namespace
) -> dict[str, Any]:
    """k-NN, linear probe and transfer numbers of one backbone."""
    torch.manual_seed(args.seed)
    spec = default_spec(backbone)
    start = time.perf_counter()
    feats = {
        name: extract_image_features(
            backbone, split, spec, args.image_size, batch_size=args.batch_size,
            workers=args.workers,
        )
        for name, split in (("train", train), ("val", val))
    }  # fmt: skip
    feature_seconds = time.perf_counter() - start
    report: dict[str, Any] = {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "patch_size": backbone.patch_size,
        "embed_dim": backbone.embed_dim,
        "depth": backbone.depth,
        "features_per_second": round((len(train) + len(val)) / feature_seconds, 2),
        "feature_seconds": round(feature_seconds, 1),
    }
    classes = len(train.classes)
    scores = knn_evaluate(
        last_cls(feats["train"], spec, backbone.embed_dim),
        train.labels,
        last_cls(feats["val"], spec, backbone.embed_dim),
        val.labels,
        classes,
    )
    report["knn"] = {
        f"k{s.k}": {"top1": round(s.top1, 2), "top5": round(s.top5, 2)} for s in scores
    }
    report["knn_k_used"] = {f"k{s.k}": s.k_used for s in scores}
    start = time.perf_counter()
    by_lr = {}
    for lr in (float(v) for v in args.linear_lrs.split(",")):
        config = LinearConfig(
            epochs=args.linear_epochs, batch_size=args.linear_batch_size, lr=lr, fast=True
        )
        fast = train_linear_probe(
            backbone, train, feats["train"], feats["val"], val.labels, spec, config
        )
        by_lr[lr] = {
            "best_top1": round(fast.best_top1, 2),
            "best_top5": round(fast.best_top5, 2),
            "best_epoch": fast.best_epoch,
            "final_top1": round(fast.history[-1]["top1"], 2),
        }
    best_lr = max(by_lr, key=lambda lr: by_lr[lr]["best_top1"])
    report["linear_fast"] = {
        "features": {"n_last_blocks": spec.n_last_blocks, "avgpool": spec.avgpool},
        "best_lr": best_lr,
        **by_lr[best_lr],
        "by_lr": by_lr,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.linear_reference_epochs > 0:
        start = time.perf_counter()
        config = LinearConfig(
            epochs=args.linear_reference_epochs,
            batch_size=args.linear_batch_size,
            lr=best_lr,
        )
        ref = train_linear_probe(
            backbone, train, None, feats["val"], val.labels, spec, config, args.image_size,
            args.workers,
        )  # fmt: skip
        report["linear_reference"] = {
            "lr": best_lr,
            "best_top1": round(ref.best_top1, 2),
            "top1_per_epoch": compact(ref.history),
            "seconds": round(time.perf_counter() - start, 1),
        }
    if args.transfer_epochs > 0:
        config_t = TransferConfig(
            epochs=args.transfer_epochs,
            batch_size=args.transfer_batch_size,
            lr=args.transfer_lr,
            seed=args.seed,
        )
        report["transfer"] = {}
        for finetune in (True, False):
            start = time.perf_counter()
            result, _ = train_transfer(
                backbone, train, val, config_t, finetune, args.transfer_image_size,
                workers=args.workers,
            )  # fmt: skip
            summary = result.summary()
            report["transfer"][result.mode] = {
                "final_top1": round(summary["final_top1"], 2),  # type: ignore[arg-type]
                "top1_per_epoch": compact(result.history),
                "seconds": round(time.perf_counter() - start, 1),
            }
    return report


def main() -> None:
    args = parse_args()
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_baselines_") as tmp:
        if args.data is None:
            if not args.src.is_dir():
                print(json.dumps({"skipped": f"DAVIS data not found at {args.src}"}))
                return
            args.data = Path(tmp) / "imagefolder"
            build(args.src, args.data, stride=max(1, args.stride))
        train, val = load_imagefolder(args.data / "train", args.data / "val")
        torch.manual_seed(args.seed)
        if args.weights is not None:
            backbones = [load_backbone(args.backbone, weights=args.weights)]
            if not args.no_random_baseline:
                torch.manual_seed(args.seed)
                backbones.append(random_copy(backbones[0]))
        else:
            backbones = [load_backbone(args.backbone or "dino_vits16", pretrained=False)]
        runs = [bench_backbone(backbone, train, val, args) for backbone in backbones]
    print(
        json.dumps(
            {
                "data": {
                    "source": str(args.src),
                    "stride": args.stride,
                    "classes": len(train.classes),
                    "train_images": len(train),
                    "val_images": len(val),
                },
                "settings": {
                    k: v for k, v in vars(args).items() if k not in ("src", "data", "weights")
                },
                "torch_threads": torch.get_num_threads(),
                "runs": runs,
                "total_seconds": round(time.perf_counter() - total_start, 1),
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
