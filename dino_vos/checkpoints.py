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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dino_vos.atomic import atomic_path
from dino_vos.errors import BackboneError

ARCH_METADATA_KEY = "dino_vos_arch"
#: The only non-builtin objects a checkpoint may hold: official DINO training checkpoints
#: (``main_dino.py``'s ``checkpoint.pth`` and the released full checkpoints) store the run's
#: ``args`` as an ``argparse.Namespace`` of plain values. Anything else stays refused.
SAFE_GLOBALS = [argparse.Namespace]
PREFIXES_TO_STRIP = ("module.", "backbone.", "_orig_mod.", "encoder.")
DROPPED_PREFIXES = ("head.", "head_drop.")  # projection / classifier heads


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a checkpoint file as plain data; returns (content, safetensors metadata)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path} (check the path given to --weights)")
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
        with warnings.catch_warnings(), torch.serialization.safe_globals(SAFE_GLOBALS):
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


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES_TO_STRIP:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/wrapper prefixes and drop projection-head entries."""
    cleaned = {}
    for key, value in state.items():
        key = _strip_prefixes(key)
        if key.startswith(DROPPED_PREFIXES):
            continue
        cleaned[key] = value
    return cleaned


def extract_backbone_state(
    content: Mapping[str, Any], checkpoint_key: str = "teacher", source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Find the backbone state dict (and architecture, when recorded) inside a checkpoint.

    Accepts a bare state dict, official DINO training checkpoints (``teacher``/``student``),
    ``state_dict``/``model`` wrappers and dino-vos checkpoints (which also record ``arch``).
    """
    arch = content.get("arch") if isinstance(content.get("arch"), Mapping) else None
    if _is_state_dict(content):
        return clean_state_dict(content), arch
    wrappers = [k for k in ("teacher", "student") if _is_state_dict(content.get(k))]
    if wrappers:
        if checkpoint_key not in wrappers:
            raise BackboneError(
                f"{source} has no '{checkpoint_key}' entry (it has {', '.join(wrappers)}): "
                f"use --checkpoint-key {wrappers[0]}"
            )
        return clean_state_dict(content[checkpoint_key]), arch
    for key in (checkpoint_key, "state_dict", "model", "backbone"):
        if _is_state_dict(content.get(key)):
            return clean_state_dict(content[key]), arch
    raise BackboneError(
        f"{source} holds no backbone weights (keys: {', '.join(list(content)[:8])}); expected a "
        "state dict or 'teacher'/'student' entries"
    )


def load_backbone_state(
    path: str | Path, checkpoint_key: str = "teacher"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read ``path`` and return (backbone state dict, recorded architecture or None)."""
    content, metadata = read_checkpoint(path)
    state, arch = extract_backbone_state(content, checkpoint_key, source=str(path))
    if arch is None and ARCH_METADATA_KEY in metadata:
        arch = json.loads(metadata[ARCH_METADATA_KEY])
    return state, arch


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
