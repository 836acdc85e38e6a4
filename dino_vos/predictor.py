"""The video predictor: frame source -> patch features -> propagation -> per-frame label maps.

A stateful API in the style of SAM2's video predictor::

    predictor = VideoPropagator(BackboneSpec("dino_vits8").build())
    state = predictor.init_state("clip.mp4")
    predictor.add_mask(state, 0, read_mask("00000.png"))
    for result in predictor.propagate(state):
        save(result.name, result.labels)

``propagate`` is a generator: frames are decoded, embedded and segmented one at a time, so memory
does not grow with the video. A run starts from an annotated frame
(``docs/protocol.md#propagation``); masks on other frames are keyframes (corrections and
objects that enter later, see :meth:`VideoPropagator.add_mask`). ``direction`` is
``forward``, ``backward`` or ``both`` (``docs/protocol.md#keyframes``).
"""

from __future__ import annotations

import bisect
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dino_vos.errors import InputError, param
from dino_vos.features import FeatureExtractor, embed_frames
from dino_vos.frame_store import FrameReader, FrameStore
from dino_vos.masks import (
    VOID_LABEL,
    ObjectIds,
    check_mask_size,
    downsample_labels,
    resize_labels,
)
from dino_vos.propagation import LabelPropagator, soft_to_channels
from dino_vos.sizes import DEFAULT_STORE_BUDGET, format_size
from dino_vos.sources import Frame, FrameSource, MemorySource, open_source
from dino_vos.spec import DIRECTIONS, Direction, PropagationConfig


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
        height, width = self.source.frame_size
        return height, width


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
        self,
        state: PropagationState,
        start: int | None = None,
        reverse: bool = False,
        direction: Direction | None = None,
        store_dir: str | Path | None = None,
        store_budget: int | None = None,
    ) -> Iterator[FrameResult]:
        """Yield a :class:`FrameResult` per frame, in the order results become final.

        - ``forward`` (default): frame ``start`` (annotated; default the first keyframe) and
          every frame after it, in order; later keyframes are applied on the way.
        - ``backward`` (or ``reverse=True``): the same engine on the time-reversed stream, from
          ``start`` (default the last keyframe) down to frame 0.
        - ``both``: every frame. Frames between two keyframes fuse the forward and the backward
          soft maps by temporal distance; frames before the first keyframe take the backward
          result, frames after the last one the forward result (yielded first, in order); the
          others follow from the last keyframe down to frame 0.

        ``backward`` and ``both`` stream the video once forward, then decode it again in chunks
        from the end. What the backward pass needs from the first (forward soft maps, and patch
        features as far as they fit) waits in a temporary
        :class:`~dino_vos.frame_store.FrameStore` in ``store_dir`` (default the system's
        temporary folder) of at most ``store_budget`` bytes (default
        :data:`~dino_vos.sizes.DEFAULT_STORE_BUDGET`); features that do not fit are
        computed again. The results do not depend on the budget. The rules are in
        docs/protocol.md#keyframes.
        """
        direction = direction or ("backward" if reverse else "forward")
        if reverse and direction != "backward":
            raise InputError(f"reverse=True contradicts direction={direction!r}")
        if direction not in DIRECTIONS:
            raise InputError(f"unknown direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
        if not state.masks:
            raise InputError("no mask given: call add_mask(state, frame_index, mask) first")
        if start is not None and start not in state.masks:
            raise InputError(f"frame {start} has no mask: start where a mask was added")
        if direction == "forward":
            first = min(state.masks) if start is None else start
            frames = (f for f in state.source if f.index >= first)
            yield from self._pass(self._embedded(frames), state.masks, state.objects)
        elif direction == "backward":
            last = max(state.masks) if start is None else start
            reader = FrameReader(state.source, last + 1)
            with FrameStore(store_dir, store_budget) as store:
                # no forward pass (it would start after ``last``): the first pass only takes
                # checksums and keeps the features that fit
                plan = self._plan(state, reader, store.budget, last + 1, last)
                for _ in self._first_pass(state.source, reader, store, plan, last + 1, last):
                    pass
                revisited = self._revisited(reader, last, store)
                yield from self._pass(revisited, state.masks, state.objects)
        else:
            if start is not None:
                raise InputError("direction 'both' covers the whole video: give no start frame")
            yield from self._both(state, store_dir, store_budget)

    def mask_labels(
        self, mask: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, ObjectIds]:
        """One-hot (C, h, w) labels of a mask at patch resolution, and its object ids."""
        object_ids = ObjectIds.from_mask(mask)
        input_h, input_w = self.features.input_size(*image_size)
        patch = self.features.patch_size
        small = self._grid_labels(mask, (input_h // patch, input_w // patch))
        return object_ids.one_hot(small), object_ids

    def _grid_labels(self, mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """A label mask at the patch grid, resized as the protocol says."""
        return downsample_labels(mask, grid, self.config.rules.mask_downsample)

    def labels(
        self,
        soft: torch.Tensor,
        object_ids: ObjectIds,
        size: tuple[int, int],
        image: np.ndarray | None = None,
    ) -> np.ndarray:
        """Object ids (H, W) at the frame size from a (C, h, w) soft map: the configured
        post-processing (:func:`dino_vos.propagation.soft_to_channels`; ``image``, the RGB
        frame, guides ``upsample="guided"``), then the channels' object ids, nearest-resized."""
        channels = soft_to_channels(soft, self.config, self.features.patch_size, size, image)
        return resize_labels(object_ids.to_ids(channels.cpu().numpy()), size)

    def _embedded(self, frames: Iterable[Frame]) -> Generator[tuple[Frame, torch.Tensor]]:
        """(frame, patch features) in order: the one place frames meet the backbone (decoded
        ahead in a background thread, embedded in batches, see :func:`embed_frames`)."""
        for frame, features in embed_frames(self.features, frames):
            # contiguous: stored features come back contiguous, bit for bit
            yield frame, features.contiguous()

    @staticmethod
    def _until(source: FrameSource, last: int) -> Iterator[Frame]:
        for frame in source:
            yield frame
            if frame.index >= last:
                return

    def _pass(
        self,
        frames: Iterable[tuple[Frame, torch.Tensor]],
        masks: Mapping[int, np.ndarray],
        objects: Mapping[int, frozenset[int]],
    ) -> Iterator[FrameResult]:
        """One propagation over ``frames`` (in processing order, starting on a keyframe):
        the first frame's annotation is the first reference; later keyframes correct, add
        objects and become references."""
        engine = LabelPropagator(self.config)
        object_ids: ObjectIds | None = None
        for frame, features in frames:
            size = frame.image.shape[:2]
            mask = masks.get(frame.index)
            if object_ids is None:  # the start frame: its annotation is the first reference
                if mask is None:
                    raise InputError(f"frame {frame.index} has no mask: start on a keyframe")
                labels, object_ids = self.mask_labels(mask, size)
                if labels.shape[1:] != features.shape[:2]:
                    raise InputError(f"feature grid {tuple(features.shape[:2])} != mask grid")
                engine.reset(features, labels.to(features.device))
                yield FrameResult(frame.index, frame.name, mask, None, object_ids, frame.image)
                continue
            soft: torch.Tensor | None
            soft = engine.predict(features) if mask is not None else engine.step(features)
            ids = self.labels(soft, object_ids, size, frame.image)
            if mask is not None:  # a keyframe: correct, add objects, keep as a reference
                ids = merge_keyframe(ids, mask, objects[frame.index])
                new = [i for i in ObjectIds.from_mask(mask).ids if i not in object_ids.ids]
                if new:
                    object_ids = ObjectIds((*object_ids.ids, *new))
                    engine.add_classes(len(new))
                grid = features.shape[:2]
                labels = object_ids.one_hot(self._grid_labels(ids, (grid[0], grid[1])))
                engine.add_reference(features, labels.to(features.device))
                soft = None
            yield FrameResult(frame.index, frame.name, ids, soft, object_ids, frame.image)

    def _both(
        self, state: PropagationState, store_dir: str | Path | None, budget: int | None
    ) -> Iterator[FrameResult]:
        keyframes = sorted(state.masks)
        first, last = keyframes[0], keyframes[-1]
        reader = FrameReader(state.source, last + 1)
        with FrameStore(store_dir, budget) as store:
            plan = self._plan(state, reader, store.budget, first, last)
            # Pass 1: stream the video, propagate forward from the first keyframe.
            stream = self._first_pass(state.source, reader, store, plan, first, last)
            ids_from: dict[int, ObjectIds] = {}  # the forward pass's objects from each keyframe
            finished: dict[int, np.ndarray] = {}  # keyframe outputs
            for result in self._pass(stream, state.masks, state.objects):
                if result.index > last:
                    yield result
                elif result.soft is None:
                    ids_from[result.index] = result.object_ids
                    finished[result.index] = result.labels
                elif result.index >= plan.soft_from:
                    store.put(f"{result.index}.forward", result.soft)
            # Pass 2: backward from the last keyframe over the frames decoded again; each
            # keyframe is its final (forward) output, authoritative for every object.
            every_object = frozenset(ids_from[last].ids[1:])
            authoritative = dict.fromkeys(keyframes, every_object)
            frames = self._revisited(reader, last, store)
            for result in self._pass(frames, finished, authoritative):
                index = result.index
                if index in finished:  # a keyframe's output is the forward pass's
                    ids = ids_from[index]
                    yield FrameResult(index, result.name, finished[index], None, ids, result.image)
                    continue
                assert result.soft is not None  # the backward pass keeps its soft maps
                if index < first:  # only the first keyframe's objects exist before it
                    ids, weight = ids_from[first], 0.0
                    forward = result.soft.new_zeros(len(ids.ids), *result.soft.shape[1:])
                else:
                    position = bisect.bisect(keyframes, index)
                    before, after = keyframes[position - 1], keyframes[position]
                    ids, weight = ids_from[before], (after - index) / (after - before)
                    if f"{index}.forward" not in store:  # the next segment of forward maps
                        segment_start = max(first + 1, index - plan.segment + 1)
                        self._forward_maps(state, store, first, segment_start, index)
                    forward = store.pop(f"{index}.forward")
                soft = fuse_soft_maps(forward, ids, result.soft, result.object_ids, weight)
                labels = self.labels(soft, ids, result.image.shape[:2], result.image)
                yield FrameResult(index, result.name, labels, soft, ids, result.image)

    def _plan(
        self, state: PropagationState, reader: FrameReader, budget: int, first: int, last: int
    ) -> StorePlan:
        """What the store keeps (docs/protocol.md#keyframes): the forward soft maps of the
        frames strictly between ``first`` and ``last`` first (all of them, or the last segment
        that fits), then the features of the frames just below ``last``, as many as fit."""
        height, width = self.features.input_size(*state.frame_size)
        patch = self.features.patch_size
        objects = {0} | {i for mask in state.masks.values() for i in ObjectIds.from_mask(mask).ids}
        soft_bytes = len(objects) * (height // patch) * (width // patch) * 4
        keyframes_between = sum(1 for k in state.masks if first < k < last)
        soft_frames = max(0, last - first - 1 - keyframes_between)
        if soft_frames * soft_bytes <= budget:
            free = budget - soft_frames * soft_bytes
            plan = StorePlan(soft_from=first + 1, segment=max(1, last - first - 1))
        else:
            segment = budget // soft_bytes
            if segment < 1:
                raise InputError(
                    f"{param('store_budget', format_size(budget))} cannot hold one frame's "
                    f"soft map ({format_size(soft_bytes)}): raise it (default "
                    f"{format_size(DEFAULT_STORE_BUDGET)})"
                )
            return StorePlan(soft_from=last - segment, segment=segment)
        feature_bytes = self._feature_bytes(reader) if free > 0 else 0
        cached = min(last + 1, free // feature_bytes) if feature_bytes else 0
        return StorePlan(plan.soft_from, plan.segment, cached_from=last + 1 - cached)

    def _feature_bytes(self, reader: FrameReader) -> int:
        """Bytes of one frame's features (embeds frame 0 once)."""
        features = self.features(reader.first_frame())
        return features.numel() * features.element_size()

    def _first_pass(
        self,
        source: FrameSource,
        reader: FrameReader,
        store: FrameStore,
        plan: StorePlan,
        first: int,
        last: int,
    ) -> Iterator[tuple[Frame, torch.Tensor]]:
        """Stream ``source`` once (to its end when ``first`` <= ``last``, else up to ``last``):
        take every frame's checksum up to ``last``, keep the features of ``plan.cached_from``
        .. ``last``, pass on (frame, features) from ``first`` on. Frames needed for neither are
        decoded but not embedded."""
        frames: Iterable[Frame] = source if first <= last else self._until(source, last)
        needed = min(first, plan.cached_from)

        def checked(frames: Iterable[Frame]) -> Iterator[Frame]:
            for frame in frames:
                reader.fingerprint(frame)
                if frame.index >= needed:
                    yield frame

        for frame, features in self._embedded(checked(frames)):
            if plan.cached_from <= frame.index <= last:
                store.put(f"{frame.index}.features", features)
            if frame.index >= first:
                yield frame, features

    def _revisited(
        self, reader: FrameReader, last: int, store: FrameStore
    ) -> Iterator[tuple[Frame, torch.Tensor]]:
        """Frames ``last`` down to 0, decoded again a chunk at a time, with their features:
        from the store when the first pass kept them, else embedded again."""
        for chunk in reader.backward(last):
            missing = [frame for frame in chunk if f"{frame.index}.features" not in store]
            embedded = self._embedded(missing)
            try:
                for frame in chunk:
                    key = f"{frame.index}.features"
                    yield (frame, store.pop(key)) if key in store else next(embedded)
            finally:
                embedded.close()

    def _forward_maps(
        self, state: PropagationState, store: FrameStore, first: int, start: int, stop: int
    ) -> None:
        """Run the forward pass again from the first keyframe up to ``stop`` and store the
        soft maps of ``start`` .. ``stop`` (when the budget cannot hold all of them at once)."""
        frames = (f for f in self._until(state.source, stop) if f.index >= first)
        for result in self._pass(self._embedded(frames), state.masks, state.objects):
            if result.index >= start and result.soft is not None:
                store.put(f"{result.index}.forward", result.soft)


@dataclass(frozen=True)
class StorePlan:
    """What a backward or ``both`` run keeps in its store: the forward soft maps of frames
    ``soft_from`` .. (last keyframe - 1) after the first pass, then ``segment`` frames at a
    time; the features of frames ``cached_from`` .. last keyframe (none by default)."""

    soft_from: int
    segment: int
    cached_from: int = 2**62


def fuse_soft_maps(
    forward: torch.Tensor,
    forward_ids: ObjectIds,
    backward: torch.Tensor,
    backward_ids: ObjectIds,
    forward_weight: float,
) -> torch.Tensor:
    """``forward_weight * forward + (1 - forward_weight) * backward`` in the forward map's
    channel order. Backward channels of objects the forward map does not have yet (objects that
    enter at a later keyframe) are dropped: an object is absent before its first keyframe."""
    aligned = torch.zeros_like(forward)
    for channel, object_id in enumerate(backward_ids.ids):
        if object_id in forward_ids.ids:
            aligned[forward_ids.ids.index(object_id)] = backward[channel]
    return forward_weight * forward + (1.0 - forward_weight) * aligned
