"""Patch-feature export: (frames, h, w, D) tensors of chosen blocks, in memory or as safetensors.

Features come from the same code path as propagation (:class:`BackboneFeatures` preprocessing and
:meth:`Backbone.forward_tokens`), so with the defaults (last block, final norm, fp32) they equal
``BackboneFeatures.extract`` for the same frame.

On-disk layouts (``OUT`` is a folder; ``dino-vos.json`` is written last and lists everything):

- ``frames``: ``OUT/<frame stem>.safetensors`` per frame with ``layer{L}`` (h, w, D) and
  ``layer{L}.cls`` (D,) for every exported block ``L`` (0-based).
- ``video``: one ``OUT/features.safetensors`` holding ``layer{L}`` (frames, h, w, D) and
  ``layer{L}.cls`` (frames, D). The file is sized up front and filled batch by batch, so a long
  video never sits in memory; read frame ranges lazily with :func:`load_features` (``frames=``)
  or ``safetensors.safe_open(...).get_slice("layer11")[i:j]``.

Every safetensors file carries the export metadata (JSON under the ``dino_vos`` key): grid,
patch size, input and frame sizes, resize rule, normalisation, backbone, weights id, layers,
norm, L2, dtype.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from dino_vos import __version__
from dino_vos.errors import InputError
from dino_vos.features import BatchExtractor
from dino_vos.outputs import MANIFEST_NAME, read_manifest
from dino_vos.sources import Frame, FrameSource
from dino_vos.writers import OutputSink

FeatureDtype = Literal["fp16", "fp32"]
Layout = Literal["frames", "video"]
TORCH_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {torch.float16: "F16", torch.float32: "F32"}
METADATA_KEY = "dino_vos"
VIDEO_FILE = "features.safetensors"


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices (negative from the end) -> unique 0-based indices, in the given order."""
    resolved: list[int] = []
    for layer in layers or [-1]:
        if not -depth <= layer < depth:
            raise InputError(
                f"layer {layer} is out of range for a {depth}-block backbone: use 0..{depth - 1} "
                f"or -{depth}..-1"
            )
        if layer % depth not in resolved:
            resolved.append(layer % depth)
    return resolved


def patch_name(layer: int) -> str:
    return f"layer{layer}"


def cls_name(layer: int) -> str:
    return f"layer{layer}.cls"


def iter_batches(
    frames: Iterable[Frame], features: BatchExtractor, batch_size: int = 1
) -> Iterator[tuple[list[Frame], torch.Tensor]]:
    """Preprocessed frames in batches of ``batch_size`` (a new batch when the size changes)."""
    pending: list[Frame] = []
    tensors: list[torch.Tensor] = []
    for frame in frames:
        tensor = features.preprocess(frame.image)
        if pending and (len(pending) >= batch_size or tensor.shape != tensors[0].shape):
            yield pending, torch.stack(tensors).to(features.backbone.device)
            pending, tensors = [], []
        pending.append(frame)
        tensors.append(tensor)
    if pending:
        yield pending, torch.stack(tensors).to(features.backbone.device)


def extraction_metadata(features: BatchExtractor, frame_size: Sequence[int]) -> dict[str, Any]:
    """The features' settings record with the weights' source, sizes and patch grid; ``resize``
    is spelled out (rule, short side) to map a patch back to frame pixels."""
    backbone, resize = features.backbone, features.resize
    input_size = features.input_size(*frame_size)
    return {
        "dino_vos": __version__,
        **features.settings(),
        "weights": backbone.weights_id,
        "patch_size": backbone.patch_size,
        "frame_size": list(frame_size),
        "input_size": list(input_size),
        "grid": list(backbone.grid_size(*input_size)),
        "resize": {"rule": resize.rule, "short_side": resize.short_side},
    }


def as_frames(images: Iterable[Frame] | Iterable[np.ndarray]) -> Iterator[Frame]:
    """Frames as they are, or RGB arrays wrapped as frames named ``00000``, ``00001`` ..."""
    for index, item in enumerate(images):
        yield item if isinstance(item, Frame) else Frame(index, f"{index:05d}", np.asarray(item))


@dataclass
class PatchFeatures:
    """Exported features: per block, patches (frames, h, w, D) and CLS tokens (frames, D)."""

    patches: dict[int, torch.Tensor]
    cls: dict[int, torch.Tensor]
    names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


