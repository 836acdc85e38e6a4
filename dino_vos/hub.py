"""Where pretrained weights come from: the local hub caches, or a download when online.

Two caches are looked at: the Hugging Face cache of a timm model (``model.safetensors``) and
torch hub's ``checkpoints/`` folder, where the official releases land (``torch.hub`` downloads
of DINO, DINOv2 and DINOv3 files keep their release name).
"""

from __future__ import annotations

import socket
from pathlib import Path

import timm
import torch


def hub_cached_file(timm_name: str) -> Path | None:
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
    if isinstance(cfg.url, str) and cfg.url:
        return torch_hub_file(Path(cfg.url).name)
    return None


def torch_hub_file(filename: str) -> Path | None:
    """``filename`` in torch hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), if there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def online(host: str = "huggingface.co") -> bool:
    """Whether ``host`` resolves (a quick offline test before a download is tried)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
