"""Benchmark label propagation; prints JSON.

1. The propagation step alone at DAVIS 480p ViT-S/8 geometry (60 x 104 patches, 384-d, 8 context
   frames, 3 objects): the windowed engine against the dense reference formulation (full N x N
   affinity times a window mask), seconds per frame, peak extra memory (each variant in its own
   process) and whether the labels are identical.
2. A sweep point over cached features: a generated 854 x 480 clip propagated with
   ``propagate_to_folder`` from random (fp16, as cached) features, so no backbone runs. Time in
   the propagation engine against everything else of the pipeline (post-processing
   ``labels_from_soft``, resizing to the frame size, PNG writing, frame decoding, bookkeeping).
3. End to end (features + propagation + writing) with a random-init ViT-S/8 on 480p frames:
   seconds per frame and the share spent outside the backbone forward.
4. ``--batch-sizes 1,4``: frames/s of the feature path (background decoding + backbone) per
   batch size, and the largest feature difference to batch 1.

    python tools/bench_propagate.py [--frames 5] [--sweep-frames 10] [--skip-dense]
                                    [--skip-sweep] [--skip-e2e] [--batch-sizes 1,4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dino_vos.sources import Frame

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GRID, DIM, CONTEXT, CLASSES = (60, 104), 384, 8, 4


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _step_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    target = F.normalize(torch.randn(*GRID, DIM, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(CONTEXT, *GRID, DIM, generator=generator), dim=-1)
    labels = torch.softmax(3 * torch.randn(CONTEXT, CLASSES, *GRID, generator=generator), 1)
    return target, keys, labels


def inner(variant: str, repeats: int) -> dict:
    """Time one variant in this process; report seconds per step and peak extra memory."""
    from dino_vos.dense_reference import dense_propagate, window_mask
    from dino_vos.propagation import LabelPropagator, PropagationConfig

    target, keys, labels = _step_inputs()
    baseline = _memory_kib("VmRSS")  # the engine's own copy of the context counts
    if variant == "windowed":
        # streaming, as in the pipeline: the context lives in the engine, each step pushes a frame
        engine = LabelPropagator(PropagationConfig(context=CONTEXT - 1))
        engine.reset(keys[0], labels[0])
        for frame_keys, frame_labels in zip(keys[1:], labels[1:], strict=True):
            engine.add_context(frame_keys, frame_labels)

        def step() -> torch.Tensor:
            return engine.step(target)
    else:
        mask = window_mask(*GRID, 12)

        def step() -> torch.Tensor:
            return dense_propagate(target, keys, labels, mask=mask)

    soft = step()  # warm-up; the labels compared (later steps see a shifted context)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    peak_mib = (_memory_kib("VmHWM") - baseline) / 1024
    labels_path = Path(tempfile.gettempdir()) / f"bench_propagate_{variant}.npy"
    np.save(labels_path, soft.argmax(0).numpy())
    return {"seconds_per_frame": seconds, "peak_extra_mib": peak_mib, "labels": str(labels_path)}


def run_inner(variant: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--inner", variant, "--repeats", str(repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench_step(skip_dense: bool) -> dict:
    windowed = run_inner("windowed", 5)
    result: dict = {
        "geometry": {"grid": list(GRID), "dim": DIM, "context_frames": CONTEXT, "objects": 3},
        "windowed": windowed,
    }
    if not skip_dense:
        dense = run_inner("dense", 2)
        same = np.array_equal(np.load(windowed["labels"]), np.load(dense["labels"]))
        result.update(
            dense=dense,
            speedup=dense["seconds_per_frame"] / windowed["seconds_per_frame"],
            memory_ratio=windowed["peak_extra_mib"] / max(dense["peak_extra_mib"], 1e-9),
            identical_labels=bool(same),
        )
    return result


class _Timers:
    """Seconds spent in named functions, by wrapping them where the pipeline looks them up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        self._restore.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)
        self._restore.clear()


