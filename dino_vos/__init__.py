"""dino-vos: video object segmentation by label propagation with DINO Vision Transformers.

The public API is importable from here (``from dino_vos import VideoPropagator``); its modules
load on first use, so that importing the package (and running ``dino-vos --help``) does not
pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "Backbone": "dino_vos.backbones",
    "BackboneFeatures": "dino_vos.features",
    "BackboneSpec": "dino_vos.spec",
    "DinoVosError": "dino_vos.errors",
    "Frame": "dino_vos.sources",
    "FrameResult": "dino_vos.predictor",
    "LabelPropagator": "dino_vos.propagation",
    "ObjectIds": "dino_vos.masks",
    "PropagationConfig": "dino_vos.spec",
    "PropagationState": "dino_vos.predictor",
    "PropagationSummary": "dino_vos.api",
    "ResizeSpec": "dino_vos.spec",
    "VideoPropagator": "dino_vos.predictor",
    "available_backbones": "dino_vos.backbones",
    "load_backbone": "dino_vos.backbones",
    "open_source": "dino_vos.sources",
    "propagate_to_folder": "dino_vos.api",
    "read_mask": "dino_vos.masks",
    "register_backbone": "dino_vos.registry",
    "write_indexed_png": "dino_vos.masks",
}
__all__ = [
    "Backbone",
    "BackboneFeatures",
    "BackboneSpec",
    "DinoVosError",
    "Frame",
    "FrameResult",
    "LabelPropagator",
    "ObjectIds",
    "PropagationConfig",
    "PropagationState",
    "PropagationSummary",
    "ResizeSpec",
    "VideoPropagator",
    "available_backbones",
    "load_backbone",
    "open_source",
    "propagate_to_folder",
    "read_mask",
    "register_backbone",
    "write_indexed_png",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dino_vos' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs
    from dino_vos.api import PropagationSummary, propagate_to_folder
    from dino_vos.backbones import Backbone, available_backbones, load_backbone
    from dino_vos.errors import DinoVosError
    from dino_vos.features import BackboneFeatures
    from dino_vos.masks import ObjectIds, read_mask, write_indexed_png
    from dino_vos.predictor import FrameResult, PropagationState, VideoPropagator
    from dino_vos.propagation import LabelPropagator
    from dino_vos.registry import register_backbone
    from dino_vos.sources import Frame, open_source
    from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec
