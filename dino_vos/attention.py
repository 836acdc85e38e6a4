"""Last-block CLS self-attention per head and thresholded attention masks.

The maps and thresholds follow docs/protocol.md#attention-maps.

The attention row is computed explicitly by the backbone's family from the last block's query
and key projections on its ``norm1`` input (with the rotary embedding applied to the keys for
DINOv3), so timm's fused ``scaled_dot_product_attention`` stays on for the rest of the network,
and prefix tokens (CLS, registers, storage tokens) are dropped from the map.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from dino_vos.backbones import Backbone
from dino_vos.defaults import ATTENTION_THRESHOLD, COLORMAPS
from dino_vos.errors import InputError
from dino_vos.export import extraction_metadata, iter_batches
from dino_vos.features import BatchExtractor
from dino_vos.sources import Frame, FrameSource
from dino_vos.writers import OutputSink

Interpolation = Literal["nearest", "bilinear"]


def last_block_input(
    backbone: Backbone, images: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens (B, T, D) entering the last block, and the patch grid (h, w)."""
    return backbone.last_block_input(images)


def cls_attention_row(
    backbone: Backbone, tokens: torch.Tensor, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Softmax(q_cls k^T * scale) of the last block over all tokens -> (B, heads, T).

    ``tokens`` is the last block's input (and ``grid`` its patch grid, which a RoPE model
    needs); only the CLS query is computed, by the backbone's family.
    """
    return backbone.cls_attention_row(tokens, grid)


@torch.inference_mode()
def cls_attention(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Last-block CLS attention to the patches for each head -> (B, heads, h, w).

    Rows sum to 1 over all tokens; the CLS and register columns are dropped here, so a map sums
    to slightly less than 1.
    """
    tokens, (h, w) = backbone.last_block_input(images)
    row = backbone.cls_attention_row(tokens, (h, w))
    patches = row[:, :, backbone.num_prefix_tokens :]
    return patches.reshape(row.shape[0], row.shape[1], h, w)


def mean_attention(maps: torch.Tensor) -> torch.Tensor:
    """Mean over heads: (..., heads, h, w) -> (..., h, w)."""
    return maps.mean(dim=-3)


def threshold_attention(maps: torch.Tensor, threshold: float = ATTENTION_THRESHOLD) -> torch.Tensor:
    """Per map, the smallest set of patches holding a fraction ``threshold`` of its mass.

    Each (h, w) map is normalised to sum 1, sorted in decreasing order and patches are kept
    until the cumulative mass reaches ``threshold``. Returns a bool tensor shaped like ``maps``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = maps.flatten(-2).double()
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    values, order = flat.sort(dim=-1, descending=True)
    before = values.cumsum(dim=-1) - values  # mass of the strictly larger patches
    keep_sorted = before < threshold
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


@functools.cache
def colormap_lut(name: str = "inferno") -> np.ndarray:
    """A (256, 3) uint8 RGB lookup table of a matplotlib colour map."""
    from matplotlib import colormaps

    if name not in colormaps:
        raise InputError(f"unknown colour map '{name}': use one of {', '.join(COLORMAPS)}")
    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def upsample(values: np.ndarray, size: tuple[int, int], interpolation: Interpolation) -> np.ndarray:
    """Resize an (h, w) map to ``size`` (H, W) pixels."""
    flags = cv2.INTER_NEAREST if interpolation == "nearest" else cv2.INTER_LINEAR
    return cv2.resize(values, (size[1], size[0]), interpolation=flags)


def heatmap(
    attention: np.ndarray,
    size: tuple[int, int],
    colormap: str = "inferno",
    interpolation: Interpolation = "nearest",
) -> np.ndarray:
    """An (h, w) map min-max scaled and colour mapped, upsampled to ``size`` -> (H, W, 3) uint8."""
    values = attention.astype(np.float32)
    low, span = float(values.min()), float(values.max() - values.min())
    scaled = (values - low) / span if span > 0 else np.zeros_like(values)
    index = np.round(upsample(scaled, size, interpolation) * 255).clip(0, 255).astype(np.uint8)
    return colormap_lut(colormap)[index]


def mask_image(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) bool mask as a 0/255 uint8 image of ``size``."""
    return upsample(mask.astype(np.uint8) * 255, size, "nearest")


