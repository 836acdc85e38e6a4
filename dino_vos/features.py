"""Frame -> patch features: the one code path used by propagation, ``features`` and the cache."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from queue import Full, Queue
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from dino_vos.backbones import Backbone
from dino_vos.errors import InputError
from dino_vos.sources import Frame
from dino_vos.spec import ResizeSpec
from dino_vos.transforms import IMAGENET_MEAN, REFERENCE_VIDEO_STD, frame_to_tensor

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: Frames per backbone forward on CUDA (on CPU batching is not faster: 1, see
#: docs/evaluation.md#on-gpus).
CUDA_BATCH_SIZE = 8
#: How far the decoding thread may run ahead of the backbone.
PREFETCH_FRAMES = 4
T = TypeVar("T")


class FeatureExtractor(Protocol):
    """Turns a frame into an (h, w, D) patch-feature grid.

    ``input_size`` gives the network input size for an original frame size; the patch grid is
    that size divided by ``patch_size``. Implementations may cache by ``frame.name``.
    """

    patch_size: int

    def input_size(self, height: int, width: int) -> tuple[int, int]: ...

    def __call__(self, frame: Frame) -> torch.Tensor: ...


class BackboneFeatures:
    """Patch features of a :class:`Backbone` (last block, final norm), one frame or a batch.

    ``batch_size``: frames per forward in :func:`embed_frames` (default by device: 1 on CPU,
    where batching is not faster, :data:`CUDA_BATCH_SIZE` on CUDA). ``precision``: ``fp32``, or
    ``fp16``/``bf16`` autocast of the backbone (``fp16`` on CUDA only); features are returned
    in float32 either way, and propagation always runs in float32
    (docs/protocol.md#frame-preprocessing).
    """

    def __init__(
        self,
        backbone: Backbone,
        resize: ResizeSpec | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = REFERENCE_VIDEO_STD,
        batch_size: int | None = None,
        precision: Precision = "fp32",
    ) -> None:
        self.backbone = backbone
        self.resize = resize or ResizeSpec()
        self.mean, self.std = mean, std
        self.patch_size = backbone.patch_size
        cuda = backbone.device.type == "cuda"
        self.batch_size = batch_size or (CUDA_BATCH_SIZE if cuda else 1)
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and not cuda:
            raise InputError("--precision fp16 needs a CUDA device: use fp32 (or bf16) on CPU")
        self.precision = precision

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.resize.size_for(height, width, self.patch_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(3, H, W) float32 network input of an RGB uint8 image, on the CPU (pinned for a
        CUDA backbone, so the copy to the GPU can overlap)."""
        size = self.input_size(*image.shape[:2])
        tensor = frame_to_tensor(image, size, self.mean, self.std)
        return tensor.pin_memory() if self.backbone.device.type == "cuda" else tensor

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) float32 features of preprocessed inputs (B, 3, H, W)."""
        device = self.backbone.device
        batch = batch.to(device, non_blocking=True)
        if self.precision == "fp32":
            return self.backbone(batch)
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype):
            return self.backbone(batch).float()

    def extract(self, image: np.ndarray) -> torch.Tensor:
        """(h, w, D) patch features of one RGB uint8 image."""
        return self.embed(self.preprocess(image)[None])[0]

    def __call__(self, frame: Frame) -> torch.Tensor:
        return self.extract(frame.image)


class ShiftEnsembleFeatures(BackboneFeatures):
    """Patch features averaged over ``n`` x ``n`` sub-patch shifts of the input
    (docs/protocol.md#refinements).

    The input is shifted by (dy, dx) = (round(i * p / n), round(j * p / n)) pixels for i, j in
    0..n-1 (cropped at the top/left, edge-replicated at the bottom/right), so patch (y, x) of a
    shifted input is centred dy/p, dx/p patches below/right of patch (y, x) of the frame. Each
    shifted grid is resampled bilinearly back onto the frame's patch centres (edge rows and
    columns replicated), then the n^2 grids are averaged: n^2 forwards per frame. ``n`` = 1 is
    :class:`BackboneFeatures` exactly. Works in :func:`embed_frames` batches like its base.
    """

    def __init__(self, base: BackboneFeatures, n: int) -> None:
        if n < 1:
            raise InputError(f"--shift-ensemble must be 1 or more, not {n}")
        self.__dict__.update(base.__dict__)
        self.shift_ensemble = n

    def shifts(self) -> list[tuple[int, int]]:
        """The (dy, dx) pixel shifts, (0, 0) first."""
        steps = [
            round(i * self.patch_size / self.shift_ensemble) for i in range(self.shift_ensemble)
        ]
        return [(dy, dx) for dy in steps for dx in steps]

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) float32 shift-averaged features of preprocessed inputs (B, 3, H, W)."""
        total: torch.Tensor | None = None
        shifts = self.shifts()
        for dy, dx in shifts:
            shifted = batch
            if dy or dx:
                cropped = batch[:, :, dy:, dx:]
                shifted = torch.nn.functional.pad(cropped, (0, dx, 0, dy), mode="replicate")
            grid = super().embed(shifted)
            grid = _shift_back(grid, dy / self.patch_size, dim=1)
            grid = _shift_back(grid, dx / self.patch_size, dim=2)
            total = grid if total is None else total + grid
        assert total is not None
        return total / len(shifts)


