"""Benchmark ``features`` and ``attention`` exports against the backbone forward alone.

Prints one JSON object: frames/s of each mode and the export overhead in percent of the forward
(goal: < 10%). Modes are interleaved frame by frame so that load from other processes on a
shared machine hits them alike. Uses DAVIS frames from ../shared/data when present, else a
generated 854x480 clip.

    python tools/bench_export.py [--backbone dino_vits8] [--frames 3] [--short-side 480]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dino_vos.attention import export_attention
from dino_vos.backbones import load_backbone
from dino_vos.export import FeatureExporter, export_features
from dino_vos.features import BackboneFeatures, ResizeSpec
from dino_vos.sources import open_source, read_image
from dino_vos.synthetic import make_clip

DAVIS_FRAMES = (
    Path(__file__).resolve().parents[2] / "shared/data/davis2016-val-dev/JPEGImages/480p/blackswan"
)


def frame_files(count: int, scratch: Path) -> list[Path]:
    """``count`` 854x480 JPEG frames: DAVIS blackswan when available, else generated."""
    if DAVIS_FRAMES.is_dir():
        return sorted(DAVIS_FRAMES.glob("*.jpg"))[:count]
    frames, _ = make_clip(num_frames=count, size=(480, 854)).write(scratch / "clip")
    return sorted(frames.glob("*.jpg"))


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dino_vits8")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--short-side", type=int, default=480)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, pretrained=False)
    features = BackboneFeatures(backbone, ResizeSpec(args.short_side))
    exporter = FeatureExporter(features)
    modes = ("forward", "features", "attention")
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        files = frame_files(args.frames, scratch)
        first = read_image(files[0])
        input_size = features.input_size(*first.shape[:2])
        with torch.inference_mode():
            backbone(features.preprocess(first)[None])  # warm-up
        for index, file in enumerate(files):
            image = read_image(file)

            def forward(image=image) -> None:
                with torch.inference_mode():
                    backbone(features.preprocess(image)[None])

            def features_mode(file=file, index=index) -> None:
                source = open_source(file, allow_image=True)
                export_features(source, scratch / f"features{index}", exporter)

            def attention_mode(file=file, index=index) -> None:
                source = open_source(file, allow_image=True)
                export_attention(source, scratch / f"attention{index}", features, threshold=0.6)

            for mode, run in zip(modes, (forward, features_mode, attention_mode), strict=True):
                wall, used = timed(run)
                seconds[mode].append(wall)
                cpu[mode].append(used)
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    median_cpu = {mode: statistics.median(values) for mode, values in cpu.items()}
    result = {
        "backbone": f"{args.backbone} (random init)",
        "frame_size": list(first.shape[:2]),
        "input_size": list(input_size),
        "frames": len(files),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "seconds_per_frame": {mode: [round(x, 3) for x in v] for mode, v in seconds.items()},
        "cpu_seconds_per_frame": {mode: [round(x, 3) for x in v] for mode, v in cpu.items()},
        "forward_fps": round(1 / median["forward"], 4),
        "features_fps": round(1 / median["features"], 4),
        "attention_fps": round(1 / median["attention"], 4),
        "features_overhead_pct": round(100 * (median["features"] / median["forward"] - 1), 1),
        "attention_overhead_pct": round(100 * (median["attention"] / median["forward"] - 1), 1),
        "features_cpu_overhead_pct": round(
            100 * (median_cpu["features"] / median_cpu["forward"] - 1), 1
        ),
        "attention_cpu_overhead_pct": round(
            100 * (median_cpu["attention"] / median_cpu["forward"] - 1), 1
        ),
        "goal_overhead_pct": 10,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
