"""ViT backbones by name: official DINO weights, any timm ViT, local checkpoint files.

The :class:`Backbone` wraps a timm ``VisionTransformer`` and runs its own token preparation so
that position embeddings for arbitrary frame sizes follow the DINO reference formula by default
(docs/protocol.md#backbones) instead of timm's explicit-size resampling.
"""

from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_vos.checkpoints import load_backbone_state
from dino_vos.device import resolve_device
from dino_vos.errors import BackboneError
from dino_vos.registry import (
    DEFAULT_BACKBONE,
    SHIPPED_BACKBONE,
    backbone_names,
    registered_backbone,
)
from dino_vos.spec import POS_EMBED_MODES, PosEmbedMode

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class Backbone(nn.Module):
    """A timm ViT with DINO-style token preparation and patch-feature outputs."""

    def __init__(
        self,
        vit: VisionTransformer,
        name: str,
        pos_embed: PosEmbedMode = "reference",
        arch: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pos_embed not in POS_EMBED_MODES:
            raise BackboneError(f"unknown position-embedding mode '{pos_embed}': reference or timm")
        self.vit = vit
        self.name = name
        self.pos_embed_mode = pos_embed
        self.arch = dict(arch) if arch is not None else None
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.depth = len(vit.blocks)
        # A hash-friendly description of the weights, filled by ``load_backbone``.
        self.weights_id = "random"

    @property
    def device(self) -> torch.device:
        return self.vit.pos_embed.device if self.vit.pos_embed is not None else torch.device("cpu")

    def describe(self) -> str:
        """One line: name, patch size, width, weights and device."""
        return (
            f"{self.name} (patch {self.patch_size}, dim {self.embed_dim}, weights "
            f"{self.weights_id}) on {self.device}"
        )

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch-grid shape for an input image of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def _reference_patch_pos(
        self, grid: tuple[int, int], image_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Patch position embeddings resized with the DINO reference formula (scale factors)."""
        vit = self.vit
        pos = vit.pos_embed
        patch_pos = pos if vit.no_embed_class else pos[:, vit.num_prefix_tokens :]
        stored_h, stored_w = vit.patch_embed.grid_size
        num_stored = patch_pos.shape[1]
        h, w = grid
        if h * w == num_stored and image_hw[0] == image_hw[1]:
            return patch_pos
        dim = patch_pos.shape[-1]
        grid_pos = patch_pos.reshape(1, stored_h, stored_w, dim).permute(0, 3, 1, 2)
        # The reference adds 0.1 and resizes by a scale factor (not a size); keep that quirk.
        resized = F.interpolate(
            grid_pos.float(),
            scale_factor=((h + 0.1) / math.sqrt(num_stored), (w + 0.1) / math.sqrt(num_stored)),
            mode="bicubic",
            align_corners=False,
        ).to(patch_pos.dtype)
        if resized.shape[-2:] != (h, w):
            raise BackboneError(f"position embedding resize gave {tuple(resized.shape[-2:])}")
        return resized.permute(0, 2, 3, 1).reshape(1, h * w, dim)

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed ``images`` (B,3,H,W), add prefix tokens and position embeddings."""
        vit = self.vit
        image_hw = (images.shape[-2], images.shape[-1])
        x = vit.patch_embed(images)  # (B, h, w, D): built with dynamic_img_size
        batch, h, w, dim = x.shape
        if self.pos_embed_mode == "timm" or vit.pos_embed is None:
            return vit._pos_embed(x), (h, w)
        patch_pos = self._reference_patch_pos((h, w), image_hw)
        x = x.reshape(batch, h * w, dim)
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(batch, -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(batch, -1, -1))
        if vit.no_embed_class:
            x = torch.cat([*prefix, x + patch_pos], dim=1)
        else:
            prefix_pos = vit.pos_embed[:, : vit.num_prefix_tokens]
            x = torch.cat([*prefix, x], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)
        return vit.pos_drop(x), (h, w)

    def forward_tokens(
        self, images: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = True
    ) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Token sequences (B, prefix + h*w, D) after the given blocks (default: the last).

        ``layers`` are block indices (negative counts from the end); ``norm`` applies the final
        LayerNorm to each returned sequence. Returns the list and the patch grid (h, w).
        """
        wanted = sorted({i % self.depth for i in (layers if layers else [-1])})
        x, grid = self.prepare_tokens(images)
        x = self.vit.patch_drop(x)
        x = self.vit.norm_pre(x)
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks):
            x = block(x)
            if index in wanted:
                outputs[index] = self.vit.norm(x) if norm else x
            if index >= wanted[-1]:
                break
        order = [i % self.depth for i in (layers if layers else [-1])]
        return [outputs[i] for i in order], grid

    def split_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split (B, T, D) tokens into (CLS (B, D) or zeros, patch grid (B, h, w, D))."""
        batch, _, dim = tokens.shape
        patches = tokens[:, self.num_prefix_tokens :].reshape(batch, grid[0], grid[1], dim)
        cls = tokens[:, 0] if self.vit.cls_token is not None else patches.mean(dim=(1, 2))
        return cls, patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features: last block, final LayerNorm, prefix tokens removed -> (B, h, w, D)."""
        (tokens,), grid = self.forward_tokens(images)
        return self.split_tokens(tokens, grid)[1]


def weights_fingerprint(backbone: Backbone) -> str:
    """A content hash (hex) of the backbone's parameters and buffers: equal weights, equal hash,
    whatever file (or random seed) they came from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(backbone.vit.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _create_vit(timm_name: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model`` for ViTs: no classifier, any input size; non-ViTs are refused."""
    try:
        model = timm.create_model(
            timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs
        )
    except TypeError as exc:  # non-ViT families do not take dynamic_img_size
        raise BackboneError(
            f"'{timm_name}' is not a ViT: pick a timm vit_* model "
            "(for example vit_small_patch8_224.dino)"
        ) from exc
    return _require_vit(model, timm_name)


def build_vit(arch: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A random-init timm ViT from ``{"model": timm name, "kwargs": {...}}`` (plus overrides)."""
    try:
        return _create_vit(arch["model"], **{**dict(arch.get("kwargs", {})), **overrides})
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError/...
        raise BackboneError(f"cannot build architecture {dict(arch)}: {exc}") from exc


def _require_vit(model: nn.Module, name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"'{name}' is a {type(model).__name__}, not a ViT: pick a timm vit_* model "
            "(for example vit_small_patch8_224.dino)"
        )
    return model


def infer_arch(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Guess a timm ViT architecture from a DINO-style state dict (head dim 64)."""
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
    except KeyError as exc:
        raise BackboneError(
            f"weights have no '{exc.args[0]}' entry: not a ViT state dict (keys such as "
            f"{', '.join(list(state)[:5])})"
        ) from exc
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    has_cls = "cls_token" in state
    num_reg = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    length = int(pos.shape[1])
    no_embed_class = False
    side = math.isqrt(length - int(has_cls))
    if side * side != length - int(has_cls):
        side, no_embed_class = math.isqrt(length), True
        if side * side != length:
            raise BackboneError(f"cannot infer the patch grid from pos_embed of length {length}")
    kwargs: dict[str, Any] = {
        "img_size": side * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": max(1, embed_dim // 64),
        "mlp_ratio": mlp_ratio,
        "class_token": has_cls,
        "reg_tokens": num_reg,
        "no_embed_class": no_embed_class,
    }
    return {"model": "vit_base_patch16_224", "kwargs": kwargs}


def _load_state(vit: VisionTransformer, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head", "fc_norm"))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{k} is {tuple(state[k].shape)} not {tuple(own[k].shape)}")
        raise BackboneError(
            f"weights {source} do not fit this architecture ({'; '.join(details)}): pass the "
            "matching --backbone, or omit it to infer the architecture from the weights"
        )
    vit.load_state_dict(state, strict=True)


def _hub_cached_file(timm_name: str) -> Path | None:
    """A locally cached copy of a timm model's pretrained weights, if any."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str):
                    return Path(found)
        except ImportError:
            pass
    if cfg.url:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if hub_file.is_file():
            return hub_file
    return None


def _online(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _resolve_name(name: str) -> tuple[str, str | None]:
    """Map a user-facing name to (timm model name, registered short name or None)."""
    entry = registered_backbone(name)
    if entry is not None and entry.timm_name is not None:
        return entry.timm_name, name
    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise BackboneError(
            f"unknown backbone '{name}': use one of {', '.join(available_backbones())}, a timm ViT "
            "name such as vit_small_patch14_reg4_dinov2.lvd142m, or a weights file path"
        )
    return name, None


def available_backbones() -> list[str]:
    """Short names accepted by :func:`load_backbone` besides timm names and file paths."""
    return backbone_names()


def _shipped_file(name: str) -> Path | None:
    """The weights file of a model shipped in the package, when it is there."""
    entry = registered_backbone(name)
    path = entry.shipped_file if entry is not None else None
    return path if path is not None and path.is_file() else None


def default_backbone_name() -> str:
    """The backbone used when none is named: ``dino_vits8`` when its weights are cached or can
    be downloaded, else the model shipped with dino-vos (when present)."""
    shipped = _shipped_file(SHIPPED_BACKBONE)
    default_timm = registered_backbone(DEFAULT_BACKBONE).timm_name  # type: ignore[union-attr]
    if shipped is None or _hub_cached_file(default_timm) is not None:
        return DEFAULT_BACKBONE
    return DEFAULT_BACKBONE if _online() else SHIPPED_BACKBONE


def _pretrained_vit(timm_name: str, short_name: str | None) -> tuple[VisionTransformer, str]:
    cached = _hub_cached_file(timm_name)
    if cached is not None:
        overlay = {"file": str(cached)}
        return _create_vit(timm_name, True, pretrained_cfg_overlay=overlay), str(cached)
    entry = registered_backbone(short_name) if short_name else None
    official = entry.checkpoint_file if entry and entry.checkpoint_file else "the weights file"
    hint = (
        f"download {official} (or the timm weights of {timm_name}) on a connected machine and "
        "pass --weights PATH"
    )
    if not _online():
        raise BackboneError(f"no network and no cached weights for '{timm_name}': {hint}")
    try:
        model = _create_vit(timm_name, True)
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise BackboneError(
            f"could not download weights for '{timm_name}' ({exc}): {hint}"
        ) from exc
    return model, f"timm:{timm_name}"


def load_backbone(
    name: str | None = None,
    weights: str | Path | None = None,
    checkpoint_key: str = "teacher",
    device: str | torch.device = "cpu",
    pos_embed: PosEmbedMode = "reference",
    pretrained: bool = True,
) -> Backbone:
    """Build a backbone by name and/or weights file, in eval mode on ``device``.

    - ``name``: an official DINO short name (``dino_vits8`` ...), a model shipped with dino-vos,
      any timm ViT name, or a path to a weights file. ``None`` infers the architecture from
      ``weights``, or without weights takes :func:`default_backbone_name`.
    - ``weights``: a local file (official DINO ``.pth``, training checkpoints with
      ``teacher``/``student`` entries, ``.safetensors``, dino-vos checkpoints).
    - ``pretrained=False`` gives a random-init model of the named architecture.
    """
    if name is None and weights is None:
        name = default_backbone_name()
    if name is not None and (Path(name).suffix in WEIGHT_SUFFIXES or Path(name).is_file()):
        if weights is not None:
            raise BackboneError("give the weights file either as the backbone or as --weights")
        name, weights = None, name
    shipped = _shipped_file(name) if name else None
    if not pretrained and weights is not None:
        raise BackboneError("random init takes no weights file: drop --weights or --random-init")
    if weights is None and shipped is not None and shipped.is_file():
        if not pretrained:  # the shipped architecture, freshly initialised
            state, recorded_arch = load_backbone_state(shipped, checkpoint_key)
            arch = recorded_arch or infer_arch(state)
            backbone = Backbone(build_vit(arch), f"{name} (random init)", pos_embed, arch)
            backbone.weights_id = "random"
            return backbone.to(resolve_device(device)).eval()
        weights = shipped
    if weights is not None:
        state, recorded_arch = load_backbone_state(weights, checkpoint_key)
        if name is not None and not (shipped is not None and Path(weights) == shipped):
            timm_name, _ = _resolve_name(name)
            vit = _create_vit(timm_name)
            arch: Mapping[str, Any] = {"model": timm_name.split(".")[0], "kwargs": {}}
        else:
            arch = recorded_arch or infer_arch(state)
            vit = build_vit(arch)
        _load_state(vit, state, str(weights))
        label = name or Path(weights).stem
        weights_id = f"file:{Path(weights).resolve()}:{Path(weights).stat().st_size}"
    else:
        timm_name, short_name = _resolve_name(name)
        if pretrained:
            vit, weights_id = _pretrained_vit(timm_name, short_name)
        else:
            vit = _create_vit(timm_name)
            weights_id = "random"
        arch = {"model": timm_name.split(".")[0], "kwargs": {}}
        label = name if pretrained else f"{name} (random init)"
    backbone = Backbone(vit, label, pos_embed=pos_embed, arch=arch)
    backbone.weights_id = weights_id
    return backbone.to(resolve_device(device)).eval()
