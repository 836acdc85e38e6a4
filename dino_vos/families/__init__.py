"""Backbone families: one :class:`dino_vos.backbones.Backbone` implementation per model family.

Each family is one module with one class that says which timm models it runs
(``accepts``) and implements the interface: position-embedding rule, tokens of chosen blocks,
last-block CLS attention. :data:`FAMILIES` is tried in order (most specific first).
"""

from __future__ import annotations

from dino_vos.families.dino import DinoBackbone
from dino_vos.families.dinov2 import Dinov2Backbone
from dino_vos.families.dinov3 import Dinov3Backbone

FAMILIES = (Dinov3Backbone, Dinov2Backbone, DinoBackbone)

__all__ = ["FAMILIES", "DinoBackbone", "Dinov2Backbone", "Dinov3Backbone"]
