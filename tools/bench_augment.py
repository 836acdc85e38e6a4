"""Multi-crop data pipeline speed and pixels: dino-vos against the official DataAugmentationDINO.

    python tools/bench_augment.py --dino-src DIR [--images 200] [--rounds 2] [--local-crops 10]

``DIR`` is a checkout (or bare git dir) of github.com/facebookresearch/dino: its ``main_dino.py``
``DataAugmentationDINO`` on torchvision's ``ImageFolder`` is the anchor, imported from there at
run time. Both pipelines read the same JPEG files from disk and make 2 global 224 px + N local
96 px crops per image, in one process with one thread (torch, OpenCV), interleaved in rounds so
that both see the same machine load. Speed is images per CPU-second of the process (its CPU
time, not the wall time), so other jobs on the machine matter less. Image sets: DAVIS 854x480
frames from ``../shared/data/davis2016-val-dev`` and the same frames resized to 500x375
(ImageNet-like; JPEG quality 90), written to a temp folder.

Also printed: per-operation timings and pixel differences (the same operation with the same
parameters on the same 224 px crop; mean and max absolute difference in 0..255 levels and the
share of values differing by more than 1), and what a 10-core-per-GPU node would feed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from official_dino import import_official, official_source  # tools/official_dino.py
from PIL import Image, ImageFilter, ImageOps
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from dino_vos.pretrain import augment
from dino_vos.pretrain.augment import MultiCropAugmentation
from dino_vos.pretrain.data import MultiCropDataset, scan_paths

REPO_ROOT = Path(__file__).resolve().parents[1]
DAVIS = REPO_ROOT.parent / "shared" / "data" / "davis2016-val-dev" / "JPEGImages" / "480p"
CORES_PER_GPU = 10


def _image_sets(count: int, scratch: Path) -> dict[str, Path]:
    """ImageFolder layouts (one class folder): DAVIS frames linked, and their 500x375 resize."""
    frames = sorted(DAVIS.glob("*/*.jpg"))
    if not frames:
        raise SystemExit(f"no DAVIS frames under {DAVIS}")
    frames = frames[:: max(1, len(frames) // count)][:count]
    sets = {
        "davis_854x480": scratch / "davis" / "all",
        "imagenet_like_500x375": scratch / "small" / "all",
    }
    for folder in sets.values():
        folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        (sets["davis_854x480"] / f"{index:05d}.jpg").symlink_to(frame)
        small = Image.open(frame).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
        small.save(sets["imagenet_like_500x375"] / f"{index:05d}.jpg", quality=90)
    return {name: folder.parent for name, folder in sets.items()}


def _cpu_seconds(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def _speed(official: Any, root: Path, local_crops: int, rounds: int) -> dict[str, Any]:
    reference = ImageFolder(
        str(root), transform=official.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), local_crops)
    )
    ours = MultiCropDataset(scan_paths([root]).samples, MultiCropAugmentation(224, 96, local_crops))
    count = len(reference)
    assert len(ours) == count and len(ours[(0, 0)][0]) == 2 + local_crops
    assert len(reference[0][0]) == 2 + local_crops
    seconds = {"official": 0.0, "dino_vos": 0.0}
    for round_index in range(rounds):
        seconds["official"] += _cpu_seconds(lambda: [reference[i] for i in range(count)])
        seconds["dino_vos"] += _cpu_seconds(
            lambda r=round_index: [ours[(i, r * count + i)] for i in range(count)]
        )
    rates = {name: rounds * count / value for name, value in seconds.items()}
    return {
        "images": count,
        "rounds": rounds,
        "images_per_cpu_s": {name: round(rate, 1) for name, rate in rates.items()},
        "speedup": round(rates["dino_vos"] / rates["official"], 2),
        f"images_per_s_{CORES_PER_GPU}_cores": {
            name: round(CORES_PER_GPU * rate) for name, rate in rates.items()
        },
    }


def _timed(run: Callable[[], Any], repeat: int = 20) -> tuple[Any, float]:
    start = time.process_time()
    for _ in range(repeat):
        result = run()
    return result, (time.process_time() - start) / repeat * 1e3


def _compare(theirs: Image.Image | np.ndarray, ours: np.ndarray) -> dict[str, float]:
    difference = np.abs(np.asarray(theirs, dtype=np.int16) - ours.astype(np.int16))
    return {
        "mean_abs": round(float(difference.mean()), 4),
        "max_abs": int(difference.max()),
        "share_over_1": round(float((difference > 1).mean()), 5),
    }


def _operations(frame: Path) -> dict[str, Any]:
    """The same operation with the same parameters on the same crop: Pillow (as the reference
    transforms call it) against dino-vos; ms per 224 px crop and pixel differences."""
    picture = Image.open(frame).convert("RGB")
    box = (120, 40, 520, 440)
    ops: list[tuple[str, Callable[[Image.Image], Any], Callable[[np.ndarray], np.ndarray]]] = [
        (
            "brightness_1.3",
            lambda p: TF.adjust_brightness(p, 1.3),
            lambda a: augment.adjust_brightness(a, 1.3),
        ),
        (
            "contrast_0.7",
            lambda p: TF.adjust_contrast(p, 0.7),
            lambda a: augment.adjust_contrast(a, 0.7),
        ),
        (
            "saturation_1.15",
            lambda p: TF.adjust_saturation(p, 1.15),
            lambda a: augment.adjust_saturation(a, 1.15),
        ),
        ("hue_+0.07", lambda p: TF.adjust_hue(p, 0.07), lambda a: augment.adjust_hue(a, 0.07)),
        ("hue_-0.09", lambda p: TF.adjust_hue(p, -0.09), lambda a: augment.adjust_hue(a, -0.09)),
        ("grayscale", lambda p: TF.rgb_to_grayscale(p, 3), augment.to_grayscale),
        ("flip", TF.hflip, lambda a: cv2.flip(a, 1)),
        ("solarize", ImageOps.solarize, augment.solarize),
    ]
    for sigma in (0.5, 1.0, 2.0):
        ops.append(
            (
                f"blur_sigma_{sigma}",
                lambda p, s=sigma: p.filter(ImageFilter.GaussianBlur(radius=s)),
                lambda a, s=sigma: augment.gaussian_blur(a, s),
            )
        )
    size = (224, 224)
    crop_theirs, ms_theirs = _timed(
        lambda: picture.crop(box).resize(size, Image.Resampling.BICUBIC)
    )
    chw = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    crop_box = (box[1], box[0], box[3] - box[1], box[2] - box[0])  # top, left, height, width
    crop_ours, ms_ours = _timed(lambda: augment.resized_crop(chw, crop_box, 224))
    rows = {
        "crop_resize_400_to_224": {
            "ms_official": round(ms_theirs, 3),
            "ms_dino_vos": round(ms_ours, 3),
            **_compare(crop_theirs, crop_ours),
        }
    }
    base = np.array(crop_theirs)
    for name, theirs_op, ours_op in ops:
        theirs, ms_theirs = _timed(lambda op=theirs_op: op(crop_theirs))
        ours, ms_ours = _timed(lambda op=ours_op: op(base))
        rows[name] = {
            "ms_official": round(ms_theirs, 3),
            "ms_dino_vos": round(ms_ours, 3),
            **_compare(theirs, ours),
        }
    tensor_theirs, ms_theirs = _timed(
        lambda: TF.normalize(TF.to_tensor(crop_theirs), augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    )
    tensor_ours, ms_ours = _timed(lambda: augment._Normalizer()(base))
    rows["to_tensor_normalize"] = {
        "ms_official": round(ms_theirs, 3),
        "ms_dino_vos": round(ms_ours, 3),
        "max_abs_float": float((tensor_theirs - tensor_ours).abs().max()),
    }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dino-src", type=Path, required=True)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-crops", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        official = import_official(official_source(args.dino_src, Path(tmp)))
        sets = _image_sets(args.images, Path(tmp))
        speed = {
            name: _speed(official, root, args.local_crops, args.rounds)
            for name, root in sets.items()
        }
        operations = _operations(next(iter((sets["davis_854x480"] / "all").iterdir())))
    report = {
        "bench": "augment",
        "crops": {"global": [2, 224], "local": [args.local_crops, 96]},
        "threads": 1,
        "speed": speed,
        "operations": operations,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
