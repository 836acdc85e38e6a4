"""timm models for the backbone families: creation by name or recorded architecture, and a
state dict fitted into them (release layouts converted by timm's own checkpoint filters)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import timm
import torch
from timm.models import eva
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from dino_vos.arch import is_dinov3_layout
from dino_vos.checkpoints import BackboneWeights, summarize_keys
from dino_vos.errors import BackboneError, PartialWeightsWarning, param


def create_model(timm_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for a backbone: no classifier, any input size; a model no family
    runs (a CNN, EVA-02, ...) is refused."""
    from dino_vos.backbones import family_for

    try:
        model = timm.create_model(
            timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs
        )
    except TypeError as exc:  # non-ViT families do not take dynamic_img_size
        raise BackboneError(
            f"'{timm_name}' is not a ViT: pick a timm vit_* model "
            "(for example vit_small_patch8_224.dino or vit_small_patch16_dinov3)"
        ) from exc
    family_for(model, {"model": timm_name})
    return model


def build_vit(arch: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """A random-init timm model from ``{"model": timm name, "kwargs": {...}}`` (plus overrides)."""
    try:
        return create_model(arch["model"], **{**dict(arch.get("kwargs", {})), **overrides})
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError/...
        raise BackboneError(f"cannot build architecture {dict(arch)}: {exc}") from exc


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _misfit(
    source: str, weights: BackboneWeights, problems: list[str], partial: bool, named: bool
) -> str:
    fix = (
        f"pass the matching {param('name')}, or omit it to infer the architecture from the "
        "weights"
        if named
        else "the architecture was inferred from the weights, so the file lacks parts of a ViT "
        f"or holds other modules: check it, or name the architecture with {param('name')}"
    )
    hint = f" ({param('allow_partial', True)} loads the matching keys anyway)" if partial else ""
    return (
        f"weights {source} ({weights.describe()}) do not fit this architecture "
        f"({'; '.join(problems)}): {fix}{hint}"
    )


def _timm_layout(
    vit: Any, weights: BackboneWeights, source: str, named: bool
) -> dict[str, torch.Tensor]:
    """The state dict with timm keys: DINOv2's layout goes through timm's own checkpoint filter
    (``mask_token`` dropped, ``register_tokens`` -> ``reg_token`` with the CLS position folded
    into ``cls_token``, SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``)."""
    state = dict(weights.state)
    if is_dinov3_layout(state) and isinstance(vit, eva.Eva):
        return _dinov3_timm_layout(vit, state, weights, source, named)
    if not weights.dinov2_layout:
        return state
    # timm's filter resamples another patch size or grid and assumes the register layout of
    # the model: check those first, so that a mismatch is refused instead of resampled
    problems = []
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    own_proj = vit.patch_embed.proj.weight
    if proj is not None and proj.shape != own_proj.shape:
        problems.append(
            f"patch_embed.proj.weight is {tuple(proj.shape)} not {tuple(own_proj.shape)}"
        )
    if pos is not None and pos.shape[1] - 1 != vit.patch_embed.num_patches:
        problems.append(
            f"pos_embed holds {pos.shape[1] - 1} patch positions not {vit.patch_embed.num_patches}"
        )
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    own_registers = int(getattr(vit, "num_reg_tokens", 0))
    if registers != own_registers or (registers and not vit.no_embed_class):
        if registers:
            problems.append(
                f"unexpected register_tokens ({registers}, the model has {own_registers})"
            )
        else:
            problems.append(f"missing register_tokens (the model has {own_registers})")
    if problems:
        raise BackboneError(_misfit(source, weights, problems, partial=False, named=named))
    return checkpoint_filter_fn(state, vit)


def load_state(
    build: Callable[[], nn.Module],
    weights: BackboneWeights,
    source: str,
    allow_partial: bool = False,
    named: bool = True,
) -> nn.Module:
    """The model ``build`` makes, holding ``weights``: every key must match unless
    ``allow_partial``; a tensor of the wrong shape is always refused.

    The model is built on the meta device (no random init, which takes seconds for a large ViT
    on a CPU) and receives the loaded tensors; only a partial load builds it for real, so that
    the keys missing from the file keep timm's initialisation. ``named``: the architecture was
    named by the user (not inferred), for the advice of an error.
    """
    with torch.device("meta"):
        vit = build()
    state = _timm_layout(vit, weights, source, named)
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {summarize_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {summarize_keys(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        more = f" (and {len(wrong_shape) - 1} more)" if len(wrong_shape) > 1 else ""
        problems.append(f"{k} is {tuple(state[k].shape)} not {tuple(own[k].shape)}{more}")
    if wrong_shape or (problems and not allow_partial):
        raise BackboneError(_misfit(source, weights, problems, not wrong_shape, named))
    if problems:
        ignored = [
            f"{_count(len(missing), 'missing key')}, left random: {summarize_keys(missing)}"
            if missing
            else "",
            f"{_count(len(unexpected), 'unexpected key')}, ignored: {summarize_keys(unexpected)}"
            if unexpected
            else "",
        ]
        warnings.warn(
            f"{param('allow_partial', True)}: loaded {source} with "
            f"{'; '.join(p for p in ignored if p)}",
            PartialWeightsWarning,
            stacklevel=3,
        )
    if missing:
        vit = build()
        vit.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return vit
    tensors = {k: state[k].to(own[k].dtype).contiguous() for k in own}
    vit.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*vit.parameters(), *vit.buffers()]):  # non-persistent buffers
        vit = build()
        vit.load_state_dict(tensors, strict=True)
    return vit


def _dinov3_timm_layout(
    vit: eva.Eva,
    state: dict[str, torch.Tensor],
    weights: BackboneWeights,
    source: str,
    named: bool,
) -> dict[str, torch.Tensor]:
    """DINOv3's release layout in timm's Eva keys, by timm's ``eva.checkpoint_filter_fn``
    (``storage_tokens`` -> ``reg_token``, ``ls*.gamma`` -> ``gamma_*``, the qkv bias split into
    q and v (the k bias is masked to zero in DINOv3), SwiGLU ``w1/w2/w3``, RoPE periods and the
    ``bias_mask`` buffers dropped). A qkv bias the model lacks is refused, not dropped."""
    if "rope_embed.periods" not in state and "storage_tokens" not in state:
        return state  # timm's own keys already
    problems = []
    has_bias = any(k.endswith(".attn.qkv.bias") for k in state)
    if has_bias and getattr(vit.blocks[0].attn, "q_bias", None) is None:
        problems.append("unexpected blocks.*.attn.qkv.bias (use the _qkvb model)")
    proj, own_proj = state.get("patch_embed.proj.weight"), vit.patch_embed.proj.weight
    if proj is not None and proj.shape != own_proj.shape:
        problems.append(
            f"patch_embed.proj.weight is {tuple(proj.shape)} not {tuple(own_proj.shape)}"
        )
    if problems:
        raise BackboneError(_misfit(source, weights, problems, partial=False, named=named))
    return eva.checkpoint_filter_fn(state, vit)
