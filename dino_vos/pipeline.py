"""Video object segmentation: frame source -> patch features -> propagation -> label maps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dino_vos.errors import InputError
from dino_vos.features import FeatureExtractor
from dino_vos.masks import ObjectIds, resize_labels
from dino_vos.propagation import LabelPropagator, PropagationConfig, labels_from_soft
from dino_vos.sources import Frame


@dataclass
class FrameResult:
    """The segmentation of one frame.

    ``labels``: (H, W) uint8 object ids at the original frame size. ``soft``: (C, h, w) soft
    label map at patch resolution, channel i belonging to ``object_ids.ids[i]`` (None for the
    first frame, which is the given mask). ``image``: the original RGB frame.
    """

    index: int
    name: str
    labels: np.ndarray
    soft: torch.Tensor | None
    object_ids: ObjectIds
    image: np.ndarray


class VideoPropagator:
    """Propagates a first-frame mask through a video, yielding one result per frame.

    >>> propagator = VideoPropagator(BackboneFeatures(load_backbone("dino_vits8")))
    >>> for result in propagator.propagate(open_source("clip.mp4"), read_mask("00000.png")):
    ...     save(result.name, result.labels)
    """

    def __init__(self, features: FeatureExtractor, config: PropagationConfig | None = None) -> None:
        self.features = features
        self.config = config or PropagationConfig()

    def first_frame_labels(
        self, mask: np.ndarray, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, ObjectIds]:
        """One-hot (C, h, w) labels of the first mask at patch resolution, and its object ids."""
        if mask.shape != tuple(image_size):
            raise InputError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the first frame is "
                f"{image_size[1]}x{image_size[0]}: give the annotation of this video's first frame"
            )
        object_ids = ObjectIds.from_mask(mask)
        input_h, input_w = self.features.input_size(*image_size)
        patch = self.features.patch_size
        small = resize_labels(mask, (input_h // patch, input_w // patch))
        return object_ids.one_hot(small), object_ids

    def propagate(self, frames: Iterable[Frame], mask: np.ndarray) -> Iterator[FrameResult]:
        """Yield a :class:`FrameResult` for every frame; the first one is ``mask`` itself."""
        engine = LabelPropagator(self.config)
        object_ids: ObjectIds | None = None
        for frame in frames:
            features = self.features(frame)
            size = frame.image.shape[:2]
            if object_ids is None:
                labels, object_ids = self.first_frame_labels(mask, size)
                if labels.shape[1:] != features.shape[:2]:
                    raise InputError(f"feature grid {tuple(features.shape[:2])} != mask grid")
                engine.reset(features, labels.to(features.device))
                yield FrameResult(frame.index, frame.name, mask, None, object_ids, frame.image)
                continue
            soft = engine.step(features)
            channels = labels_from_soft(soft, self.features.patch_size).cpu().numpy()
            ids = resize_labels(object_ids.to_ids(channels), size)
            yield FrameResult(frame.index, frame.name, ids, soft, object_ids, frame.image)
