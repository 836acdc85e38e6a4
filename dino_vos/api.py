"""The whole job in one call: propagate an annotated mask through a video into a folder of PNGs."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dino_vos import __version__
from dino_vos.features import FeatureExtractor
from dino_vos.masks import read_annotation, read_mask
from dino_vos.predictor import FrameResult, VideoPropagator
from dino_vos.sources import FrameSource, open_source
from dino_vos.spec import Direction, PropagationConfig, frames_covered
from dino_vos.writers import OutputSink, ProbsFormat, blend_overlay, encode_probabilities


@dataclass
class PropagationSummary:
    """What a finished :func:`propagate_to_folder` run wrote."""

    out_dir: Path
    num_frames: int
    object_ids: tuple[int, ...]
    seconds: float
    overlay: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / self.seconds if self.seconds > 0 else float("inf")


def propagate_to_folder(
    source: str | Path | FrameSource,
    mask: str | Path | np.ndarray | Mapping[int, str | Path | np.ndarray],
    out_dir: str | Path,
    features: FeatureExtractor,
    config: PropagationConfig | None = None,
    overlay: str | Path | None = None,
    save_probs: ProbsFormat | None = None,
    limit: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_frame: Callable[[FrameResult], None] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    direction: Direction = "forward",
    complete_keyframes: bool = False,
    every_frame: bool = False,
    store_budget: int | None = None,
) -> PropagationSummary:
    """Segment ``source`` from the first frame's ``mask`` (or from keyframes: a mapping of frame
    index to mask); write a PNG per frame to ``out_dir``: from the first keyframe on
    (``direction="forward"``), up to the last one (``"backward"``) or all (``"both"``).

    The :class:`~dino_vos.predictor.VideoPropagator` writes through an
    :class:`~dino_vos.writers.OutputSink`: outputs appear only when the run completes, with a
    ``dino-vos.json`` manifest last; ``out_dir`` and ``overlay`` follow the rules of
    :mod:`dino_vos.outputs` (``overwrite`` allows a non-empty folder that is not a dino-vos
    result). ``on_start`` receives the frame count and ``on_frame`` every :class:`FrameResult`
    (for progress bars). ``complete_keyframes``: every keyframe shows all the objects there are
    (benchmark ground truth), so an object it does not show is absent there; by default a
    keyframe speaks only for the objects it shows (see docs/protocol.md#keyframes).
    ``every_frame``: frames the direction does not reach (before the first keyframe going
    forward, after the last one going backward) get an empty mask, as benchmark servers expect.
    ``store_budget``: bytes of temporary disk for ``backward`` and ``both`` (default 4 GB; see
    docs/protocol.md#keyframes).
    """
    frames = source if not isinstance(source, (str, Path)) else open_source(source, limit=limit)
    keyframes = dict(mask) if isinstance(mask, Mapping) else {0: mask}
    predictor = VideoPropagator(features, config)
    state = predictor.init_state(frames)
    annotations = {i: read_annotation(m, frames, i) for i, m in sorted(keyframes.items())}
    every_object = {int(v) for mask in annotations.values() for v in np.unique(mask)}
    for index, annotation in annotations.items():
        predictor.add_mask(state, index, annotation, every_object if complete_keyframes else None)
    object_ids: tuple[int, ...] = ()
    inputs = [frames.path, *(m for m in keyframes.values() if isinstance(m, (str, Path)))]
    with OutputSink(out_dir, overlay, frames.fps, overwrite, inputs) as sink:
        if on_start is not None:
            on_start(frames_covered(len(frames), keyframes, direction))
        start = time.perf_counter()
        names = frames.frame_names()
        # the overlay is written as results come when they come in frame order, else after
        in_order = direction == "forward" and not (every_frame and min(keyframes) > 0)
        for result in predictor.propagate(state, direction=direction, store_budget=store_budget):
            object_ids = tuple(dict.fromkeys((*object_ids, *result.object_ids.ids)))
            sink.write_mask(result.name, result.labels)
            if save_probs and result.soft is not None:
                sink.write_bytes(
                    f"probs/{result.name}.{save_probs}",
                    encode_probabilities(result.soft, result.object_ids.ids, save_probs),
                )
            if sink.overlay is not None and in_order:
                sink.write_overlay(blend_overlay(result.image, result.labels))
            if on_frame is not None:
                on_frame(result)
        if every_frame:  # frames before any object: empty masks
            empty = np.zeros(frames.frame_size, np.uint8)
            done = set(sink.masks)
            for name in [name for name in names if name not in done]:
                sink.write_mask(name, empty)
        if sink.overlay is not None and not in_order:  # results came out of order
            written = set(sink.masks)
            for frame in frames:
                if frame.name in written:
                    labels = read_mask(sink.path(f"{frame.name}.png"))
                    sink.write_overlay(blend_overlay(frame.image, labels))
        seconds = time.perf_counter() - start
        settings = {
            "dino_vos": __version__,
            "input": str(frames.path),
            "frames": len(sink.masks),
            "object_ids": list(object_ids),
            "keyframes": [names[index] for index in sorted(keyframes)],
            "direction": direction,
            "propagation": predictor.config.to_dict(),
            "seconds": round(seconds, 3),
            **(metadata or {}),
        }
        sink.commit(settings)
    return PropagationSummary(
        Path(out_dir), len(sink.masks), object_ids, seconds, sink.overlay, settings
    )
