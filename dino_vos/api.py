"""High-level entry point: propagate a first-frame mask through a video and write the results."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dino_vos import __version__
from dino_vos.errors import InputError
from dino_vos.features import FeatureExtractor
from dino_vos.masks import atomic_write_bytes, read_mask
from dino_vos.pipeline import FrameResult, VideoPropagator
from dino_vos.propagation import PropagationConfig
from dino_vos.sources import FrameSource, open_source
from dino_vos.writers import MaskWriter, ProbsFormat, StagedRun, blend_overlay, encode_probabilities


@dataclass
class PropagationSummary:
    """What a finished :func:`propagate_video` run wrote."""

    out_dir: Path
    num_frames: int
    object_ids: tuple[int, ...]
    seconds: float
    overlay: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / self.seconds if self.seconds > 0 else float("inf")


def first_frame_mask(mask: str | Path | np.ndarray, frames: FrameSource) -> np.ndarray:
    """Read ``mask`` (a PNG path or a label array) and check it has the size of ``frames``."""
    first_mask = read_mask(mask) if isinstance(mask, (str, Path)) else np.asarray(mask)
    if first_mask.shape != tuple(frames.frame_size):
        h, w = frames.frame_size
        raise InputError(
            f"mask is {first_mask.shape[1]}x{first_mask.shape[0]} but the first frame of "
            f"{frames.path} is {w}x{h}: give the annotation of this video's first frame"
        )
    return first_mask


def propagate_video(
    source: str | Path | FrameSource,
    mask: str | Path | np.ndarray,
    out_dir: str | Path,
    features: FeatureExtractor,
    config: PropagationConfig | None = None,
    overlay: str | Path | None = None,
    save_probs: ProbsFormat | None = None,
    limit: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_frame: Callable[[FrameResult], None] | None = None,
    metadata: dict[str, Any] | None = None,
) -> PropagationSummary:
    """Segment every frame of ``source`` from the first frame's ``mask``; write PNGs to ``out_dir``.

    Outputs appear only when the run completes (see :mod:`dino_vos.writers`); ``on_start``
    receives the frame count and ``on_frame`` every :class:`FrameResult` (for progress bars).
    """
    frames = source if not isinstance(source, (str, Path)) else open_source(source, limit=limit)
    first_mask = first_frame_mask(mask, frames)
    config = config or PropagationConfig()
    propagator = VideoPropagator(features, config)
    object_ids: tuple[int, ...] = ()
    with StagedRun(out_dir, overlay, frames.fps) as run:
        writer = MaskWriter(run.output)
        if on_start is not None:
            on_start(len(frames))
        start = time.perf_counter()
        for result in propagator.propagate(frames, first_mask):
            object_ids = result.object_ids.ids
            writer.write(result.name, result.labels)
            if save_probs and result.soft is not None:
                atomic_write_bytes(
                    run.output.path(f"probs/{result.name}.{save_probs}"),
                    encode_probabilities(result.soft, object_ids, save_probs),
                )
            if run.overlay is not None:
                run.write_overlay(blend_overlay(result.image, result.labels))
            if on_frame is not None:
                on_frame(result)
        seconds = time.perf_counter() - start
        settings = {
            "dino_vos": __version__,
            "input": str(frames.path),
            "frames": len(writer.names),
            "object_ids": list(object_ids),
            "propagation": config.to_dict(),
            "seconds": round(seconds, 3),
            **(metadata or {}),
        }
        run.commit(settings)
    return PropagationSummary(
        Path(out_dir), len(writer.names), object_ids, seconds, run.overlay, settings
    )
