"""Architecture inference: the timm model of a state dict, from the shapes of its weights.

Two layouts: a ViT (timm ``VisionTransformer`` keys, or DINOv2's own layout) and a DINOv3 ViT
(the release layout of ``dinov3/hub/backbones.py``, or timm's ``Eva`` keys). The head count is
not stored in a ViT's weights: it comes from the checkpoint's recorded architecture, else from
the width (:data:`STANDARD_HEADS`), which :func:`infer_arch` reports as a guess. DINOv3 files
store it indirectly (the RoPE ``periods`` have head_dim / 4 entries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dino_vos.errors import BackboneError

#: Head counts of the standard ViT widths (Ti, S, B, L, H, g, DINOv2's g): the weights do not
#: store the head count, so an inferred architecture takes it from here (or from the name the
#: checkpoint records), and only for other widths assumes 64-dimensional heads.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}
#: DINOv3's widths (S, S+, B, L, H+, 7B): 64-dimensional heads throughout.
DINOV3_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
#: The RoPE base of every DINOv3 release (``pos_embed_rope_base``), timm's ``rope_temperature``.
DINOV3_ROPE_BASE = 100.0
#: Key that tells the arch dict the head count was guessed from the width (popped on use).
GUESSED_HEADS = "guessed_heads"


def _heads_for(embed_dim: int, table: Mapping[int, int] = STANDARD_HEADS) -> int:
    """The standard head count of a width, else one head per 64 channels (a divisor)."""
    heads = table.get(embed_dim) or max(1, embed_dim // 64)
    while embed_dim % heads:
        heads -= 1
    return heads


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def _not_a_vit(state: Mapping[str, torch.Tensor], what: str) -> BackboneError:
    return BackboneError(
        f"weights have no {what}: not a ViT state dict (keys such as {', '.join(list(state)[:5])})"
    )


def _mlp_ratio(embed_dim: int, hidden: int) -> float:
    """The ratio timm floors back to ``hidden`` (int(embed_dim * ratio) == hidden)."""
    ratio = hidden / embed_dim
    return ratio if int(embed_dim * ratio) == hidden else (hidden + 0.5) / embed_dim


def _any_block_has(state: Mapping[str, torch.Tensor], suffix: str) -> bool:
    """Whether any block holds ``suffix`` (so one missing key does not change the inference)."""
    return any(k.startswith("blocks.") and k.endswith(suffix) for k in state)


def is_dinov3_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """DINOv3 weights: the release layout (RoPE ``periods``, ``storage_tokens``) or timm's Eva
    keys (``gamma_1``, ``q_bias``, no ``pos_embed``)."""
    if "rope_embed.periods" in state or "storage_tokens" in state:
        return True
    eva_keys = _any_block_has(state, ".gamma_1") or _any_block_has(state, ".attn.q_bias")
    return eva_keys and "pos_embed" not in state


def infer_arch(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Guess the timm model of a state dict (ViT or DINOv3 layouts).

    Returns ``{"model": timm name, "kwargs": {...}}``; when the head count was guessed from the
    width (not given as ``num_heads``, not in the weights) the dict also holds
    ``"guessed_heads": True``.
    """
    if is_dinov3_layout(state):
        return infer_dinov3_arch(state, num_heads)
    return infer_vit_arch(state, num_heads)


