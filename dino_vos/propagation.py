"""Windowed k-NN label propagation over a temporal context (docs/protocol.md#propagation).

The reference builds an N x N affinity per context frame and multiplies it by a window mask.
Here the target grid is cut into square tiles; each tile only meets the (tile + 2 * radius)
square of source patches around it, so the work is proportional to N * window instead of N^2,
and memory is bounded by ``max_chunk_bytes`` whatever the video length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dino_vos.spec import PropagationConfig


@dataclass(frozen=True)
class _Geometry:
    """Tiling of an (h, w) patch grid: target tiles of ``tile`` and source windows of ``span``."""

    height: int
    width: int
    tile: int
    radius: int

    @classmethod
    def create(cls, height: int, width: int, config: PropagationConfig) -> _Geometry:
        longest = max(height, width)
        radius = min(config.radius if config.radius is not None else longest, longest)
        return cls(height, width, min(config.tile, longest), radius)

    @property
    def span(self) -> int:
        return self.tile + 2 * self.radius

    @property
    def tiles(self) -> tuple[int, int]:
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    @property
    def padded(self) -> tuple[int, int]:
        """Source buffer size: radius on every side plus the last tile's overhang."""
        tiles_y, tiles_x = self.tiles
        return tiles_y * self.tile + 2 * self.radius, tiles_x * self.tile + 2 * self.radius

    def windows(self, buffer: torch.Tensor) -> torch.Tensor:
        """(M, Hp, Wp, C) padded buffer -> strided view (tiles_y, tiles_x, M, span, span, C)."""
        frames, _, _, channels = buffer.shape
        s_m, s_h, s_w, s_c = buffer.stride()
        tiles_y, tiles_x = self.tiles
        return buffer.as_strided(
            (tiles_y, tiles_x, frames, self.span, self.span, channels),
            (self.tile * s_h, self.tile * s_w, s_m, s_h, s_w, s_c),
            buffer.storage_offset(),
        )

    def target_tiles(self, target: torch.Tensor) -> torch.Tensor:
        """(h, w, D) -> (tiles_y, tiles_x, tile * tile, D), zero-padded at the bottom/right."""
        tiles_y, tiles_x = self.tiles
        t = self.tile
        padded = F.pad(target, (0, 0, 0, tiles_x * t - self.width, 0, tiles_y * t - self.height))
        return (
            padded.view(tiles_y, t, tiles_x, t, -1)
            .transpose(1, 2)
            .reshape(tiles_y, tiles_x, t * t, -1)
        )

    def window_mask(self, device: torch.device) -> torch.Tensor:
        """(tile*tile, span*span): source within the square window of each tile position."""
        t = torch.arange(self.tile, device=device)
        s = torch.arange(self.span, device=device) - self.radius
        near = (s.view(1, -1) - t.view(-1, 1)).abs() <= self.radius
        mask = near.view(self.tile, 1, self.span, 1) & near.view(1, self.tile, 1, self.span)
        return mask.reshape(self.tile * self.tile, self.span * self.span)


