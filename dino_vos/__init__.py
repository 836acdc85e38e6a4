"""dino-vos: video object segmentation by label propagation with DINO Vision Transformers."""

__version__ = "0.1.0"

from dino_vos.api import PropagationSummary, propagate_video  # noqa: E402
from dino_vos.backbones import Backbone, available_backbones, load_backbone  # noqa: E402
from dino_vos.errors import DinoVosError  # noqa: E402
from dino_vos.features import BackboneFeatures, ResizeSpec  # noqa: E402
from dino_vos.masks import ObjectIds, read_mask, write_indexed_png  # noqa: E402
from dino_vos.pipeline import FrameResult, VideoPropagator  # noqa: E402
from dino_vos.propagation import LabelPropagator, PropagationConfig  # noqa: E402
from dino_vos.sources import Frame, open_source  # noqa: E402

__all__ = [
    "Backbone",
    "BackboneFeatures",
    "DinoVosError",
    "Frame",
    "FrameResult",
    "LabelPropagator",
    "ObjectIds",
    "PropagationConfig",
    "PropagationSummary",
    "ResizeSpec",
    "VideoPropagator",
    "available_backbones",
    "load_backbone",
    "open_source",
    "propagate_video",
    "read_mask",
    "write_indexed_png",
]
