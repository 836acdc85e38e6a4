"""Device selection shared by every command."""

from __future__ import annotations

import torch

from dino_vos.errors import DinoVosError, param


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:1``/``mps`` into a usable ``torch.device``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DinoVosError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DinoVosError(
            f"device '{device}' requested but CUDA is not available: use {param('device', 'cpu')}"
        )
    return resolved