def _shift_back(grid: torch.Tensor, shift: float, dim: int) -> torch.Tensor:
    """Values at the unshifted patch centres of a grid whose samples lie ``shift`` (0..1)
    patches further along ``dim``: (1 - shift) * g[i] + shift * g[i - 1], g[-1] = g[0]."""
    if shift == 0:
        return grid
    previous = torch.cat([grid.narrow(dim, 0, 1), grid.narrow(dim, 0, grid.shape[dim] - 1)], dim)
    return (1.0 - shift) * grid + shift * previous


def embed_frames(
    extractor: FeatureExtractor, frames: Iterable[Frame], prefetch: int = PREFETCH_FRAMES
) -> Iterator[tuple[Frame, torch.Tensor]]:
    """Each frame with its (h, w, D) features, in order.

    A background thread decodes the frames (and, for a :class:`BackboneFeatures`, resizes and
    normalises them) at most ``prefetch`` frames ahead, so the backbone does not wait for the
    decoder; a :class:`BackboneFeatures` then embeds them ``batch_size`` at a time (frames of
    one size per batch). Other extractors (a feature cache, test doubles) get one frame per
    call.
    """
    if not isinstance(extractor, BackboneFeatures):
        for frame in prefetched(frames, prefetch):
            yield frame, extractor(frame)
        return
    prepared = prefetched(((f, extractor.preprocess(f.image)) for f in frames), prefetch)
    pending: list[tuple[Frame, torch.Tensor]] = []
    for item in prepared:
        if pending and item[1].shape != pending[0][1].shape:
            yield from _embed_batch(extractor, pending)
            pending = []
        pending.append(item)
        if len(pending) >= extractor.batch_size:
            yield from _embed_batch(extractor, pending)
            pending = []
    yield from _embed_batch(extractor, pending)


def _embed_batch(
    extractor: BackboneFeatures, items: list[tuple[Frame, torch.Tensor]]
) -> Iterator[tuple[Frame, torch.Tensor]]:
    if not items:
        return
    features = extractor.embed(torch.stack([tensor for _, tensor in items]))
    for (frame, _), grid in zip(items, features, strict=True):
        yield frame, grid


def prefetched(items: Iterable[T], depth: int = PREFETCH_FRAMES) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    Errors of the producer are raised in the consumer; when the consumer stops early (or
    ``depth`` is 0, which iterates in the caller's thread) the producer stops after its
    current item.
    """
    if depth <= 0:
        yield from items
        return
    queue: Queue[tuple[str, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put((kind, value), timeout=0.05)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put("error", exc)

    thread = threading.Thread(target=produce, name="dino-vos-decoder", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5.0)
