"""Atomic file writes: a temporary file in the target folder, renamed into place when complete."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (0666 - umask).

    Readers never see a half-written file, and a failed write leaves ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except Exception as exc:
            error = write_error(exc, path)
            if error is exc:
                raise
            raise error from exc
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


#: How safetensors' writer reports an I/O error: "... I/O error: No space left on device (os
#: error 28)"; torch.save's archive writer: "PytorchStreamWriter failed writing file ..." or
#: "[enforce fail at inline_container.cc] . unexpected pos ..." (the file was cut short).
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container", "file write failed")


def write_error(exc: Exception, path: str | Path) -> Exception:
    """``exc`` of a writer as the :class:`OSError` it stands for (naming ``path``): writers
    written in Rust or C++ (safetensors, ``torch.save``) report a full disk in their own
    exception types. Any other exception is returned unchanged."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    number = _OS_ERROR_NUMBER.search(text)
    if number is not None:
        code = int(number.group(1))
        return OSError(code, os.strerror(code), str(path))
    if isinstance(exc, RuntimeError) and any(part in text for part in _TORCH_WRITE_FAILURES):
        return OSError(errno.EIO, "the file could not be written (is the disk full?)", str(path))
    return exc


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(value: Any) -> Any:
    """NaN/inf -> None, recursively, so that the JSON written is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented, strict JSON (non-finite floats become null), atomically."""
    atomic_write_text(path, json.dumps(finite_json(payload), indent=2, allow_nan=False) + "\n")
