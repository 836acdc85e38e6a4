"""Pretraining checkpoints: plain dicts written atomically, read with ``weights_only=True``.

Layout (``format`` = ``dino-vos-pretrain``, ``version`` = 1): ``arch`` ({"model", "kwargs"}),
``student``/``teacher`` state dicts (``backbone.*`` timm ViT keys and ``head.*``),
``optimizer``, ``scaler``, ``center``, ``epoch`` (epochs completed), ``step`` (optimisation
steps done), ``rng`` (one entry per rank: torch/cuda/numpy/python states as tensors and lists)
and ``config`` (the resolved config as a nested dict). ``dino_vos.load_backbone`` reads the
teacher (or student) backbone from it directly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_vos.checkpoints import atomic_torch_save, read_checkpoint
from dino_vos.errors import InputError

FORMAT = "dino-vos-pretrain"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # legacy=True (the default): the MT19937 tuple
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))


def save_checkpoint(path: str | Path, content: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (temp file in the same folder, then rename)."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **content}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and check a pretraining checkpoint (``weights_only=True``)."""
    content, _ = read_checkpoint(path)
    if content.get("format") != FORMAT:
        raise InputError(
            f"{path} is not a dino-vos pretraining checkpoint (format "
            f"{content.get('format')!r}): resume only from checkpoints written by dino-vos pretrain"
        )
    if content.get("version") != VERSION:
        raise InputError(f"{path} has checkpoint version {content.get('version')}, not {VERSION}")
    return content


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temp files left by interrupted atomic writes; return how many."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
