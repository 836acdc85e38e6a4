"""``dino-vos demo``: the main job end to end, offline, on a generated clip with known masks,
scored with the DAVIS metrics (so it lives in ``eval``, above the library it exercises)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dino_vos.api import PropagationSummary, propagate_to_folder
from dino_vos.defaults import DEMO_FRAMES, DEMO_OBJECTS, DEMO_SIZE
from dino_vos.errors import InputError
from dino_vos.eval.davis_metrics import (
    ObjectScores,
    global_statistics,
    num_objects_of,
    score_frames,
)
from dino_vos.features import FeatureExtractor
from dino_vos.masks import read_mask
from dino_vos.propagation import PropagationConfig
from dino_vos.sources import FrameSource
from dino_vos.synthetic import make_clip


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and, on the generated clip, its J&F scores."""

    summary: PropagationSummary
    clip_dir: Path | None
    scores: dict[str, float] | None  # global J&F statistics (generated clip only)
    per_object: dict[int, dict[str, float]] | None


def score_against(ground_truth: np.ndarray, predicted: np.ndarray, sequence: str = "demo"):
    """DAVIS J&F of (T, H, W) predicted label images against the ground truth (frames 1..T-2)."""
    num_objects = num_objects_of(ground_truth[0])
    j, f = score_frames(ground_truth[1:-1], predicted[1:-1], num_objects)
    objects = [ObjectScores(sequence, k + 1, j[k], f[k]) for k in range(num_objects)]
    per_object = {obj.object_id: obj.statistics() for obj in objects}
    return global_statistics(objects), per_object


def run_demo(
    out_dir: str | Path,
    features: FeatureExtractor,
    video: str | Path | FrameSource | None = None,
    mask: str | Path | np.ndarray | None = None,
    config: PropagationConfig | None = None,
    seed: int = 0,
    clip_style: str = "grass",
    on_start=None,
    on_frame=None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> DemoResult:
    """Propagate a generated clip (or ``video`` with its first ``mask``) into ``out_dir``.

    Writes ``masks/`` (indexed PNGs) and ``overlay.mp4``; on the generated clip also
    ``clip/frames`` and ``clip/masks`` (the ground truth) and returns the J&F scores.
    ``clip_style`` names the generated clip's look (:data:`dino_vos.synthetic.CLIP_STYLES`).
    """
    out_dir = Path(out_dir)
    clip_dir = None
    if video is None:
        clip = make_clip(DEMO_FRAMES, DEMO_SIZE, DEMO_OBJECTS, seed=seed, style=clip_style)
        clip_dir = out_dir / "clip"
        video, mask_dir = clip.write(clip_dir)
        mask = mask_dir / "00000.png"
    if mask is None:
        raise InputError("run_demo: a video needs its first-frame mask")
    summary = propagate_to_folder(
        video,
        mask,
        out_dir / "masks",
        features,
        config,
        overlay=out_dir / "overlay.mp4",
        on_start=on_start,
        on_frame=on_frame,
        metadata=metadata,
        overwrite=overwrite,
    )
    if clip_dir is None:
        return DemoResult(summary, None, None, None)
    names = sorted(p.name for p in (clip_dir / "masks").glob("*.png"))
    predicted = np.stack([read_mask(out_dir / "masks" / name) for name in names])
    scores, per_object = score_against(clip.masks, predicted)
    return DemoResult(summary, clip_dir, scores, per_object)
