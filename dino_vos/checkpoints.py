"""Reading and writing backbone weights: official DINO ``.pth``, safetensors, dino-vos checkpoints.

Everything is loaded with ``torch.load(..., weights_only=True)`` (or safetensors), so a
checkpoint can never run code. dino-vos writes plain dicts of tensors and builtins only.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dino_vos.atomic import atomic_path
from dino_vos.errors import BackboneError, param

if TYPE_CHECKING:
    from dino_vos.formats import CheckpointFormat

ARCH_METADATA_KEY = "dino_vos_arch"
#: The only non-builtin objects a checkpoint may hold: the training scripts of DINO
#: (``main_dino.py``), iBOT (``main_ibot.py``) and MAE (``main_pretrain.py``) store the run's
#: ``args`` as an ``argparse.Namespace`` of plain values; MoCo v3, DINOv2 and timm files need
#: nothing beyond tensors and builtins. Anything else stays refused.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def _numpy_globals() -> list[Any]:
    """The numpy globals that rebuild plain numpy scalars and dtypes, nothing that calls other
    code: ``multiarray.scalar`` (both numpy 1.x and 2.x spellings), ``numpy.dtype`` and the
    numeric dtype classes. ``main_dino.py`` and ``main_ibot.py`` set each param group's ``lr``
    and ``weight_decay`` from numpy schedules, so every real ``checkpoint.pth`` holds
    ``numpy.float64`` values in its optimizer state."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes of scalars with their class
        numeric = "Bool Int8 UInt8 Int16 UInt16 Int32 UInt32 Int64 UInt64 Long ULong LongLong "
        numeric += "ULongLong Float16 Float32 Float64 LongDouble Complex64 Complex128 CLongDouble"
        allowed += [
            getattr(dtypes, f"{name}DType")
            for name in numeric.split()
            if hasattr(dtypes, f"{name}DType")
        ]
    return allowed


#: Wrappers around a whole model, stripped wherever they lead a key: DDP and ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: The ViT inside a training wrapper (DINO/iBOT/DINOv2 ``backbone``, I-JEPA ``encoder``).
NETWORK_PREFIXES = ("backbone.", "encoder.")
NETWORK_PREFIXES_NAMES = tuple(prefix.rstrip(".") for prefix in NETWORK_PREFIXES)
#: Entries that are not part of the backbone, dropped on purpose (and reported as such).
DROPPED_PREFIXES = (
    "head.",  # classifier / DINO, iBOT and MoCo projection heads
    "head_drop.",
    "fc_norm.",  # the norm of a pooled classifier feature
    "dino_head.",  # DINOv2 heads
    "ibot_head.",
    "decoder_",  # MAE decoder: decoder_embed, decoder_pos_embed, decoder_blocks, ...
    "predictor.",  # MoCo v3 predictor
)
#: Masked-image-modelling tokens, used only in pretraining: iBOT's ``masked_embed`` and the MAE
#: decoder's ``mask_token`` (DINOv2's ``mask_token`` is dropped by timm's DINOv2 conversion).
DROPPED_KEYS = ("masked_embed",)


@dataclass
class BackboneWeights:
    """A backbone's state dict, cleaned of wrappers and heads, and what the file says about it.

    ``state`` has timm ``VisionTransformer`` keys, except for DINOv2's own layout
    (``mask_token``, ``register_tokens``, ``mlp.w12``), which :func:`dino_vos.backbones`
    converts with timm's checkpoint filter once the model is built. ``arch``: the architecture
    dino-vos recorded; ``arch_name``: the original code's architecture name (``args.arch``,
    MoCo v3's ``arch``, MAE's ``args.model``), which fixes the head count; ``dropped``: keys left
    out on purpose (heads, decoders, the other network); ``num_heads``: the head count that
    ``arch_name`` fixes, when the weights have its width.
    """

    state: dict[str, torch.Tensor]
    format: str
    network: str | None = None
    arch: dict[str, Any] | None = None
    arch_name: str | None = None
    dropped: list[str] = field(default_factory=list)
    num_heads: int | None = None
    kind: CheckpointFormat | None = None

    @property
    def dinov2_layout(self) -> bool:
        """Keys as DINOv2 writes them (``mask_token``; registers not in ``pos_embed``)."""
        return "mask_token" in self.state and "pos_embed" in self.state

    def dropped_groups(self) -> list[str]:
        """The modules dropped on purpose, e.g. ``['head', 'masked_embed']``."""
        groups = []
        for key in self.dropped:
            parts = strip_prefixes(key, WRAPPER_PREFIXES).split(".")
            while len(parts) > 1 and parts[0] in (*NETWORK_PREFIXES_NAMES, self.network):
                parts = parts[1:]
            groups.append(parts[0])
        return list(dict.fromkeys(groups))

    def describe(self) -> str:
        """e.g. ``iBOT training checkpoint (teacher), dropped head, masked_embed``."""
        text = f"{self.format} ({self.network})" if self.network else self.format
        groups = self.dropped_groups()
        return text + (f", dropped {', '.join(groups)}" if groups else "")