class _CachedFeatures:
    """Feature extractor of a warm cache: fp16 features per frame name, looked up."""

    patch_size = 8

    def __init__(self, names: list[str], grid: tuple[int, int], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = {
            name: torch.randn(*grid, DIM, generator=generator).half().float() for name in names
        }

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        from dino_vos.spec import ResizeSpec

        return ResizeSpec().size_for(height, width, self.patch_size)

    def __call__(self, frame: Frame) -> torch.Tensor:
        return self.features[frame.name]


def bench_sweep_point(frames: int) -> dict:
    """Propagation over cached features of a generated 480p clip: engine vs everything else."""
    import dino_vos.predictor as predictor
    from dino_vos.api import propagate_to_folder
    from dino_vos.propagation import LabelPropagator
    from dino_vos.synthetic import make_clip
    from dino_vos.writers import OutputSink

    with tempfile.TemporaryDirectory() as tmp:
        frame_dir, mask_dir = make_clip(frames, (480, 854), 3, seed=0).write(Path(tmp) / "clip")
        names = sorted(path.stem for path in frame_dir.iterdir())
        extractor = _CachedFeatures(names, GRID)
        assert extractor.input_size(480, 854) == (GRID[0] * 8, GRID[1] * 8)
        timers = _Timers()
        for method in ("reset", "step", "predict"):
            timers.wrap(LabelPropagator, method, "propagation")
        timers.wrap(predictor, "labels_from_soft", "labels_from_soft")
        timers.wrap(predictor, "resize_labels", "resize_to_frame")
        timers.wrap(OutputSink, "write_mask", "png_write")
        try:
            summary = propagate_to_folder(
                frame_dir, mask_dir / "00000.png", Path(tmp) / "out", extractor
            )
        finally:
            timers.restore()
    total = summary.seconds  # the loop over frames: decode, features, engine, outputs
    seconds = dict(timers.seconds)
    seconds["other"] = total - sum(seconds.values())
    return {
        "input": f"generated 854x480 clip, {frames} frames, random fp16 {GRID[0]}x{GRID[1]}x{DIM}"
        " features (a warm cache), default propagation settings (the context fills up over the"
        " first 8 frames)",
        "frames": frames,
        "seconds_per_frame": total / frames,
        "propagation_seconds_per_step": seconds["propagation"] / (frames - 1),
        "seconds": {name: round(value, 4) for name, value in seconds.items()},
        "propagation_share": seconds["propagation"] / total,
        "outside_propagation_share": 1 - seconds["propagation"] / total,
    }


def _e2e_input(workdir: Path, frames: int) -> tuple[Path, Path, str]:
    sequence = SHARED / "davis2016-val-dev" / "JPEGImages" / "480p" / "blackswan"
    if sequence.is_dir():
        annotations = SHARED / "davis2016-val-dev" / "Annotations" / "480p" / "blackswan"
        return sequence, annotations / "00000.png", "davis2016-val-dev/blackswan"
    from dino_vos.synthetic import make_clip

    frame_dir, mask_dir = make_clip(frames, (480, 854), 3, seed=0).write(workdir / "clip")
    return frame_dir, mask_dir / "00000.png", "generated 854x480 clip"


def bench_end_to_end(frames: int) -> dict:
    from dino_vos.api import propagate_to_folder
    from dino_vos.backbones import load_backbone
    from dino_vos.features import BackboneFeatures
    from dino_vos.sources import open_source

    torch.manual_seed(0)
    backbone = load_backbone("dino_vits8", pretrained=False, device="cpu")
    extractor = BackboneFeatures(backbone)
    backbone_seconds = []
    original = extractor.embed

    def timed_embed(batch):
        start = time.perf_counter()
        out = original(batch)
        backbone_seconds.append(time.perf_counter() - start)
        return out

    extractor.embed = timed_embed  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        frame_dir, mask, label = _e2e_input(Path(tmp), frames)
        source = open_source(frame_dir, limit=frames)
        start = time.perf_counter()
        propagate_to_folder(source, mask, Path(tmp) / "out", extractor)
        total = time.perf_counter() - start
    per_frame = total / frames
    forward = sum(backbone_seconds) / frames
    return {
        "input": label,
        "frames": frames,
        "backbone": "dino_vits8 (random init), fused attention",
        "seconds_per_frame": per_frame,
        "backbone_seconds_per_frame": forward,
        "outside_backbone_share": 1 - forward / per_frame,
    }


def bench_batching(frames: int, batch_sizes: list[int]) -> dict:
    """Frames/s of the feature path (background decoding + backbone) per batch size, with a
    random-init ViT-S/8 on 480p frames; also whether the features match batch 1."""
    from dino_vos.backbones import load_backbone
    from dino_vos.features import BackboneFeatures, embed_frames
    from dino_vos.sources import open_source

    torch.manual_seed(0)
    backbone = load_backbone("dino_vits8", pretrained=False, device="cpu")
    report: dict = {"frames": frames, "backbone": "dino_vits8 (random init)", "batch": {}}
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        frame_dir, _, label = _e2e_input(Path(tmp), frames)
        report["input"] = label
        for batch_size in batch_sizes:
            extractor = BackboneFeatures(backbone, batch_size=batch_size)
            source = open_source(frame_dir, limit=frames)
            start, cpu = time.perf_counter(), time.process_time()
            features = [grid for _, grid in embed_frames(extractor, source)]
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            if reference is None:
                reference = features
            pairs = zip(features, reference, strict=True)
            error = max(float((a - b).abs().max()) for a, b in pairs)
            report["batch"][str(batch_size)] = {
                "frames_per_second": round(frames / seconds, 4),
                "seconds_per_frame": round(seconds / frames, 3),
                "cpu_seconds_per_frame": round(cpu / frames, 3),  # fair on a shared machine
                "max_abs_diff_vs_batch_1": error,
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5, help="frames for the end-to-end run")
    parser.add_argument("--sweep-frames", type=int, default=10, help="frames of the sweep point")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--batch-sizes", default="", help="e.g. 1,4: also time batched feature extraction"
    )
    parser.add_argument("--inner", choices=["windowed", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(args.inner, args.repeats)))
        return
    report = {"torch_threads": torch.get_num_threads(), "step": bench_step(args.skip_dense)}
    if not args.skip_sweep:
        report["sweep_point"] = bench_sweep_point(args.sweep_frames)
    if not args.skip_e2e:
        report["end_to_end"] = bench_end_to_end(args.frames)
    if args.batch_sizes:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        report["batching"] = bench_batching(max(args.frames, max(sizes)), sizes)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
