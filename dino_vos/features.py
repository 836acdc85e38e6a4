"""Frame -> patch features: the one code path used by propagation, ``features`` and the cache."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from queue import Full, Queue
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from dino_vos.backbones import Backbone, weights_fingerprint
from dino_vos.errors import DinoVosError, InputError, param
from dino_vos.sources import Frame
from dino_vos.spec import INFERENCE_PRECISIONS, Precision, ResizeSpec
from dino_vos.transforms import FRAME_STDS, IMAGENET_MEAN, frame_to_tensor

#: Frames per backbone forward on CUDA (on CPU batching is not faster: 1, see
#: docs/evaluation.md#on-gpus).
CUDA_BATCH_SIZE = 8
#: How far the decoding thread may run ahead of the backbone.
PREFETCH_FRAMES = 4
#: Version of the :meth:`BackboneFeatures.settings` record (bump when its entries change).
SETTINGS_VERSION = 1
T = TypeVar("T")


class FeatureExtractor(Protocol):
    """Turns a frame into an (h, w, D) patch-feature grid.

    ``input_size`` gives the network input size for an original frame size; the patch grid is
    that size divided by ``patch_size``. Implementations may cache by ``frame.name``.
    """

    @property
    def patch_size(self) -> int: ...

    def input_size(self, height: int, width: int) -> tuple[int, int]: ...

    def __call__(self, frame: Frame) -> torch.Tensor: ...


@runtime_checkable
class BatchExtractor(FeatureExtractor, Protocol):
    """A :class:`FeatureExtractor` of a backbone that :func:`embed_frames` feeds in batches:
    ``preprocess`` runs in the decoding thread, ``embed`` on ``batch_size`` inputs at a time,
    and ``settings`` is the record of what makes its features (manifests, cache keys, exports).
    """

    @property
    def backbone(self) -> Backbone: ...

    @property
    def resize(self) -> ResizeSpec: ...

    @property
    def batch_size(self) -> int: ...

    def preprocess(self, image: np.ndarray) -> torch.Tensor: ...

    def embed(self, batch: torch.Tensor) -> torch.Tensor: ...

    def settings(self, fingerprint: str | None = None) -> dict[str, Any]: ...


def backbone_settings(backbone: Backbone, fingerprint: str | None = None) -> dict[str, Any]:
    """The backbone's part of a settings record: name, weights content hash (``fingerprint``,
    computed when None), position-embedding mode."""
    return {
        "backbone": backbone.name,
        "weights_fingerprint": fingerprint or weights_fingerprint(backbone),
        "pos_embed": backbone.pos_embed_mode,
    }


class BackboneFeatures:
    """Patch features of a :class:`Backbone` (last block, final norm), one frame or a batch.

    ``batch_size``: frames per forward in :func:`embed_frames` (default by device: 1 on CPU,
    where batching is not faster, :data:`CUDA_BATCH_SIZE` on CUDA). ``precision``: ``fp32``, or
    ``fp16``/``bf16`` autocast of the backbone (``fp16`` on CUDA only); features are returned
    in float32 either way, and propagation always runs in float32
    (docs/protocol.md#frame-preprocessing). ``std`` None: that of ``resize.normalisation``.
    """

    def __init__(
        self,
        backbone: Backbone,
        resize: ResizeSpec | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] | None = None,
        batch_size: int | None = None,
        precision: Precision = "fp32",
    ) -> None:
        self.backbone = backbone
        self.resize = resize or ResizeSpec()
        self.mean = mean
        self.std = FRAME_STDS[self.resize.normalisation] if std is None else std
        self.patch_size = backbone.patch_size
        cuda = backbone.device.type == "cuda"
        self.batch_size = batch_size or (CUDA_BATCH_SIZE if cuda else 1)
        if precision not in INFERENCE_PRECISIONS:
            raise InputError(
                f"unknown precision {precision!r}: use one of {', '.join(INFERENCE_PRECISIONS)}"
            )
        if precision == "fp16" and not cuda:
            raise InputError("precision fp16 needs a CUDA device: use fp32 (or bf16) on CPU")
        self.precision = precision

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.resize.size_for(height, width, self.patch_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(3, H, W) float32 network input of an RGB uint8 image, on the CPU (pinned for a
        CUDA backbone, so the copy to the GPU can overlap)."""
        size = self.input_size(*image.shape[:2])
        tensor = frame_to_tensor(image, size, self.mean, self.std, self.resize.interpolation)
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

    def settings(self, fingerprint: str | None = None) -> dict[str, Any]:
        """The one record of what makes these features (``fingerprint``: the weights hash, when
        known): result manifests, feature caches and exports all use it."""
        return {
            "settings_version": SETTINGS_VERSION,
            **backbone_settings(self.backbone, fingerprint),
            "resize": self.resize.key(),
            "mean": list(self.mean),
            "std": list(self.std),
            "precision": self.precision,
            "shift_ensemble": 1,
        }


class ShiftEnsembleFeatures:
    """Patch features averaged over ``n`` x ``n`` sub-patch shifts of the input
    (docs/protocol.md#refinements).

    The input is shifted by (dy, dx) = (round(i * p / n), round(j * p / n)) pixels for i, j in
    0..n-1 (cropped at the top/left, edge-replicated at the bottom/right), so patch (y, x) of a
    shifted input is centred dy/p, dx/p patches below/right of patch (y, x) of the frame. Each
    shifted grid is resampled bilinearly back onto the frame's patch centres (edge rows and
    columns replicated), then the n^2 grids are averaged: n^2 forwards per frame. ``n`` = 1 is
    :class:`BackboneFeatures` exactly. A wrapper of any :class:`BatchExtractor` (``base``),
    batched by :func:`embed_frames` like it.
    """

    def __init__(self, base: BatchExtractor, n: int) -> None:
        if n < 1:
            raise InputError(f"shift ensemble n must be 1 or more, not {n}")
        self.base = base
        self.shift_ensemble = n

    @property
    def backbone(self) -> Backbone:
        return self.base.backbone

    @property
    def resize(self) -> ResizeSpec:
        return self.base.resize

    @property
    def patch_size(self) -> int:
        return self.base.patch_size

    @property
    def batch_size(self) -> int:
        return self.base.batch_size

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.base.input_size(height, width)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return self.base.preprocess(image)

    def settings(self, fingerprint: str | None = None) -> dict[str, Any]:
        return {**self.base.settings(fingerprint), "shift_ensemble": self.shift_ensemble}

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
            grid = self.base.embed(shifted)
            grid = _shift_back(grid, dy / self.patch_size, dim=1)
            grid = _shift_back(grid, dx / self.patch_size, dim=2)
            total = grid if total is None else total + grid
        assert total is not None
        return total / len(shifts)

    def __call__(self, frame: Frame) -> torch.Tensor:
        return self.embed(self.preprocess(frame.image)[None])[0]


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

    A background thread decodes the frames (and, for a :class:`BatchExtractor`, resizes and
    normalises them) at most ``prefetch`` frames ahead, so the backbone does not wait for the
    decoder; a :class:`BatchExtractor` then embeds them ``batch_size`` at a time (frames of
    one size per batch). Other extractors (a feature cache, test doubles) get one frame per
    call.
    """
    if not isinstance(extractor, BatchExtractor):
        for frame in prefetched(frames, prefetch):
            yield frame, extractor(frame)
        return
    prepared = prefetched(_prepared_frames(extractor, frames), prefetch)
    pending: list[tuple[Frame, torch.Tensor]] = []
    with closing(prepared):  # an error here stops the decoding thread before it propagates
        for item in prepared:
            if pending and item[1].shape != pending[0][1].shape:
                yield from _embed_batch(extractor, pending)
                pending = []
            pending.append(item)
            if len(pending) >= extractor.batch_size:
                yield from _embed_batch(extractor, pending)
                pending = []
        yield from _embed_batch(extractor, pending)


def _prepared_frames(
    extractor: BatchExtractor, frames: Iterable[Frame]
) -> Iterator[tuple[Frame, torch.Tensor]]:
    """Each frame with its network input; a failure names the frame."""
    for frame in frames:
        try:
            tensor = extractor.preprocess(frame.image)
        except (DinoVosError, OSError):
            raise
        except Exception as exc:
            raise FrameError(f"cannot prepare frame {frame.name}: {_describe(exc)}") from exc
        yield frame, tensor


class FrameError(DinoVosError):
    """Decoding or preparing a frame failed (in the decoding thread)."""


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of an exception, with the fix for running out of memory."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    if isinstance(exc, MemoryError) or "memory" in text.lower():
        text += f" (out of memory: lower {param('short_side')} or {param('batch_size')})"
    return text


#: Decoding threads alive: :func:`stop_decoding_threads` ends them when a run fails.
_LIVE_THREADS: dict[threading.Thread, threading.Event] = {}


def _embed_batch(
    extractor: BatchExtractor, items: list[tuple[Frame, torch.Tensor]]
) -> Iterator[tuple[Frame, torch.Tensor]]:
    if not items:
        return
    features = extractor.embed(torch.stack([tensor for _, tensor in items]))
    for (frame, _), grid in zip(items, features, strict=True):
        yield frame, grid


def prefetched(items: Iterable[T], depth: int = PREFETCH_FRAMES) -> Generator[T, None, None]:
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
    _LIVE_THREADS[thread] = stop
    thread.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "end":
                return
            if kind == "error":
                _raise_producer_error(value)
            yield value
    finally:
        stop.set()
        thread.join(timeout=5.0)
        _LIVE_THREADS.pop(thread, None)


def _raise_producer_error(error: BaseException) -> None:
    """Raise an error of the decoding thread in the consumer (unexpected ones as FrameError)."""
    if isinstance(error, (DinoVosError, OSError, KeyboardInterrupt)):
        raise error
    raise FrameError(f"the frame decoding thread failed: {_describe(error)}") from error


def stop_decoding_threads(timeout: float = 5.0) -> None:
    """Stop every decoding thread of :func:`prefetched` and wait for it (a run that failed
    while an iteration was suspended must not leave one running as the process exits)."""
    for thread, stop in list(_LIVE_THREADS.items()):
        stop.set()
        thread.join(timeout)
        _LIVE_THREADS.pop(thread, None)
