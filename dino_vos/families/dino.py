"""DINO (Caron et al. 2021) and any other timm ``VisionTransformer`` with absolute position
embeddings: the reference position-embedding resize (docs/protocol.md#backbones)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_vos.backbones import Backbone
from dino_vos.errors import BackboneError


class DinoBackbone(Backbone):
    """A timm ``VisionTransformer`` run as DINO's ``vision_transformer.py`` runs it.

    ``reference``: the patch position embeddings are resized by scale factors
    ``(h + 0.1) / sqrt(N)``, bicubic, no antialias, as DINO's ``interpolate_pos_encoding``;
    ``timm``: timm's dynamic resize (to a size, antialiased).
    """

    family = "dino"
    pos_embed_rules = ("reference", "timm")
    vit: VisionTransformer

    @classmethod
    def accepts(cls, vit: nn.Module, arch: Mapping[str, Any] | None) -> bool:
        return isinstance(vit, VisionTransformer)

    def resolve_pos_embed(self, mode: str) -> str:
        return "reference" if mode == "auto" else mode

    def _reference_patch_pos(
        self, grid: tuple[int, int], image_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Patch position embeddings resized with the DINO reference formula (scale factors)."""
        vit = self.vit
        pos = vit.pos_embed
        assert pos is not None  # the DINO family learns position embeddings
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

    def last_block_input(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.depth > 1:
            (tokens,), grid = self.forward_tokens(images, layers=[self.depth - 2], norm=False)
            return tokens, grid
        tokens, grid = self.prepare_tokens(images)
        return self.vit.norm_pre(self.vit.patch_drop(tokens)), grid

    def require_cls_attention(self) -> None:
        super().require_cls_attention()
        block = self.vit.blocks[-1]
        if not isinstance(getattr(getattr(block, "attn", None), "qkv", None), nn.Linear):
            raise BackboneError(
                f"the last block of {self.name} ({type(block).__name__}) has no norm1/attn.qkv: "
                "attention maps need a standard timm ViT block"
            )

    def cls_attention_row(
        self, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Only the CLS query is computed (row 0 of the attention matrix), with the block's own
        ``q_norm``/``k_norm`` and ``scale``."""
        self.require_cls_attention()
        block: Any = self.vit.blocks[-1]  # a timm block: its layers are read by name
        attn = block.attn
        heads = int(attn.num_heads)
        attn_dim = attn.qkv.out_features // 3
        head_dim = int(getattr(attn, "head_dim", attn_dim // heads))
        scale = float(getattr(attn, "scale", head_dim**-0.5))
        x = block.norm1(tokens)
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q_bias = bias[:attn_dim] if bias is not None else None
        k_bias = bias[attn_dim : 2 * attn_dim] if bias is not None else None
        batch, length, _ = x.shape
        q = F.linear(x[:, :1], weight[:attn_dim], q_bias).reshape(batch, 1, heads, head_dim)
        k = F.linear(x, weight[attn_dim : 2 * attn_dim], k_bias).reshape(batch, length, heads, -1)
        q, k = attn.q_norm(q.transpose(1, 2)), attn.k_norm(k.transpose(1, 2))
        logits = (q * scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
        return logits.float().softmax(dim=-1)[:, :, 0]
