"""Byte sizes given by the user (``--store-budget 4GB``), without torch."""

from __future__ import annotations

import re

from dino_vos.errors import InputError

#: Default ``--store-budget`` of backward and ``both`` runs (docs/protocol.md#keyframes).
DEFAULT_STORE_BUDGET = 4_000_000_000

_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``4GB``, ``500M``, ``1.5g``, ``2GiB`` or ``0`` (decimal units;
    ``KiB``/``MiB``/``GiB``/``TiB`` are binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match or (match.group(3) and not match.group(2)):
        raise InputError(f"cannot read size {text!r}: write for example 4GB, 500MB or 2GiB")
    number, unit, binary = match.groups()
    scale = 1024 ** " kmgt".index(unit) if binary else _DECIMAL[unit]
    return int(float(number) * scale)


def format_size(nbytes: int) -> str:
    """``4 GB``, ``12.3 MB``, ``512 bytes``: decimal units, 3 significant digits."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"
