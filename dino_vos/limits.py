"""Upper bounds of the size options, checked while the command line is parsed (before torch).

Each size option has a documented maximum (docs/protocol.md#size-limits); where the frame size
is known before the model loads, :func:`check_frame_memory` also refuses a setting whose
smallest possible working set exceeds this machine's memory. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from dino_vos.errors import InputError, param

#: --short-side of the frame commands (propagate, demo, attention, features, eval davis, ...).
MAX_SHORT_SIDE = 4096
#: --shift-ensemble: N^2 forwards per frame; shifts are whole pixels, so N beyond the patch
#: size (16 at most for the backbones in use) only repeats shifts.
MAX_SHIFT_ENSEMBLE = 16
#: --batch-size of the frame commands (frames per backbone forward).
MAX_FRAME_BATCH = 256
#: --batch-size of the image baselines and of pretraining (images per step and process).
MAX_IMAGE_BATCH = 8192
#: --image-size / --resize-size of the image baselines and pretraining crop sizes.
MAX_IMAGE_SIZE = 4096
#: Worker processes (eval davis --workers, image loader workers) and torch threads.
MAX_WORKERS = 256
#: The decoding thread of the frame commands runs this many frames ahead (dino_vos.features).
PREFETCH_FRAMES = 4
#: Smallest token width of a backbone in use (ViT-Ti: 192) and the float32 copies of the token
#: grid a transformer block holds at once (input, q/k/v, output; the MLP's hidden layer is 4x):
#: the lower bound of the activations per token is 4 bytes * 192 * 8.
MIN_TOKEN_BYTES = 4 * 192 * 8


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def frame_memory_bytes(height: int, width: int, patch_size: int, batch_size: int) -> int:
    """A lower bound of the memory one network input of ``height`` x ``width`` needs: uint8
    and float32 copies of every frame in flight (``batch_size`` plus the prefetched ones) and
    the activations of one block over the batch's tokens."""
    pixels = height * width
    in_flight = batch_size + PREFETCH_FRAMES + 1
    tokens = pixels // (patch_size * patch_size) * batch_size
    return pixels * 3 * (1 + 4) * in_flight + tokens * MIN_TOKEN_BYTES


def check_memory(need: int, what: str, fix: str) -> None:
    """Refuse ``what`` when its lower-bound working set ``need`` exceeds this machine's memory."""
    have = machine_memory()
    if have is not None and need > have:
        raise InputError(
            f"{what} needs at least {_gib(need)} of memory, this machine has {_gib(have)}: {fix}"
        )


def check_frame_memory(
    frame_size: tuple[int, int],
    input_size: tuple[int, int],
    patch_size: int,
    batch_size: int,
    options: str = f"{param('short_side')} or {param('batch_size')}",
) -> None:
    """Refuse a frame resize (original ``frame_size`` -> network ``input_size``) that cannot
    fit into this machine's memory, naming the network input size."""
    need = frame_memory_bytes(*input_size, patch_size, batch_size)
    h, w = frame_size
    what = (
        f"a network input of {input_size[1]}x{input_size[0]} px (from {w}x{h} frames, "
        f"{batch_size} per batch)"
    )
    check_memory(need, what, f"lower {options}")


#: The architecture of a dino-vos ``.safetensors`` file (dino_vos.checkpoints.ARCH_METADATA_KEY).
_ARCH_METADATA_KEY = "dino_vos_arch"
_PATCH_IN_NAME = re.compile(r"patch(\d+)")


def _safetensors_patch_size(path: Path) -> int | None:
    """The patch size recorded in a dino-vos ``.safetensors`` header (read without torch)."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > 100 * 2**20:
                return None
            header = json.loads(file.read(length))
        arch = json.loads(header.get("__metadata__", {}).get(_ARCH_METADATA_KEY, "null"))
        patch = (arch or {}).get("kwargs", {}).get("patch_size")
        if patch is None:
            return _patch_in_name(str((arch or {}).get("model", "")))
        return int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    except (OSError, ValueError, TypeError, AttributeError, struct.error):
        return None


def _patch_in_name(name: str) -> int | None:
    match = _PATCH_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def known_patch_size(name: str | None, weights: str | None) -> int | None:
    """The patch size of a backbone, when it is known without loading the model: registered
    and timm names (``...patch8...``), dino-vos ``.safetensors`` files; None otherwise."""
    from dino_vos.registry import DEFAULT_BACKBONE, SHIPPED_BACKBONE, registered_backbone

    if weights is not None:
        if Path(weights).suffix == ".safetensors":
            return _safetensors_patch_size(Path(weights))
        return None
    if name is None:
        sizes = {known_patch_size(DEFAULT_BACKBONE, None), known_patch_size(SHIPPED_BACKBONE, None)}
        return sizes.pop() if len(sizes) == 1 else None
    if Path(name).suffix == ".safetensors":
        return _safetensors_patch_size(Path(name))
    entry = registered_backbone(name)
    if entry is None:
        return _patch_in_name(name)
    if entry.shipped_file is not None:
        return _safetensors_patch_size(entry.shipped_file)
    return _patch_in_name(entry.timm_name or "")
