"""Backbones by short name, registered in the style of timm's ``register_model``.

This module imports neither torch nor timm: the command line lists and checks names with it
before any model code loads. :func:`dino_vos.backbones.load_backbone` builds the models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegisteredBackbone:
    """What a short backbone name stands for.

    ``timm_name``: the timm model whose pretrained weights are used (hub cache or download).
    ``checkpoint_file``: the official release's file name, suggested when offline.
    ``shipped``: the weights ship inside the package (``dino_vos/weights/<name>.safetensors``).
    ``timm_kwargs``: overrides of the timm model's arguments (e.g. MoCo v3's head count).
    ``hub``: timm's pretrained weights of ``timm_name`` are these weights (False: only a file).
    """

    name: str
    description: str
    timm_name: str | None = None
    checkpoint_file: str | None = None
    shipped: bool = False
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    hub: bool = True

    @property
    def shipped_file(self) -> Path | None:
        return SHIPPED_WEIGHTS_DIR / f"{self.name}.safetensors" if self.shipped else None


_REGISTRY: dict[str, RegisteredBackbone] = {}

#: Models shipped inside the package (``dino_vos/weights/<name>.safetensors``).
SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The backbone of the DINO protocol, used when its weights are cached or downloadable.
DEFAULT_BACKBONE = "dino_vits8"
#: The model shipped with dino-vos, used when no other weights can be had (offline).
SHIPPED_BACKBONE = "dino_vos_tiny"


BackboneFactory = Callable[[], "RegisteredBackbone"]


def register_backbone(factory: BackboneFactory) -> BackboneFactory:
    """Register the entry ``factory()`` under its own ``name`` (decorator)."""
    entry = factory()
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone '{entry.name}' is registered twice")
    _REGISTRY[entry.name] = entry
    return factory


def registered_backbone(name: str) -> RegisteredBackbone | None:
    """The entry registered as ``name``, or None (a timm name or a file path)."""
    return _REGISTRY.get(name)


def _missing(shipped_file: Path | None) -> bool:
    """A shipped model's weights file is absent (False for models that are not shipped)."""
    return shipped_file is not None and not shipped_file.is_file()


def backbone_names(available_only: bool = True) -> list[str]:
    """Registered short names; with ``available_only``, shipped models whose file is present."""
    return [
        name
        for name, entry in _REGISTRY.items()
        if not (available_only and _missing(entry.shipped_file))
    ]


def _official_dino(name: str, timm_name: str, checkpoint: str, size: str) -> RegisteredBackbone:
    return RegisteredBackbone(
        name, f"official DINO {size} (Caron et al. 2021)", timm_name, checkpoint
    )


@register_backbone
def dino_vits16() -> RegisteredBackbone:
    return _official_dino(
        "dino_vits16", "vit_small_patch16_224.dino", "dino_deitsmall16_pretrain.pth", "ViT-S/16"
    )


@register_backbone
def dino_vits8() -> RegisteredBackbone:
    return _official_dino(
        "dino_vits8", "vit_small_patch8_224.dino", "dino_deitsmall8_pretrain.pth", "ViT-S/8"
    )


@register_backbone
def dino_vitb16() -> RegisteredBackbone:
    return _official_dino(
        "dino_vitb16", "vit_base_patch16_224.dino", "dino_vitbase16_pretrain.pth", "ViT-B/16"
    )


@register_backbone
def dino_vitb8() -> RegisteredBackbone:
    return _official_dino(
        "dino_vitb8", "vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth", "ViT-B/8"
    )


@register_backbone
def dino_vos_tiny() -> RegisteredBackbone:
    return RegisteredBackbone(
        "dino_vos_tiny",
        "ViT-Ti/8 (6 blocks) pretrained by dino-vos on DAVIS-2016 train; ships in the package",
        shipped=True,
    )


def _official_dinov3(name: str, timm_name: str, file_hash: str, size: str) -> RegisteredBackbone:
    """A DINOv3 release: timm's ``_qkvb`` model (the releases have a qkv bias, the k part
    masked to zero) and the official file name of ``dinov3/hub/backbones.py``."""
    return RegisteredBackbone(
        name,
        f"official DINOv3 {size} (Simeoni et al. 2025), LVD-1689M",
        f"{timm_name}.lvd1689m",
        f"{name}_pretrain_lvd1689m-{file_hash}.pth",
    )


@register_backbone
def dinov3_vits16() -> RegisteredBackbone:
    return _official_dinov3(
        "dinov3_vits16", "vit_small_patch16_dinov3_qkvb", "08c60483", "ViT-S/16"
    )


@register_backbone
def dinov3_vits16plus() -> RegisteredBackbone:
    return _official_dinov3(
        "dinov3_vits16plus", "vit_small_plus_patch16_dinov3_qkvb", "4057cbaa", "ViT-S+/16"
    )


@register_backbone
def dinov3_vitb16() -> RegisteredBackbone:
    return _official_dinov3("dinov3_vitb16", "vit_base_patch16_dinov3_qkvb", "73cec8be", "ViT-B/16")


@register_backbone
def dinov3_vitl16() -> RegisteredBackbone:
    return _official_dinov3(
        "dinov3_vitl16", "vit_large_patch16_dinov3_qkvb", "8aa4cbdd", "ViT-L/16"
    )


@register_backbone
def dinov3_vith16plus() -> RegisteredBackbone:
    return _official_dinov3(
        "dinov3_vith16plus", "vit_huge_plus_patch16_dinov3_qkvb", "7c1da9a5", "ViT-H+/16"
    )


@register_backbone
def mocov3_vits16() -> RegisteredBackbone:
    """MoCo v3's ViT-S/16 (``vits.py``): 12 heads of 32 channels, unlike DINO's 6 of 64."""
    return RegisteredBackbone(
        "mocov3_vits16",
        "MoCo v3 ViT-S/16 architecture (12 heads; weights only from a file)",
        "vit_small_patch16_224",
        timm_kwargs=(("num_heads", 12),),
        hub=False,
    )