def infer_vit_arch(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> dict[str, Any]:
    """Guess the timm ViT of a state dict with timm or DINOv2 keys.

    Width and patch come from ``patch_embed.proj.weight``, depth from the block indices, the MLP
    (ratio, SwiGLU) from block 0, layer scale from any block's ``ls1.gamma``, prefix tokens and
    the stored grid from ``cls_token``/``reg_token``/``register_tokens``/``pos_embed``. The head
    count: ``num_heads``, else :data:`STANDARD_HEADS` for the width, else one per 64 channels.
    """
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
    except KeyError as exc:
        conv_stem = "patch_embed.proj.0.weight" in state  # e.g. MoCo v3 vit_conv_*
        stem = " (a convolutional stem is not supported)" if conv_stem else ""
        raise BackboneError(
            f"weights have no '{exc.args[0]}' entry: not a ViT state dict{stem} (keys such as "
            f"{', '.join(list(state)[:5])})"
        ) from exc
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = _depth(state)
    fc1 = state.get("blocks.0.mlp.fc1.weight", state.get("blocks.0.mlp.w12.weight"))
    fc2 = state.get("blocks.0.mlp.fc2.weight", state.get("blocks.0.mlp.w3.weight"))
    if depth == 0 or fc1 is None or fc2 is None:
        raise _not_a_vit(state, "transformer blocks with an MLP (blocks.0.mlp.fc1/fc2)")
    hidden = int(fc1.shape[0])
    swiglu = hidden == 2 * int(fc2.shape[1])  # SwiGLU packs both projections in fc1 (w12)
    has_cls = "cls_token" in state
    dinov2 = "mask_token" in state  # DINOv2 layout: the CLS position is always stored
    reg_key = "register_tokens" if dinov2 else "reg_token"
    num_reg = int(state[reg_key].shape[1]) if reg_key in state else 0
    length = int(pos.shape[1])
    if dinov2:  # DINOv2 stores the CLS position, never registers; timm folds it for registers
        layouts = [(length - 1, num_reg > 0)]
    else:  # timm: prefix positions stored (no_embed_class False) or patch positions only
        layouts = [(length - int(has_cls) - num_reg, False), (length, True)]
        layouts = layouts[::-1] if num_reg else layouts  # registers: timm's DINOv2 convention
    grid = next(((n, flag) for n, flag in layouts if n > 0 and math.isqrt(n) ** 2 == n), None)
    if grid is None:
        raise BackboneError(f"cannot infer the patch grid from pos_embed of length {length}")
    side, no_embed_class = math.isqrt(grid[0]), grid[1]
    kwargs: dict[str, Any] = {
        "img_size": side * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads or _heads_for(embed_dim),
        "mlp_ratio": _mlp_ratio(embed_dim, hidden),
        "class_token": has_cls,
        "reg_tokens": num_reg,
        "no_embed_class": no_embed_class,
    }
    if _any_block_has(state, ".ls1.gamma"):
        kwargs["init_values"] = 1e-5  # layer scale (DINOv2); the value is loaded
    if _any_block_has(state, ".attn.qkv.weight") and not _any_block_has(state, ".attn.qkv.bias"):
        kwargs["qkv_bias"] = False
    model = "vit_giant_patch14_dinov2" if swiglu else "vit_base_patch16_224"
    arch: dict[str, Any] = {"model": model, "kwargs": kwargs}
    if num_heads is None and not (dinov2 and embed_dim in STANDARD_HEADS):
        arch[GUESSED_HEADS] = True  # DINOv2's releases all have 64-channel heads
    return arch


def _dinov3_heads(state: Mapping[str, torch.Tensor], embed_dim: int) -> int | None:
    """The head count the RoPE periods fix (head_dim / 4 of them), after checking that they
    follow the base of every DINOv3 release (timm computes them from that base)."""
    periods = state.get("rope_embed.periods")
    if periods is None:
        return None
    quarter = int(periods.shape[0])
    head_dim = 4 * quarter
    expected = DINOV3_ROPE_BASE ** (
        2 * torch.arange(quarter, dtype=torch.float64) / (head_dim // 2)
    )
    if not torch.allclose(periods.double(), expected, rtol=1e-4):
        raise BackboneError(
            f"rope_embed.periods do not follow base {DINOV3_ROPE_BASE:g} (the DINOv3 releases' "
            "pos_embed_rope_base): other RoPE settings are not supported"
        )
    if embed_dim % head_dim:
        raise BackboneError(
            f"rope_embed.periods give head dim {head_dim}, not a divisor of {embed_dim}"
        )
    return embed_dim // head_dim


def infer_dinov3_arch(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> dict[str, Any]:
    """The timm DINOv3 model (an ``Eva`` with ``rope_type='dinov3'``) of DINOv3 weights.

    Width and patch from ``patch_embed.proj.weight``, depth from the blocks, the MLP (plain or
    SwiGLU, ``w1``/``w2``/``w3`` or ``fc1_g``/``fc1_x``) and its width from block 0, storage
    (register) tokens, layer scale, the qkv bias, and the head count from ``rope_embed.periods``
    (timm's files do not keep them: then ``num_heads`` or :data:`DINOV3_HEADS`).
    """
    proj = state.get("patch_embed.proj.weight")
    if proj is None or _depth(state) == 0:
        raise _not_a_vit(state, "patch embedding and blocks (patch_embed.proj.weight, blocks.*)")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    gate = state.get("blocks.0.mlp.w1.weight", state.get("blocks.0.mlp.fc1_g.weight"))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_in = gate if gate is not None else fc1
    if mlp_in is None:
        raise _not_a_vit(state, "MLP in block 0 (blocks.0.mlp.fc1 or w1/w2/w3)")
    hidden = int(mlp_in.shape[0])
    tokens = state.get("storage_tokens", state.get("reg_token"))
    heads = num_heads or _dinov3_heads(state, embed_dim)
    qkv_bias = _any_block_has(state, ".attn.qkv.bias") or _any_block_has(state, ".attn.q_bias")
    kwargs: dict[str, Any] = {
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": _depth(state),
        "num_heads": heads or _heads_for(embed_dim, DINOV3_HEADS),
        "mlp_ratio": _mlp_ratio(embed_dim, hidden),
        "num_reg_tokens": int(tokens.shape[1]) if tokens is not None else 0,
        "init_values": 1e-5
        if _any_block_has(state, ".ls1.gamma") or _any_block_has(state, ".gamma_1")
        else None,
    }
    plus = "_plus" if gate is not None else ""  # SwiGLU: timm's S+ / H+ configuration
    model = f"vit_small{plus}_patch16_dinov3" + ("_qkvb" if qkv_bias else "")
    arch: dict[str, Any] = {"model": model, "kwargs": kwargs}
    if heads is None:
        arch[GUESSED_HEADS] = True
    return arch
