"""DINOv2 (Oquab et al. 2023): a timm ``VisionTransformer`` with layer scale and optional
registers, whose position embeddings follow DINOv2's own ``interpolate_pos_encoding``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_vos.families.dino import DinoBackbone


class Dinov2Backbone(DinoBackbone):
    """DINOv2's ``DinoVisionTransformer`` as its hub builds it (docs/protocol.md#backbones).

    Its ``interpolate_pos_encoding`` has two settings: the models without registers use
    ``interpolate_offset=0.1`` without antialias (scale factors ``(h + 0.1) / M``: the DINO
    reference formula), the register models ``interpolate_offset=0`` with antialias (bicubic to
    the target size with antialias: timm's resize). ``auto`` picks the one of the model.
    """

    family = "dinov2"

    @classmethod
    def accepts(cls, vit: nn.Module, arch: Mapping[str, Any] | None) -> bool:
        if not isinstance(vit, VisionTransformer):
            return False
        named = "dinov2" in str((arch or {}).get("model", ""))
        layer_scale = not isinstance(vit.blocks[0].ls1, nn.Identity)
        return named or layer_scale or vit.reg_token is not None

    def resolve_pos_embed(self, mode: str) -> str:
        if mode != "auto":
            return mode
        return "timm" if self.vit.reg_token is not None else "reference"
