"""The video predictor: frame source -> patch features -> propagation -> per-frame label maps.

A stateful API in the style of SAM2's video predictor::

    predictor = VideoPropagator(BackboneSpec("dino_vits8").build())
    state = predictor.init_state("clip.mp4")
    predictor.add_mask(state, 0, read_mask("00000.png"))
    for result in predictor.propagate(state):
        save(result.name, result.labels)

``propagate`` is a generator: frames are decoded, embedded and segmented one at a time, so memory
does not grow with the video. Today a run starts from one annotated frame and goes forward
(``docs/protocol.md#propagation``); masks on further frames and backward propagation are
refused with a clear error until keyframes are supported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dino_vos.errors import InputError
from dino_vos.features import FeatureExtractor
from dino_vos.masks import ObjectIds, check_mask_size, resize_labels
from dino_vos.propagation import LabelPropagator, labels_from_soft
from dino_vos.sources import Frame, FrameSource, MemorySource, open_source
from dino_vos.spec import PropagationConfig


@dataclass
class FrameResult:
    """The segmentation of one frame.

    ``labels``: (H, W) uint8 object ids at the original frame size. ``soft``: (C, h, w) soft
    label map at patch resolution, channel i belonging to ``object_ids.ids[i]`` (None on an
    annotated frame, whose labels are the given mask). ``image``: the original RGB frame.
    """

    index: int
    name: str
    labels: np.ndarray
    soft: torch.Tensor | None
    object_ids: ObjectIds
    image: np.ndarray


@dataclass
class PropagationState:
    """One video being segmented: its frames and the masks given so far (frame index -> mask)."""

    source: FrameSource
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.source)

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.source.frame_size)  # type: ignore[return-value]


class VideoPropagator:
    """Propagates annotated masks through a video, one :class:`FrameResult` per frame."""

    def __init__(self, features: FeatureExtractor, config: PropagationConfig | None = None) -> None:
        self.features = features
        self.config = config or PropagationConfig()

    def init_state(
        self,
        source: str | Path | FrameSource | Sequence[Frame] | Sequence[np.ndarray],
        limit: int | None = None,
    ) -> PropagationState:
        """Open ``source``: a video file, a frame folder, a :class:`FrameSource`, or frames in
        memory (a list of :class:`Frame` or RGB arrays)."""
        if isinstance(source, (str, Path)):
            return PropagationState(open_source(source, limit=limit))
        if isinstance(source, (list, tuple)):
            return PropagationState(MemorySource(source[:limit]))
        return PropagationState(source)  # type: ignore[arg-type]

    def add_mask(self, state: PropagationState, frame_index: int, mask: np.ndarray) -> ObjectIds:
        """Annotate frame ``frame_index`` with a label mask (H, W); returns its object ids."""
        if not 0 <= frame_index < state.num_frames:
            raise InputError(
                f"frame {frame_index} is outside the video ({state.num_frames} frames, 0.."
                f"{state.num_frames - 1})"
            )
        mask = np.asarray(mask)
        check_mask_size(mask, state.source, frame_index)
        state.masks[frame_index] = mask
        return ObjectIds.from_mask(mask)

    def reset_state(self, state: PropagationState) -> None:
        """Forget every mask added to ``state`` (the frames stay)."""
        state.masks.clear()

    def propagate(
        self, state: PropagationState, start: int | None = None, reverse: bool = False
    ) -> Iterator[FrameResult]:
        """Yield a :class:`FrameResult` for frame ``start`` (annotated; default: the first
        annotated frame) and every frame after it."""
        if reverse:
            raise InputError("backward propagation is not supported yet: propagate forward")
        if not state.masks:
            raise InputError("no mask given: call add_mask(state, frame_index, mask) first")
        start = min(state.masks) if start is None else start
        if start not in state.masks:
            raise InputError(f"frame {start} has no mask: start where a mask was added")
        later = sorted(index for index in state.masks if index > start)
        if later:
            raise InputError(
                f"masks on frames {later} after the start frame {start}: one annotated frame per "
                "run is supported for now"
            )
        yield from self._forward(state.source, start, state.masks[start])

    def mask_labels(
        self, mask: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, ObjectIds]:
        """One-hot (C, h, w) labels of a mask at patch resolution, and its object ids."""
        object_ids = ObjectIds.from_mask(mask)
        input_h, input_w = self.features.input_size(*image_size)
        patch = self.features.patch_size
        small = resize_labels(mask, (input_h // patch, input_w // patch))
        return object_ids.one_hot(small), object_ids

    def _forward(self, frames: FrameSource, start: int, mask: np.ndarray) -> Iterator[FrameResult]:
        engine = LabelPropagator(self.config)
        object_ids: ObjectIds | None = None
        for frame in frames:
            if frame.index < start:
                continue
            features = self.features(frame)
            size = frame.image.shape[:2]
            if object_ids is None:
                labels, object_ids = self.mask_labels(mask, size)
                if labels.shape[1:] != features.shape[:2]:
                    raise InputError(f"feature grid {tuple(features.shape[:2])} != mask grid")
                engine.reset(features, labels.to(features.device))
                yield FrameResult(frame.index, frame.name, mask, None, object_ids, frame.image)
                continue
            soft = engine.step(features)
            channels = labels_from_soft(soft, self.features.patch_size).cpu().numpy()
            ids = resize_labels(object_ids.to_ids(channels), size)
            yield FrameResult(frame.index, frame.name, ids, soft, object_ids, frame.image)
