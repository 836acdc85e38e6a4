"""The video predictor: frame source -> patch features -> propagation -> per-frame label maps.

A stateful API in the style of SAM2's video predictor::

    predictor = VideoPropagator(BackboneSpec("dino_vits8").build())
    state = predictor.init_state("clip.mp4")
    predictor.add_mask(state, 0, read_mask("00000.png"))
    for result in predictor.propagate(state):
        save(result.name, result.labels)

``propagate`` is a generator: frames are decoded, embedded and segmented one at a time, so memory
does not grow with the video. A run starts from an annotated frame and goes forward
(``docs/protocol.md#propagation``); masks on later frames are keyframes (corrections and
objects that enter later, see :meth:`VideoPropagator.add_mask`). Backward propagation is not
supported yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dino_vos.errors import InputError
from dino_vos.features import FeatureExtractor
from dino_vos.masks import VOID_LABEL, ObjectIds, check_mask_size, resize_labels
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
    """One video being segmented: its frames and its keyframes.

    ``masks`` maps a frame index to its annotation; ``objects`` to the object ids that
    annotation is authoritative for (by default the ids it contains).
    """

    source: FrameSource
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    objects: dict[int, frozenset[int]] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.source)

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.source.frame_size)  # type: ignore[return-value]


def merge_keyframe(
    predicted: np.ndarray, annotation: np.ndarray, objects: frozenset[int]
) -> np.ndarray:
    """The output of a keyframe: the annotation for the objects it annotates, the prediction
    for the others.

    Pixels predicted as one of ``objects`` are cleared first (the annotation says where those
    objects are, including nowhere); then every annotated object pixel takes its id. Background
    (0) and void (255) in the annotation leave other objects' predictions as they are, so a
    keyframe that annotates only a new object (as YouTube-VOS does) does not erase the others.
    """
    merged = predicted.copy()
    merged[np.isin(merged, sorted(objects))] = 0
    annotated = (annotation > 0) & (annotation < VOID_LABEL)
    merged[annotated] = annotation[annotated]
    return merged


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

    def add_mask(
        self,
        state: PropagationState,
        frame_index: int,
        mask: np.ndarray,
        objects: Iterable[int] | None = None,
    ) -> ObjectIds:
        """Annotate frame ``frame_index`` with a label mask (H, W) of object ids.

        The frame becomes a keyframe: its output is the annotation for ``objects`` (default: the
        ids in ``mask``; pass every id to also clear objects it does not show, see
        :func:`merge_keyframe`), it adds new objects, and it is kept as a reference for the
        frames after it. Returns the ids in ``mask``.
        """
        if not 0 <= frame_index < state.num_frames:
            raise InputError(
                f"frame {frame_index} is outside the video ({state.num_frames} frames, 0.."
                f"{state.num_frames - 1})"
            )
        mask = np.asarray(mask)
        check_mask_size(mask, state.source, frame_index)
        ids = ObjectIds.from_mask(mask)
        state.masks[frame_index] = mask
        authoritative = set(ids.ids[1:]) if objects is None else {int(o) for o in objects}
        state.objects[frame_index] = frozenset(authoritative - {0, VOID_LABEL})
        return ids

    def reset_state(self, state: PropagationState) -> None:
        """Forget every mask added to ``state`` (the frames stay)."""
        state.masks.clear()
        state.objects.clear()

    def propagate(
        self, state: PropagationState, start: int | None = None, reverse: bool = False
    ) -> Iterator[FrameResult]:
        """Yield a :class:`FrameResult` for frame ``start`` (annotated; default: the first
        annotated frame) and every frame after it; later keyframes are applied on the way."""
        if reverse:
            raise InputError("backward propagation is not supported yet: propagate forward")
        if not state.masks:
            raise InputError("no mask given: call add_mask(state, frame_index, mask) first")
        start = min(state.masks) if start is None else start
        if start not in state.masks:
            raise InputError(f"frame {start} has no mask: start where a mask was added")
        yield from self._forward(state, start)

    def mask_labels(
        self, mask: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, ObjectIds]:
        """One-hot (C, h, w) labels of a mask at patch resolution, and its object ids."""
        object_ids = ObjectIds.from_mask(mask)
        input_h, input_w = self.features.input_size(*image_size)
        patch = self.features.patch_size
        small = resize_labels(mask, (input_h // patch, input_w // patch))
        return object_ids.one_hot(small), object_ids

    def _forward(self, state: PropagationState, start: int) -> Iterator[FrameResult]:
        engine = LabelPropagator(self.config)
        object_ids: ObjectIds | None = None
        patch = self.features.patch_size
        for frame in state.source:
            if frame.index < start:
                continue
            features = self.features(frame)
            size = frame.image.shape[:2]
            mask = state.masks.get(frame.index)
            if object_ids is None:  # the start frame: its annotation is the first reference
                labels, object_ids = self.mask_labels(state.masks[start], size)
                if labels.shape[1:] != features.shape[:2]:
                    raise InputError(f"feature grid {tuple(features.shape[:2])} != mask grid")
                engine.reset(features, labels.to(features.device))
                yield FrameResult(frame.index, frame.name, mask, None, object_ids, frame.image)
                continue
            soft = engine.predict(features) if mask is not None else engine.step(features)
            channels = labels_from_soft(soft, patch).cpu().numpy()
            ids = resize_labels(object_ids.to_ids(channels), size)
            if mask is not None:  # a keyframe: correct, add objects, keep as a reference
                ids = merge_keyframe(ids, mask, state.objects[frame.index])
                new = [i for i in ObjectIds.from_mask(mask).ids if i not in object_ids.ids]
                if new:
                    object_ids = ObjectIds((*object_ids.ids, *new))
                    engine.add_classes(len(new))
                grid = features.shape[:2]
                labels = object_ids.one_hot(resize_labels(ids, tuple(grid)))
                engine.add_reference(features, labels.to(features.device))
                soft = None
            yield FrameResult(frame.index, frame.name, ids, soft, object_ids, frame.image)
