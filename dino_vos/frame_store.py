"""Bounded storage for backward and bidirectional propagation (docs/protocol.md#keyframes).

Backward and ``both`` visit frames from the last keyframe towards frame 0, after a first pass
that streams the video forward. Nothing here grows with the video: a :class:`FrameStore` keeps
tensors (forward soft maps, cached patch features) in a temporary folder whose size never
exceeds its byte budget (``store_budget``), and a :class:`FrameReader` decodes the frames
again, a chunk at a time from the end (random access through decord / OpenCV seeking or a
folder's files), checking each against a checksum taken in the first pass. Decoded frames are
never stored.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dino_vos.errors import InputError
from dino_vos.sizes import DEFAULT_STORE_BUDGET
from dino_vos.sources import Frame, FrameSource

#: Decoded frames held at once by a :class:`FrameReader` chunk (bytes of RGB pixels) ...
CHUNK_BYTES = 128 * 2**20
#: ... and at most this many frames per chunk.
MAX_CHUNK_FRAMES = 32


class FrameStore:
    """Tensors by key in a temporary folder, at most ``budget`` bytes at any time; a context
    manager that deletes the folder on exit.

    Tensors are written as raw bytes (their size is exactly ``tensor.nbytes``) and come back
    bit for bit, on the device they were stored from. ``pop`` reads a tensor and frees its
    space.
    """

    def __init__(self, directory: str | Path | None = None, budget: int | None = None) -> None:
        self.budget = DEFAULT_STORE_BUDGET if budget is None else budget
        self._tmp = tempfile.TemporaryDirectory(prefix="dino-vos-store-", dir=directory)
        self.root = Path(self._tmp.name)
        self._entries: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device, int]] = {}
        self.used = 0
        self.peak = 0

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._entries.clear()
        self._tmp.cleanup()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.budget

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under ``key`` (the caller checked :meth:`fits`)."""
        array = tensor.detach().to("cpu").contiguous().numpy()
        if not self.fits(array.nbytes):
            raise RuntimeError(f"store budget exceeded by {key}: plan with fits() first")
        array.tofile(self.root / key)
        self._entries[key] = (tuple(tensor.shape), tensor.dtype, tensor.device, array.nbytes)
        self.used += array.nbytes
        self.peak = max(self.peak, self.used)

    def pop(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, removed from the store."""
        shape, dtype, device, nbytes = self._entries.pop(key)
        path = self.root / key
        array = np.fromfile(path, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
        path.unlink()
        self.used -= nbytes
        return torch.from_numpy(array.reshape(shape)).to(device)


def chunk_frames(frame_size: tuple[int, int]) -> int:
    """Frames decoded together when a video is read again from the end."""
    frame_bytes = frame_size[0] * frame_size[1] * 3
    return max(1, min(MAX_CHUNK_FRAMES, CHUNK_BYTES // max(frame_bytes, 1)))


class FrameReader:
    """Reads frames of ``source`` again, from the end, in chunks; frames below ``stop`` get a
    checksum in the first pass (:meth:`fingerprint`) that every re-read frame must match.

    A source with ``read_frames(start, stop)`` (decord, OpenCV, folders, memory) is read at
    random; a chunk that does not match (an inexact seek) or a source without random access
    is read by iterating the source from its start instead.
    """

    def __init__(self, source: FrameSource, stop: int) -> None:
        self.source = source
        self.names = source.frame_names()
        self.checksums = np.zeros(stop, np.uint32)
        self.chunk = chunk_frames(source.frame_size)

    def fingerprint(self, frame: Frame) -> None:
        if frame.index < len(self.checksums):
            self.checksums[frame.index] = _checksum(frame.image)

    def first_frame(self) -> Frame:
        """Frame 0 (not checked), for sizing."""
        images = self._random_access(0, 1)
        if images is not None:
            return Frame(0, self.names[0], images[0])
        return next(iter(self.source))

    def backward(self, last: int) -> Iterator[list[Frame]]:
        """Chunks of frames ``last`` down to 0, each in descending order."""
        for stop in range(last + 1, 0, -self.chunk):
            yield self.read(max(0, stop - self.chunk), stop)[::-1]

    def read(self, start: int, stop: int) -> list[Frame]:
        """Frames ``start .. stop - 1`` as the first pass saw them."""
        images = self._random_access(start, stop)
        if images is None or not self._match(start, stop, images):
            images = self._sequential(start, stop)
            if not self._match(start, stop, images):
                raise InputError(
                    f"{self.source.path} decodes differently the second time (frames {start}.."
                    f"{stop - 1}): convert it to a folder of frames and run again"
                )
        return [Frame(start + i, self.names[start + i], image) for i, image in enumerate(images)]

    def _match(self, start: int, stop: int, images: list[np.ndarray]) -> bool:
        return len(images) == stop - start and all(
            _checksum(image) == self.checksums[start + i] for i, image in enumerate(images)
        )

    def _random_access(self, start: int, stop: int) -> list[np.ndarray] | None:
        read_frames = getattr(self.source, "read_frames", None)
        return None if read_frames is None else list(read_frames(start, stop))

    def _sequential(self, start: int, stop: int) -> list[np.ndarray]:
        images = []
        for frame in self.source:
            if frame.index >= start:
                images.append(frame.image)
            if frame.index >= stop - 1:
                break
        return images


def _checksum(image: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(image).data)