class _ContextBuffer:
    """Zero-padded features and labels of the reference frames and the recent frames.

    Slots 0..fixed-1 hold the references (the first frame, then keyframes); slots
    fixed..capacity-1 a ring of the most recent frames. Each frame is copied into the buffer
    once, when it enters the context.
    """

    def __init__(
        self, geometry: _Geometry, capacity: int, dim: int, classes: int, device, fixed: int = 1
    ):
        self.geometry = geometry
        hp, wp = geometry.padded
        self.keys = torch.zeros(capacity, hp, wp, dim, device=device)
        self.labels = torch.zeros(capacity, hp, wp, classes, device=device)
        self.valid = torch.zeros(1, hp, wp, 1, device=device)
        self._interior(self.valid)[:] = 1
        self.count = 0
        self.fixed = fixed
        self._next_recent = fixed

    @property
    def classes(self) -> int:
        return self.labels.shape[-1]

    def _interior(self, buffer: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return buffer[:, g.radius : g.radius + g.height, g.radius : g.radius + g.width]

    def put(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store (h, w, D) normalised features and (C, h, w) labels in the next slot."""
        capacity = self.keys.shape[0]
        slot = self.count if self.count < capacity else self._next_recent
        if self.count >= capacity:
            ring = capacity - self.fixed
            self._next_recent = self.fixed + (self._next_recent - self.fixed + 1) % ring
        self.count = min(self.count + 1, capacity)
        self._interior(self.keys)[slot] = features
        self._interior(self.labels)[slot] = labels.movedim(0, -1)

    def add_classes(self, extra: int) -> None:
        """Append ``extra`` all-zero label channels (objects that appear later)."""
        self.labels = F.pad(self.labels, (0, extra))

    def with_reference(
        self, features: torch.Tensor, labels: torch.Tensor, max_references: int
    ) -> _ContextBuffer:
        """A buffer with one more reference (beyond ``max_references`` the oldest one after the
        first is dropped) and no recent frames: their labels predate the annotation."""
        references = list(range(self.fixed))
        if len(references) >= max_references:
            if max_references == 1:
                return self  # the first frame stays the only reference
            references = [0, *references[2:]]
        ring = self.keys.shape[0] - self.fixed
        new = _ContextBuffer(
            self.geometry,
            len(references) + 1 + ring,
            self.keys.shape[-1],
            self.classes,
            self.keys.device,
            fixed=len(references) + 1,
        )
        for slot in references:
            new._copy_from(self, slot)
        new.put(features, labels)
        return new

    def _copy_from(self, other: _ContextBuffer, slot: int) -> None:
        self.keys[self.count] = other.keys[slot]
        self.labels[self.count] = other.labels[slot]
        self.count += 1


def _chunks(tiles_y: int, tiles_x: int, per_chunk: int) -> Iterator[tuple[slice, slice]]:
    """Blocks of at most ``per_chunk`` tiles: whole tile rows when they fit, else row pieces."""
    if per_chunk >= tiles_x:
        rows = per_chunk // tiles_x
        for y0 in range(0, tiles_y, rows):
            yield slice(y0, min(y0 + rows, tiles_y)), slice(0, tiles_x)
        return
    for y in range(tiles_y):
        for x0 in range(0, tiles_x, per_chunk):
            yield slice(y, y + 1), slice(x0, min(x0 + per_chunk, tiles_x))


class LabelPropagator:
    """Propagates soft label maps from a first frame and a queue of recent frames.

    Features are (h, w, D) patch grids (L2-normalised internally); labels are (C, h, w) soft
    maps. ``reset`` sets the first frame; each ``step`` returns the target frame's soft labels
    and pushes them, with its features, into the queue of recent frames (memory stays bounded
    by the context length, whatever the video length).
    """

    def __init__(self, config: PropagationConfig | None = None) -> None:
        self.config = config or PropagationConfig()
        self._buffer: _ContextBuffer | None = None
        self._masks: dict[tuple, torch.Tensor] = {}

    def reset(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Start a video from its first frame's features (h, w, D) and labels (C, h, w)."""
        if features.shape[:2] != labels.shape[1:]:
            raise ValueError(
                f"label map {tuple(labels.shape[1:])} does not match features "
                f"{tuple(features.shape[:2])}"
            )
        height, width, dim = features.shape
        geometry = _Geometry.create(height, width, self.config)
        capacity = 1 + self.config.context
        self._buffer = _ContextBuffer(geometry, capacity, dim, labels.shape[0], features.device)
        self._buffer.put(F.normalize(features.float(), dim=-1), labels.float())

    @property
    def context_size(self) -> int:
        """Number of frames the next step attends to (first frame + recent frames)."""
        return self._buffer.count if self._buffer is not None else 0

    def _target(self, features: torch.Tensor) -> torch.Tensor:
        if self._buffer is None:
            raise RuntimeError("call reset() with the first frame first")
        if features.shape[:2] != (self._buffer.geometry.height, self._buffer.geometry.width):
            raise ValueError(f"feature grid {tuple(features.shape[:2])} changed within a video")
        return F.normalize(features.float(), dim=-1)

    def step(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels (C, h, w) for a target frame's features (h, w, D); updates the queue."""
        target = self._target(features)
        soft = self._soft_labels(target, self._buffer)  # type: ignore[arg-type]
        if self.config.context:
            self._buffer.put(target, soft)  # type: ignore[union-attr]
        return soft

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels (C, h, w) for a frame's features, leaving the context as it is."""
        return self._soft_labels(self._target(features), self._buffer)  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        return self._buffer.classes if self._buffer is not None else 0

    def add_classes(self, extra: int) -> None:
        """Extend every stored label map with ``extra`` empty channels (new objects)."""
        if self._buffer is None:
            raise RuntimeError("call reset() with the first frame first")
        if extra > 0:
            self._buffer.add_classes(extra)

    def add_reference(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Make a frame with known labels (C, h, w) a permanent reference, like the first frame.

        At most ``config.max_references`` references are kept: beyond that the oldest one after
        the first frame is dropped, so memory stays flat on long videos. The queue of recent
        frames starts again after a reference (their labels predate it), as after the first
        frame.
        """
        target = self._target(features)
        if labels.shape != (self.num_classes, *target.shape[:2]):
            raise ValueError("labels do not match the grid and the classes of the context")
        self._buffer = self._buffer.with_reference(  # type: ignore[union-attr]
            target, labels.float(), self.config.max_references
        )

    def add_context(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Push a frame with known labels (C, h, w) into the queue of recent frames.

        For example a frame annotated by hand; the oldest recent frame leaves the queue.
        """
        if self._buffer is None:
            raise RuntimeError("call reset() with the first frame before add_context()")
        if features.shape[:2] != labels.shape[1:] or labels.shape[0] != self._buffer.classes:
            raise ValueError("features and labels do not match the first frame's grid/classes")
        if self.config.context:
            self._buffer.put(F.normalize(features.float(), dim=-1), labels.float())

    def soft_labels(
        self, target: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """One stateless step: target (h, w, D), keys (M, h, w, D), labels (M, C, h, w).

        Features must already be L2-normalised; returns soft labels (C, h, w).
        """
        height, width, dim = target.shape
        geometry = _Geometry.create(height, width, self.config)
        buffer = _ContextBuffer(geometry, keys.shape[0], dim, labels.shape[1], target.device)
        for frame_keys, frame_labels in zip(keys, labels, strict=False):
            buffer.put(frame_keys, frame_labels)
        return self._soft_labels(target, buffer)

    def _soft_labels(self, target: torch.Tensor, buffer: _ContextBuffer) -> torch.Tensor:
        g = buffer.geometry
        dim, num_ctx, num_cls = target.shape[-1], buffer.count, buffer.labels.shape[-1]
        tiles_y, tiles_x = g.tiles
        area, source_len = g.tile * g.tile, num_ctx * g.span * g.span
        key_windows = g.windows(buffer.keys[:num_ctx])
        label_windows = g.windows(buffer.labels[:num_ctx])
        valid_windows = g.windows(buffer.valid) > 0  # ty, tx, 1, s, s, 1
        queries = g.target_tiles(target)
        # zero-padded targets beyond the grid tie everywhere: keep them off the tie path
        real_targets = g.target_tiles(target.new_ones(g.height, g.width, 1))[..., 0] > 0
        in_window = self._window_mask(g, target.device).view(1, area, 1, -1)

        # bytes per tile: gathered keys and labels, similarities and their mask
        per_tile = source_len * (dim + num_cls + 2 * area) * 4
        per_chunk = max(1, self.config.max_chunk_bytes // per_tile)
        out = torch.empty(tiles_y, tiles_x, area, num_cls, device=target.device)
        for rows, cols in _chunks(tiles_y, tiles_x, per_chunk):
            count = (rows.stop - rows.start) * (cols.stop - cols.start)
            q = queries[rows, cols].reshape(count, area, dim)
            k = key_windows[rows, cols].reshape(count, source_len, dim)
            lab = label_windows[rows, cols].reshape(count, source_len, num_cls)
            ok = valid_windows[rows, cols].reshape(count, 1, 1, -1) & in_window
            sims = torch.bmm(q, k.transpose(1, 2)).view(count, area, num_ctx, -1)
            sims = sims.masked_fill_(~ok, float("-inf")).view(count, area, source_len)
            real = real_targets[rows, cols].reshape(count, area)
            out[rows, cols] = self._weighted_vote(sims, lab, real).view_as(out[rows, cols])
        soft = out.view(tiles_y, tiles_x, g.tile, g.tile, num_cls).permute(4, 0, 2, 1, 3)
        soft = soft.reshape(num_cls, tiles_y * g.tile, tiles_x * g.tile)
        return soft[:, : g.height, : g.width].contiguous()

    def _window_mask(self, geometry: _Geometry, device: torch.device) -> torch.Tensor:
        key = (geometry.tile, geometry.radius, str(device))
        if key not in self._masks:
            self._masks[key] = geometry.window_mask(device)
        return self._masks[key]

    def _weighted_vote(
        self, sims: torch.Tensor, labels: torch.Tensor, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Keep the top-k similarities (ties with the k-th included), softmax them, vote.

        sims (B, T, S) with -inf outside the window, labels (B, S, C) -> (B, T, C). Rows without
        ties beyond the k-th use only the k gathered entries; rows with ties use a dense mask.
        ``real`` (B, T) marks the target rows whose votes are used (others skip the tie path).
        """
        k = min(self.config.topk, sims.shape[-1])
        inv_temp = 1.0 / self.config.temperature
        top = sims.topk(min(k + 1, sims.shape[-1]), dim=-1)
        kth = top.values[..., k - 1 : k]
        # Entries at -inf are out of the window: never kept, even with fewer than k candidates.
        weights = torch.exp((top.values[..., :k] - top.values[..., :1]) * inv_temp)
        weights = weights * torch.isfinite(top.values[..., :k])
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        batch, rows, _ = sims.shape
        gathered = torch.gather(
            labels,
            1,
            top.indices[..., :k].reshape(batch, rows * k, 1).expand(-1, -1, labels.shape[-1]),
        ).view(batch, rows, k, -1)
        votes = (weights.unsqueeze(-1) * gathered).sum(dim=2)
        if top.values.shape[-1] > k:
            tied = (top.values[..., k] == top.values[..., k - 1]) & torch.isfinite(kth[..., 0])
            if real is not None:
                tied &= real
            if tied.any():
                b_idx, r_idx = tied.nonzero(as_tuple=True)
                row_sims = sims[b_idx, r_idx]  # (n, S)
                keep = row_sims >= kth[b_idx, r_idx]
                dense = torch.exp((row_sims - top.values[b_idx, r_idx, :1]) * inv_temp) * keep
                dense = dense / dense.sum(dim=-1, keepdim=True)
                votes[b_idx, r_idx] = torch.bmm(dense.unsqueeze(1), labels[b_idx]).squeeze(1)
        return votes


def labels_from_soft(
    soft: torch.Tensor, patch_size: int, output_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Reference post-processing: bilinear upsampling by the patch size, per-channel min-max
    normalisation of channels whose max is positive, argmax. Returns (H', W') channel indices at
    ``h * patch_size`` x ``w * patch_size`` (resize to the frame size with nearest afterwards).
    """
    up = F.interpolate(
        soft[None].float(),
        scale_factor=patch_size,
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )[0]
    return _normalised_argmax(up)


def _normalised_argmax(up: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation of (C, H, W) maps (channels whose max is positive),
    then argmax over channels (docs/protocol.md#propagation)."""
    flat = up.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    shifted = flat - low
    high = shifted.max(dim=1, keepdim=True).values
    positive = flat.max(dim=1, keepdim=True).values > 0
    # A constant positive channel divides 0 by 0 in the reference (NaN wins the argmax).
    scaled = torch.where(high > 0, shifted / high.clamp_min(1e-30), torch.full_like(shifted, 2.0))
    normed = torch.where(positive, scaled, flat).view_as(up)
    return normed.argmax(dim=0)


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window of each (..., H, W) map; windows are cut at the borders."""
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])
    out = F.avg_pool2d(flat, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    return out.reshape(shape)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Guided filter (He et al. 2010) of each channel of ``src`` (C, H, W) with a grayscale
    ``guide`` (H, W) in [0, 1] (docs/protocol.md#refinements)."""
    guide = guide[None].float()
    mean_i = box_filter(guide, radius)
    var_i = box_filter(guide * guide, radius) - mean_i * mean_i
    mean_p = box_filter(src, radius)
    cov_ip = box_filter(guide * src, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_filter(a, radius) * guide + box_filter(b, radius)


def labels_from_soft_guided(
    soft: torch.Tensor,
    patch_size: int,
    guide: torch.Tensor,
    radius: int | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """:func:`labels_from_soft` with an edge-aware upsampling: the bilinearly upsampled soft
    map is guided-filtered with ``guide`` (H', W'), the grayscale frame in [0, 1] at
    ``h * patch_size`` x ``w * patch_size``, before the same normalisation and argmax
    (docs/protocol.md#refinements). ``radius`` in pixels, None: the patch size."""
    up = F.interpolate(
        soft[None].float(),
        scale_factor=patch_size,
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )[0]
    if tuple(guide.shape) != tuple(up.shape[1:]):
        raise ValueError(f"guide {tuple(guide.shape)} != upsampled map {tuple(up.shape[1:])}")
    filtered = guided_filter(guide.to(up.device), up, radius or patch_size, eps)
    return _normalised_argmax(filtered)
