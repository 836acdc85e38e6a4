"""Atomic file writes: a temporary file in the target folder, renamed into place when complete.

Also the two primitives the output rules (:mod:`dino_vos.outputs`) build on: an exclusive
``fcntl.flock`` on a lock file (it dies with the process, so even SIGKILL leaves no stale lock)
and a block that Ctrl-C cannot cut short (cleanup code that must run to its end).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import signal
import tempfile
import threading
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


def lock_file(path: str | Path, blocking: bool = False) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (created if missing) and write our PID into it.

    Returns the open descriptor that holds the lock (close it, after :func:`unlock_file`, to
    release), or None when another process holds it and ``blocking`` is False. A holder removes
    the file when it releases, so a lock taken on a file that was meanwhile removed or replaced
    is dropped and taken again on the current one.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
            opened = os.fstat(fd)
            same = (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def unlock_file(path: str | Path, fd: int) -> None:
    """Release a lock of :func:`lock_file`: remove its file (while still holding it), close."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


def lock_holder_pid(path: str | Path) -> int | None:
    """The PID of the live process that holds the lock file ``path``; None when it is free."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def atomic_entry(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """:func:`atomic_path` under an exclusive lock on ``.<name>.lock`` beside ``path``: for
    entries of a cache that several runs share (one writer of an entry at a time; readers see
    the old file or the complete new one, never a part). The lock file goes when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    fd = lock_file(lock, blocking=True)
    assert fd is not None
    try:
        with atomic_path(path, suffix) as tmp:
            yield tmp
    finally:
        unlock_file(lock, fd)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run a block that Ctrl-C (SIGINT) and SIGTERM cannot cut short: a signal that arrives
    meanwhile is delivered when the block ends (a second Ctrl-C during cleanup then no longer
    leaves half-removed files). Outside the main thread, signals cannot arrive: a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is None:  # installed outside Python: leave it alone
            continue
        previous[signum] = signal.signal(signum, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number in dict.fromkeys(received):  # now, to the handler that was in place
            os.kill(os.getpid(), number)
