"""Checkpoint formats as a table: how each original code lays out a file with backbone weights.

Each :class:`CheckpointFormat` says how to recognise a file's content (``detect``) and where
the backbone's state dict is in it (``extract``); :data:`FORMATS` is tried in order, the first
match wins (the README's format table is this table). The state dict then goes through
:func:`dino_vos.checkpoints.clean_state_dict` (wrappers, heads, decoders dropped) and
:func:`dino_vos.arch.infer_arch`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from dino_vos.arch import is_dinov3_layout
from dino_vos.checkpoints import (
    NETWORK_PREFIXES,
    WRAPPER_PREFIXES,
    BackboneWeights,
    clean_state_dict,
    is_state_dict,
    strip_prefixes,
)
from dino_vos.errors import BackboneError, param

#: Width and head count fixed by an architecture name the original code records: ``args.arch``
#: of DINO and iBOT (``deit_*`` in early DINO), DINOv2's ``student.arch``, MAE's ``args.model``.
ARCH_NAMES: dict[str, tuple[int, int]] = {
    "vit_tiny": (192, 3),
    "vit_small": (384, 6),
    "vit_base": (768, 12),
    "vit_large": (1024, 16),
    "vit_giant2": (1536, 24),
    "deit_tiny": (192, 3),
    "deit_small": (384, 6),
    "mae_vit_base_patch16": (768, 12),
    "mae_vit_large_patch16": (1024, 16),
    "mae_vit_huge_patch14": (1280, 16),
}
#: MoCo v3's ``vits.py`` uses 12 heads for its ViT-S (head dim 32), unlike DINO.
MOCO_V3_ARCH_NAMES: dict[str, tuple[int, int]] = {
    "vit_small": (384, 12),
    "vit_base": (768, 12),
    "vit_large": (1024, 16),
    "vit_huge": (1280, 16),
}
#: The two networks of a MoCo v3 checkpoint (``state_dict`` with ``module.<network>.`` keys).
MOCO_NETWORKS = ("base_encoder", "momentum_encoder")
#: Training checkpoints with one entry per network.
TRAINING_NETWORKS = ("teacher", "student")
#: Entries that wrap a single network's state dict (MAE, iBOT releases, timm training, MoCo).
WRAPPERS = ("state_dict", "model", "backbone")

Content = Mapping[str, Any]
#: (state dict, network it is, the network key to select inside it (MoCo v3) or None)
Found = tuple[Mapping[str, torch.Tensor], str | None, str | None]


@dataclass(frozen=True)
class CheckpointFormat:
    """One layout: ``detect(content, checkpoint_key)`` recognises it, ``extract(content,
    checkpoint_key, source)`` returns the state dict (and which network it is); ``arch_names``
    maps a recorded architecture name to (width, heads)."""

    name: str
    detect: Callable[[Content, str | None], bool]
    extract: Callable[[Content, str | None, str], Found]
    arch_names: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: MappingProxyType(ARCH_NAMES)
    )


# ---------------------------------------------------------------------------- detection helpers


def _networks(content: Content) -> list[str]:
    return [k for k in TRAINING_NETWORKS if is_state_dict(content.get(k))]


def _wrapper(content: Content) -> str | None:
    return next((k for k in WRAPPERS if is_state_dict(content.get(k))), None)


def _single_state(content: Content) -> Mapping[str, torch.Tensor] | None:
    """The one state dict of the file: the content itself or its wrapper entry."""
    if is_state_dict(content):
        return content
    wrapper = _wrapper(content)
    return content[wrapper] if wrapper is not None else None


def _keys(state: Mapping[str, torch.Tensor] | None) -> list[str]:
    return [strip_prefixes(k, WRAPPER_PREFIXES + NETWORK_PREFIXES) for k in (state or {})]


def _moco_networks(content: Content) -> list[str]:
    state = content.get("state_dict")
    stripped = [strip_prefixes(k, WRAPPER_PREFIXES) for k in state] if is_state_dict(state) else []
    return [n for n in MOCO_NETWORKS if any(k.startswith(n + ".") for k in stripped)]


def _training(content: Content, key: str | None) -> bool:
    return bool(_networks(content)) and not is_state_dict(content)


def _teacher_keys(content: Content) -> list[str]:
    networks = _networks(content)
    return _keys(content[networks[0]]) if networks else []


def _is_mae(content: Content, key: str | None) -> bool:
    return not _training(content, key) and any(
        k.startswith("decoder_") for k in _keys(_single_state(content))
    )


# ---------------------------------------------------------------------------- extraction


def _single_network(content: Content, key: str | None, source: str) -> Found:
    """A file with one network: ``checkpoint_key`` does not apply (except to name an entry of
    the file from the Python API)."""
    if key is not None and key in content and is_state_dict(content[key]):
        return content[key], key, None
    state = _single_state(content)
    if state is None:
        raise BackboneError(
            f"{source} holds no backbone weights (keys: {', '.join(list(content)[:8])}); "
            "expected a state dict, 'teacher'/'student' entries or a 'state_dict'/'model' entry"
        )
    if key is not None:
        raise BackboneError(
            f"{source} holds a single network ({detect_format(content, None).name}), so "
            f"{param('checkpoint_key', key)} does not apply: drop it"
        )
    return state, None, None


def _training_network(content: Content, key: str | None, source: str) -> Found:
    """``teacher`` (default) or ``student`` of a training checkpoint."""
    networks = _networks(content)
    network = key or "teacher"
    if network not in networks:
        raise BackboneError(
            f"{source} has no '{network}' entry (it has {', '.join(networks)}): "
            f"use {param('checkpoint_key', networks[0])}"
        )
    return content[network], network, None


def _moco_network(content: Content, key: str | None, source: str) -> Found:
    """MoCo v3: ``base_encoder`` (default) or ``momentum_encoder`` inside ``state_dict``."""
    moco = _moco_networks(content)
    network = key or "base_encoder"
    if network not in moco:
        raise BackboneError(
            f"{source} is a MoCo v3 checkpoint with {' and '.join(moco)}, not '{network}': "
            f"use {param('checkpoint_key', ' or '.join(moco))} (default base_encoder)"
        )
    return content["state_dict"], network, network


def _named_entry(content: Content, key: str | None, source: str) -> Found:
    """Any state-dict entry named by ``checkpoint_key`` (from the Python API)."""
    return content[key], key, None  # type: ignore[index]


def _wrapped(name: str) -> CheckpointFormat:
    return CheckpointFormat(
        f"state dict in '{name}'",
        lambda c, k: not is_state_dict(c) and _wrapper(c) == name,
        _single_network,
    )


#: The plain state dict (DINO, timm releases), which a safetensors file refines into its own
#: description (with or without a recorded architecture).
STATE_DICT = CheckpointFormat("state dict", lambda c, k: is_state_dict(c), _single_network)
#: Every layout, most specific first (the README's "Backbones and weights" table).
FORMATS: tuple[CheckpointFormat, ...] = (
    CheckpointFormat(
        "dino-vos pretraining checkpoint",
        lambda c, k: _training(c, k) and c.get("format") == "dino-vos-pretrain",
        _training_network,
    ),
    CheckpointFormat(
        "iBOT training checkpoint",
        lambda c, k: _training(c, k) and "ibot_loss" in c,
        _training_network,
    ),
    CheckpointFormat(
        "DINO training checkpoint",
        lambda c, k: _training(c, k) and "dino_loss" in c,
        _training_network,
    ),
    CheckpointFormat(
        "DINOv2 training checkpoint",
        lambda c, k: _training(c, k) and "mask_token" in _teacher_keys(c),
        _training_network,
    ),
    CheckpointFormat("training checkpoint", _training, _training_network),
    CheckpointFormat(
        "MoCo v3 checkpoint",
        lambda c, k: not is_state_dict(c) and bool(_moco_networks(c)),
        _moco_network,
        MappingProxyType(MOCO_V3_ARCH_NAMES),
    ),
    CheckpointFormat(
        "state dict",  # an entry named from the Python API
        lambda c, k: k is not None and not is_state_dict(c) and is_state_dict(c.get(k)),
        _named_entry,
    ),
    CheckpointFormat("MAE checkpoint", _is_mae, _single_network),
    CheckpointFormat(
        "DINOv3 state dict",
        lambda c, k: is_state_dict(c) and "mask_token" in c and is_dinov3_layout(c),
        _single_network,
    ),
    CheckpointFormat(
        "DINOv2 state dict",
        lambda c, k: is_state_dict(c) and "mask_token" in c and "pos_embed" in c,
        _single_network,
    ),
    STATE_DICT,
    *(_wrapped(name) for name in WRAPPERS),
)


def detect_format(content: Content, checkpoint_key: str | None = None) -> CheckpointFormat:
    """The first format of :data:`FORMATS` that recognises ``content``."""
    for fmt in FORMATS:
        if fmt.detect(content, checkpoint_key):
            return fmt
    return STATE_DICT  # extraction then names what the file holds instead


def _recorded_arch_name(content: Content) -> str | None:
    """The architecture name the training script stored: ``args.arch`` (DINO, iBOT),
    ``args.model`` (MAE) or a top-level ``arch`` string (MoCo v3)."""
    args = content.get("args")
    candidates = [content.get("arch")]
    if args is not None:
        for name in ("model", "arch"):
            candidates.insert(
                0, args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)
            )
    return next((c for c in candidates if isinstance(c, str)), None)


def _recorded_heads(weights: BackboneWeights, fmt: CheckpointFormat) -> int | None:
    """Heads fixed by the recorded architecture name, when its width matches the weights."""
    known = fmt.arch_names.get(weights.arch_name or "")
    proj = weights.state.get("patch_embed.proj.weight")
    if known is None or proj is None or int(proj.shape[0]) != known[0]:
        return None
    return known[1]


def extract_backbone_weights(
    content: Content, checkpoint_key: str | None = None, source: str = "checkpoint"
) -> BackboneWeights:
    """Find the backbone state dict (and what the file records about it) inside a checkpoint.

    The format is the first of :data:`FORMATS` that recognises the file; ``checkpoint_key``
    picks the network of a file with several (teacher by default, MoCo v3's base encoder by
    default), and is an error for a file with one.
    """
    fmt = detect_format(content, checkpoint_key)
    raw, network, select = fmt.extract(content, checkpoint_key, source)
    state, dropped = clean_state_dict(raw, select=select, source=source)
    if "mask_token" in state:
        dropped.append("mask_token")  # removed by timm's DINOv2 / DINOv3 conversion
    recorded = content.get("arch") if isinstance(content.get("arch"), Mapping) else None
    weights = BackboneWeights(
        state, fmt.name, network, recorded, _recorded_arch_name(content), dropped, kind=fmt
    )
    weights.num_heads = _recorded_heads(weights, fmt)
    return weights