def summarize_keys(keys: Iterable[str], limit: int = 4) -> str:
    """Keys with block indices folded (``blocks.*.ls1.gamma``), at most ``limit`` shown."""
    folded = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "*", key) for key in keys))
    shown = ", ".join(folded[:limit])
    return shown + (f" and {len(folded) - limit} more" if len(folded) > limit else "")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a checkpoint file as plain data; returns (content, safetensors metadata)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"weights file not found: {path} (check the path given as {param('weights')})"
        )
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))

            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise BackboneError(
                f"cannot read safetensors file {path}: {exc}; re-export the weights"
            ) from exc
        return tensors, metadata
    if not _looks_like_torch_file(path):
        raise BackboneError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle): give a "
            "DINO .pth, a dino-vos checkpoint or a .safetensors file"
        )
    try:
        with (
            warnings.catch_warnings(),
            torch.serialization.safe_globals(SAFE_GLOBALS + _numpy_globals()),
        ):
            warnings.simplefilter("ignore")
            content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        forbidden = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if forbidden:
            raise BackboneError(
                f"checkpoint {path} needs the Python object {forbidden.group(1)} to load, which "
                "could run code: refused (dino-vos loads plain tensors; re-save the weights as "
                "a state dict or .safetensors)"
            ) from None
        raise BackboneError(
            f"cannot read checkpoint {path}: {_load_error(exc)} (damaged or truncated?); expected "
            "a DINO .pth, a dino-vos checkpoint or a .safetensors file saved as plain tensors"
        ) from None
    if not isinstance(content, Mapping):
        raise BackboneError(f"checkpoint {path} holds a {type(content).__name__}, not a dict")
    return dict(content), {}


def _load_error(exc: Exception) -> str:
    """The cause in torch's load error, without its advice to turn the safety off."""
    text = str(exc).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    if unpickler:
        return unpickler.group(1).splitlines()[0][:200]
    if "weights_only" in text:
        return "not a plain-tensor checkpoint"
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream (older files)."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"  # the PROTO opcode that starts a pickle


def is_state_dict(obj: Any) -> TypeGuard[Mapping[str, torch.Tensor]]:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any of ``prefixes`` from the start of ``key``, repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def _unchunk_blocks(key: str) -> str:
    """DINOv2 with ``block_chunks > 0`` nests blocks as ``blocks.<chunk>.<index>.``; the index
    is already global (chunks are padded with ``nn.Identity``), so the chunk level goes."""
    return re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)


def clean_state_dict(
    state: Mapping[str, torch.Tensor], select: str | None = None, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes, keep only network ``select`` (MoCo v3), drop heads and decoders.

    Returns the backbone state dict and the (original) keys dropped on purpose.
    """
    names = {key: strip_prefixes(key, WRAPPER_PREFIXES) for key in state}
    mae = any(strip_prefixes(n, NETWORK_PREFIXES).startswith("decoder_") for n in names.values())
    cleaned: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        name = names[key]
        if select is not None:
            if not name.startswith(select + "."):
                dropped.append(key)  # the other network, the predictor
                continue
            name = name[len(select) + 1 :]
        name = _unchunk_blocks(strip_prefixes(name, WRAPPER_PREFIXES + NETWORK_PREFIXES))
        mae_mask_token = mae and name == "mask_token"
        if name.startswith(DROPPED_PREFIXES) or name in DROPPED_KEYS or mae_mask_token:
            dropped.append(key)
            continue
        if name in cleaned:
            raise BackboneError(
                f"{source} holds '{name}' twice (as '{key}' too): save one network per file"
            )
        cleaned[name] = value
    return cleaned, dropped


def extract_backbone_weights(
    content: Mapping[str, Any], checkpoint_key: str | None = None, source: str = "checkpoint"
) -> BackboneWeights:
    """The backbone weights of a checkpoint's content, by the format table
    (:func:`dino_vos.formats.extract_backbone_weights`)."""
    from dino_vos.formats import extract_backbone_weights as extract

    return extract(content, checkpoint_key, source)


def load_backbone_weights(path: str | Path, checkpoint_key: str | None = None) -> BackboneWeights:
    """Read ``path`` and return its backbone weights (see :func:`extract_backbone_weights`)."""
    from dino_vos.formats import STATE_DICT

    content, metadata = read_checkpoint(path)
    weights = extract_backbone_weights(content, checkpoint_key, source=str(path))
    if weights.arch is None and ARCH_METADATA_KEY in metadata:
        weights.arch = json.loads(metadata[ARCH_METADATA_KEY])
        weights.format = "dino-vos safetensors"
    elif Path(path).suffix == ".safetensors" and weights.kind is STATE_DICT:
        weights.format = "safetensors state dict"
    return weights


def atomic_torch_save(obj: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` a plain dict to a temporary file, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(dict(obj), tmp)


def save_backbone_safetensors(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    arch: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a backbone state dict with its architecture recorded in the metadata (atomic)."""
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in state.items()
    }
    metadata = {ARCH_METADATA_KEY: json.dumps(dict(arch))}
    metadata.update(extra_metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
