"""DINOv3 (Simeoni et al. 2025): timm's ``Eva`` with ``rope_type='dinov3'``: rotary position
embeddings on the patch tokens, no position embedding to resize, storage (register) tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import RotaryEmbeddingDinoV3, apply_rot_embed_cat
from timm.models.eva import Eva
from torch import nn

from dino_vos.backbones import Backbone
from dino_vos.errors import BackboneError, param


class Dinov3Backbone(Backbone):
    """DINOv3's ``DinoVisionTransformer`` through timm's port (features by timm's
    ``forward_intermediates``, which equals the original ``get_intermediate_layers``).

    RoPE is computed for each input's patch grid (coordinates normalised per side, base 100),
    so any frame size runs without a resize: the only rule is ``rope``.
    """

    family = "dinov3"
    pos_embed_rules = ("rope",)
    vit: Eva

    @classmethod
    def accepts(cls, vit: nn.Module, arch: Mapping[str, Any] | None) -> bool:
        return isinstance(vit, Eva) and isinstance(vit.rope, RotaryEmbeddingDinoV3)

    def resolve_pos_embed(self, mode: str) -> str:
        if mode not in ("auto", "rope"):
            raise BackboneError(
                f"{self.name} is a DINOv3 model: rotary position embeddings, nothing to resize, "
                f"so {param('pos_embed', mode)} does not apply: drop it (or use auto)"
            )
        return "rope"

    def forward_tokens(
        self, images: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = True
    ) -> tuple[list[torch.Tensor], tuple[int, int]]:
        order = [i % self.depth for i in (layers if layers else [-1])]
        wanted = sorted(set(order))
        outputs: Any = self.vit.forward_intermediates(
            images,
            indices=wanted,
            norm=norm,
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
            stop_early=True,
        )
        tokens = {
            index: torch.cat([prefix, patches], dim=1)
            for index, (patches, prefix) in zip(wanted, outputs, strict=True)
        }
        grid = self.vit.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))
        return [tokens[i] for i in order], (int(grid[0]), int(grid[1]))

    def _embed(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Tokens entering block 0, the RoPE (sin, cos) of the grid, and the grid."""
        x = self.vit.patch_embed(images)
        grid = (int(x.shape[1]), int(x.shape[2]))
        x, rope = self.vit._pos_embed(x)
        return self.vit.norm_pre(x), rope, grid

    def last_block_input(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, rope, grid = self._embed(images)
        for block in self.vit.blocks[:-1]:
            x = block(x, rope=rope)
        return x, grid

    def cls_attention_row(
        self, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The CLS query against every key, with the rotary embedding of ``grid`` applied to
        the patch keys (prefix tokens get none, as in the model): (B, heads, T)."""
        self.require_cls_attention()
        if grid is None:
            raise BackboneError("DINOv3 attention needs the patch grid of the tokens (RoPE)")
        block: Any = self.vit.blocks[-1]  # a timm block: its layers are read by name
        attn = block.attn
        x = block.norm1(tokens)
        batch, length, _ = x.shape
        if attn.qkv is not None:
            bias = None
            if attn.q_bias is not None:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = F.linear(x, attn.qkv.weight, bias).reshape(batch, length, 3, attn.num_heads, -1)
            q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        else:
            q = attn.q_proj(x[:, :1]).reshape(batch, 1, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(x).reshape(batch, length, attn.num_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope_embed: Any = self.vit.rope  # timm's RotaryEmbeddingDinoV3
        rope = rope_embed.get_embed(shape=list(grid)).to(k.dtype)
        prefix = attn.num_prefix_tokens
        rotated = apply_rot_embed_cat(k[:, :, prefix:], rope, half=attn.rotate_half)
        k = torch.cat([k[:, :, :prefix], rotated.type_as(k)], dim=2)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
        return logits.float().softmax(dim=-1)[:, :, 0]