def blend_heatmap(
    image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
    """The frame blended with a heat map; a full-size 0/255 ``mask`` is outlined in white."""
    out = cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)
    if mask is not None:
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, min(mask.shape) // 240))
    return out


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """``text`` in white on a black box in the top-left corner."""
    tile = tile.copy()
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (width, height), base = cv2.getTextSize(text, font, scale, 1)
    cv2.rectangle(tile, (0, 0), (width + 6, height + base + 4), (0, 0, 0), -1)
    cv2.putText(tile, text, (3, height + 2), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def montage(
    tiles: list[tuple[str, np.ndarray]], tile_width: int = 240, columns: int = 4
) -> np.ndarray:
    """Labelled RGB images resized to ``tile_width`` and laid out in rows of ``columns``."""
    height, width = tiles[0][1].shape[:2]
    tile_height = max(1, round(height * tile_width / width))
    resized = [
        _label(cv2.resize(image, (tile_width, tile_height), interpolation=cv2.INTER_AREA), text)
        for text, image in tiles
    ]
    blank = np.zeros_like(resized[0])
    resized += [blank] * (-len(resized) % columns)
    rows = [np.hstack(resized[i : i + columns]) for i in range(0, len(resized), columns)]
    return np.vstack(rows)


def encode_png(image: np.ndarray, colours: int | None = None) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or grayscale (H, W) uint8 image.

    ``colours`` quantises an RGB image to a palette of that many colours (much smaller files).
    """
    if colours is not None:
        buffer = io.BytesIO()
        Image.fromarray(image).quantize(colours).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise InputError("cannot encode a PNG image")
    return data.tobytes()


@dataclass
class AttentionSummary:
    """What :func:`export_attention` wrote."""

    out_dir: Path
    num_frames: int
    seconds: float
    manifest: dict[str, Any]
    overlay: Path | None = None

    @property
    def frames_per_second(self) -> float:
        return self.num_frames / self.seconds if self.seconds > 0 else float("inf")


class AttentionWriter:
    """Writes per-frame heat maps, masks, raw maps and montages into a staged output."""

    def __init__(
        self,
        output: OutputSink,
        threshold: float | None = None,
        save_raw: bool = False,
        save_montage: bool = False,
        colormap: str = "inferno",
        interpolation: Interpolation = "nearest",
    ) -> None:
        self.output = output
        self.threshold, self.save_raw, self.save_montage = threshold, save_raw, save_montage
        self.colormap, self.interpolation = colormap, interpolation
        colormap_lut(colormap)  # fail early on an unknown name

    def _png(self, folder: str, name: str, image: np.ndarray, colours: int | None = None) -> None:
        self.output.write_bytes(f"{folder}/{name}.png", encode_png(image, colours))

    def write(self, frame: Frame, maps: torch.Tensor) -> np.ndarray:
        """Write everything for one frame's (heads, h, w) maps; returns the mean-map overlay."""
        size = frame.image.shape[:2]
        stack = torch.cat([mean_attention(maps)[None], maps]).cpu()  # (1 + heads, h, w)
        labels = ["mean", *(f"head{i}" for i in range(maps.shape[0]))]
        masks = None if self.threshold is None else threshold_attention(stack, self.threshold)
        heats = [heatmap(m.numpy(), size, self.colormap, self.interpolation) for m in stack]
        full_masks = [mask_image(m.numpy(), size) for m in masks] if masks is not None else None
        for index, label in enumerate(labels):
            self._png(label, frame.name, heats[index])
            if full_masks is not None:
                self._png(f"mask-{label}", frame.name, full_masks[index])
        overlay = blend_heatmap(frame.image, heats[0], full_masks[0] if full_masks else None)
        if self.save_raw:
            raw = {"attention": maps.float().cpu().contiguous()}
            if masks is not None:
                raw["masks"] = masks[1:].to(torch.uint8).contiguous()
            data = save_safetensors(raw, metadata={"threshold": str(self.threshold)})
            self.output.write_bytes(f"raw/{frame.name}.safetensors", data)
        if self.save_montage:
            tiles = [("frame", frame.image), ("mean overlay", overlay), ("mean", heats[0])]
            if full_masks is not None:
                mask_rgb = cv2.cvtColor(full_masks[0], cv2.COLOR_GRAY2RGB)
                tiles.append((f"mean mask t={self.threshold:g}", mask_rgb))
            tiles += list(zip(labels[1:], heats[1:], strict=True))
            self._png("montage", frame.name, montage(tiles), colours=256)
        return overlay


def export_attention(
    source: FrameSource,
    out_dir: str | Path,
    features: BatchExtractor,
    threshold: float | None = None,
    save_raw: bool = False,
    save_montage: bool = False,
    colormap: str = "inferno",
    interpolation: Interpolation = "nearest",
    overlay: str | Path | None = None,
    batch_size: int = 1,
    on_frame: Callable[[Frame], None] | None = None,
    overwrite: bool = False,
) -> AttentionSummary:
    """Attention maps of every frame of ``source`` written under ``out_dir``; manifest last.

    Per frame: ``mean/`` and ``head{i}/`` heat maps, ``mask-*/`` with a ``threshold``,
    ``raw/`` safetensors with ``save_raw`` and ``montage/`` with ``save_montage``; ``overlay``
    writes the mean map blended over the frames as a video at the source fps.
    """
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold {threshold} is not a mass fraction: use a value in (0, 1]")
    colormap_lut(colormap)
    backbone = features.backbone
    backbone.require_cls_attention()
    names: list[str] = []
    with OutputSink(out_dir, overlay, source.fps, overwrite, [source.path]) as run:
        writer = AttentionWriter(run, threshold, save_raw, save_montage, colormap, interpolation)
        start = time.perf_counter()
        for batch_frames, batch in iter_batches(source, features, batch_size):
            maps = cls_attention(backbone, batch)
            for frame, frame_maps in zip(batch_frames, maps, strict=True):
                run.write_overlay(writer.write(frame, frame_maps))
                names.append(frame.name)
                if on_frame is not None:
                    on_frame(frame)
        seconds = time.perf_counter() - start
        manifest = {
            "format": "dino-vos-attention",
            **extraction_metadata(features, source.frame_size),
            "input": str(source.path),
            "fps": source.fps,
            "frames": len(names),
            "names": names,
            "heads": backbone.num_heads,
            "register_tokens": backbone.num_prefix_tokens - 1,
            "threshold": writer.threshold,
            "colormap": writer.colormap,
            "interpolation": writer.interpolation,
            "seconds": round(seconds, 3),
        }
        run.commit(manifest)
    return AttentionSummary(Path(out_dir), len(names), seconds, manifest, run.overlay)