class FeatureExporter:
    """Patch features of chosen blocks for batches of frames, with optional norm, L2 and fp16."""

    def __init__(
        self,
        features: BatchExtractor,
        layers: Sequence[int] | None = None,
        norm: bool = True,
        dtype: FeatureDtype = "fp32",
        l2: bool = False,
    ) -> None:
        if dtype not in TORCH_DTYPES:
            raise InputError(f"unknown dtype '{dtype}': use fp16 or fp32")
        self.features = features
        self.backbone = features.backbone
        self.layers = resolve_layers(layers, self.backbone.depth)
        self.norm, self.dtype, self.l2 = norm, dtype, l2
        self.has_cls = self.backbone.vit.cls_token is not None

    def _finish(self, values: torch.Tensor) -> torch.Tensor:
        if self.l2:
            values = F.normalize(values, dim=-1)
        return values.to(TORCH_DTYPES[self.dtype]).cpu()

    @torch.inference_mode()
    def tensors(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors of a preprocessed batch (B, 3, H, W): ``layer{L}``, ``layer{L}.cls``."""
        outputs, grid = self.backbone.forward_tokens(batch, layers=self.layers, norm=self.norm)
        named: dict[str, torch.Tensor] = {}
        for layer, tokens in zip(self.layers, outputs, strict=True):
            cls, patches = self.backbone.split_tokens(tokens, grid)
            named[patch_name(layer)] = self._finish(patches)
            if self.has_cls:
                named[cls_name(layer)] = self._finish(cls)
        return named

    def iter_tensors(
        self, frames: Iterable[Frame], batch_size: int = 1
    ) -> Iterator[tuple[list[Frame], dict[str, torch.Tensor]]]:
        """Stream (frames of the batch, named tensors with a leading batch dimension)."""
        for batch_frames, batch in iter_batches(frames, self.features, batch_size):
            yield batch_frames, self.tensors(batch)

    def metadata(self, frame_size: Sequence[int]) -> dict[str, Any]:
        """What the exported tensors are: enough to map a patch back to frame pixels."""
        return {
            "format": "dino-vos-features",
            **extraction_metadata(self.features, frame_size),
            "embed_dim": self.backbone.embed_dim,
            "depth": self.backbone.depth,
            "layers": self.layers,
            "norm": self.norm,
            "l2": self.l2,
            "dtype": self.dtype,
            "cls": self.has_cls,
        }


def extract_features(
    frames: Iterable[Frame] | Iterable[np.ndarray],
    features: BatchExtractor,
    layers: Sequence[int] | None = None,
    norm: bool = True,
    dtype: FeatureDtype = "fp32",
    l2: bool = False,
    batch_size: int = 1,
) -> PatchFeatures:
    """Patch features of every frame (or RGB image) in memory: (frames, h, w, D) per block."""
    exporter = FeatureExporter(features, layers, norm, dtype, l2)
    chunks: dict[str, list[torch.Tensor]] = {}
    names: list[str] = []
    frame_size: tuple[int, int] | None = None
    for batch_frames, named in exporter.iter_tensors(as_frames(frames), batch_size):
        size = batch_frames[0].image.shape[:2]
        if frame_size is not None and size != frame_size:
            raise InputError(
                f"frame {batch_frames[0].name} is {size[1]}x{size[0]} but the first is "
                f"{frame_size[1]}x{frame_size[0]}: stacking needs one frame size"
            )
        frame_size = size
        names.extend(frame.name for frame in batch_frames)
        for key, value in named.items():
            chunks.setdefault(key, []).append(value)
    if frame_size is None:
        raise InputError("no frames to extract features from")
    stacked = {key: torch.cat(values) for key, values in chunks.items()}
    return PatchFeatures(
        patches={layer: stacked[patch_name(layer)] for layer in exporter.layers},
        cls={layer: stacked[cls_name(layer)] for layer in exporter.layers if exporter.has_cls},
        names=names,
        metadata=exporter.metadata(frame_size),
    )


class StreamingSafetensors:
    """A safetensors file with every tensor sized up front, filled one row range at a time."""

    def __init__(
        self,
        path: str | Path,
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: dict[str, str],
    ) -> None:
        self.path = Path(path)
        self.specs = specs
        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.offsets[name] = offset
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self.data_start + offset)

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (n, ...) at rows ``start .. start + n`` of tensor ``name``."""
        shape, dtype = self.specs[name]
        if tuple(rows.shape[1:]) != tuple(shape[1:]) or start + rows.shape[0] > shape[0]:
            raise InputError(
                f"{name}: rows {tuple(rows.shape)} at {start} do not fit the file's {shape}"
            )
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._file.seek(self.data_start + self.offsets[name] + start * row_bytes)
        self._file.write(rows.to(dtype).contiguous().numpy().tobytes())

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


@dataclass
class ExportSummary:
    """What :func:`export_features` wrote."""

    out_dir: Path
    num_frames: int
    seconds: float
    manifest: dict[str, Any]

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / self.seconds if self.seconds > 0 else float("inf")


def _video_specs(
    exporter: FeatureExporter, num_frames: int, grid: Sequence[int]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    dtype, dim = TORCH_DTYPES[exporter.dtype], exporter.backbone.embed_dim
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for layer in exporter.layers:
        specs[patch_name(layer)] = ((num_frames, grid[0], grid[1], dim), dtype)
        if exporter.has_cls:
            specs[cls_name(layer)] = ((num_frames, dim), dtype)
    return specs


def export_features(
    source: FrameSource,
    out_dir: str | Path,
    exporter: FeatureExporter,
    layout: Layout = "frames",
    batch_size: int = 1,
    on_frame: Callable[[Frame], None] | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Write the features of every frame of ``source`` under ``out_dir``; manifest last."""
    if layout not in ("frames", "video"):
        raise InputError(f"unknown layout '{layout}': use frames or video")
    metadata = exporter.metadata(tuple(source.frame_size))
    header = {METADATA_KEY: json.dumps(metadata)}
    stream = None
    names: list[str] = []
    start = time.perf_counter()
    with OutputSink(out_dir, overwrite=overwrite, inputs=[source.path]) as output:
        if layout == "video":
            specs = _video_specs(exporter, len(source), metadata["grid"])
            stream = StreamingSafetensors(output.path(VIDEO_FILE), specs, header)
        try:
            for batch_frames, named in exporter.iter_tensors(source, batch_size):
                if stream is not None:
                    for key, value in named.items():
                        stream.write(key, len(names), value)
                for offset, frame in enumerate(batch_frames):
                    if stream is None:
                        single = {key: value[offset].contiguous() for key, value in named.items()}
                        data = save_safetensors(single, metadata=header)
                        output.write_bytes(f"{frame.name}.safetensors", data)
                    names.append(frame.name)
                    if on_frame is not None:
                        on_frame(frame)
        finally:
            if stream is not None:
                stream.close()
        if stream is not None and len(names) != len(source):
            raise InputError(f"{source.path} gave {len(names)} of {len(source)} frames")
        seconds = time.perf_counter() - start
        manifest = {
            **metadata,
            "input": str(source.path),
            "fps": source.fps,
            "layout": layout,
            "frames": len(names),
            "names": names,
            "files": [VIDEO_FILE] if stream else [f"{name}.safetensors" for name in names],
            # per-frame shapes; the video file adds a leading frames dimension
            "tensors": {
                name: list(shape[1:])
                for name, (shape, _) in _video_specs(exporter, 1, metadata["grid"]).items()
            },
            "seconds": round(seconds, 3),
        }
        output.commit(manifest)
    return ExportSummary(Path(out_dir), len(names), seconds, manifest)


def read_feature_metadata(path: str | Path) -> dict[str, Any]:
    """The export metadata stored in one exported safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise InputError(f"{path} is not a dino-vos feature file (no '{METADATA_KEY}' metadata)")
    return json.loads(raw)


def load_features(
    out_dir: str | Path, frames: slice | None = None, layers: Sequence[int] | None = None
) -> PatchFeatures:
    """Read an export folder back as (frames, h, w, D) tensors (``frames`` selects a range)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        raise InputError(
            f"{out_dir} has no {MANIFEST_NAME}: not a finished `dino-vos features` run"
        )
    manifest = read_manifest(out_dir)
    start, stop, step = (frames or slice(None)).indices(manifest["frames"])
    if step != 1:
        raise InputError("load_features reads a contiguous frame range: use a slice without step")
    wanted = manifest["layers"] if layers is None else resolve_layers(layers, manifest["depth"])
    missing = [layer for layer in wanted if layer not in manifest["layers"]]
    if missing:
        raise InputError(f"layers {missing} were not exported: {out_dir} has {manifest['layers']}")
    keys = [patch_name(layer) for layer in wanted]
    keys += [cls_name(layer) for layer in wanted] if manifest["cls"] else []
    names = manifest["names"][start:stop]
    tensors: dict[str, torch.Tensor] = {}
    if manifest["layout"] == "video":
        with safe_open(str(out_dir / VIDEO_FILE), framework="pt") as handle:
            for key in keys:
                tensors[key] = handle.get_slice(key)[start:stop]
    else:
        files = manifest["files"][start:stop]
        for key in keys:
            rows = []
            for file in files:
                with safe_open(str(out_dir / file), framework="pt") as handle:
                    rows.append(handle.get_tensor(key))
            tensors[key] = torch.stack(rows) if rows else torch.empty(0)
    return PatchFeatures(
        patches={layer: tensors[patch_name(layer)] for layer in wanted},
        cls={layer: tensors[cls_name(layer)] for layer in wanted if manifest["cls"]},
        names=list(names),
        metadata=manifest,
    )
