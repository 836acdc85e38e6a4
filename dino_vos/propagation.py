"""Windowed k-NN label propagation over a temporal context (docs/protocol.md#propagation).

The reference builds an N x N affinity per context frame and multiplies it by a window mask.
Here only window similarities are computed, one window row at a time: the source patches of
window row y around column x (columns x - radius .. x + radius, every context frame) are the
same for the 2 radius + 1 targets (y - radius .. y + radius, x) of that column, and with
targets and sources stored row by row, the products of all the (y, x) of a group of source
rows form one batched matrix product with constant strides. Each group then merges what it
found into a running list of every target's best candidates; memory is bounded by
``max_chunk_bytes`` whatever the grid and the video length. When the window covers the whole
grid, the candidates are all the context patches, compared in plain products.

A protocol's circular neighbourhood (docs/protocol.md#dinov3-protocol) is the same square
window with the candidates outside the circle masked: the engine and its speed are the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dino_vos.protocols import SoftNormalisation
from dino_vos.spec import PropagationConfig

# Candidates kept beyond the (k+1)-th in the running lists, so that ties with the k-th are
# mostly resolved without a second pass (a static patch repeated in all 8 frames of the default
# context, for instance); longer ties recompute the target's whole window.
_SPARE = 4


@dataclass(frozen=True)
class _Geometry:
    """A patch grid and its window radii, clipped to the grid.

    ``windowed`` is False when every window covers the whole grid (no radius, or a radius at
    least the grid's size; for a circle, at least its diagonal): then the radii are 0 and
    nothing is padded. ``circle``: the radius of a circular neighbourhood (dy^2 + dx^2 <=
    circle^2) inside the square window, None for the square window itself.
    """

    height: int
    width: int
    radius_y: int
    radius_x: int
    windowed: bool
    circle: int | None = None

    @classmethod
    def create(cls, height: int, width: int, config: PropagationConfig) -> _Geometry:
        radius = config.radius
        radius_y = height - 1 if radius is None else min(radius, height - 1)
        radius_x = width - 1 if radius is None else min(radius, width - 1)
        circle = radius if config.rules.neighbourhood == "circle" else None
        covers = radius_y == height - 1 and radius_x == width - 1
        if circle is not None and (height - 1) ** 2 + (width - 1) ** 2 <= circle**2:
            circle = None  # the circle holds the whole grid
        if covers and circle is None:
            return cls(height, width, 0, 0, False)
        return cls(height, width, radius_y, radius_x, True, circle)

    def inside(self, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Whether source offsets (dy, dx) from a target lie in its neighbourhood (offsets
        within the square window are assumed)."""
        if self.circle is None:
            return torch.ones_like(dy, dtype=torch.bool)
        return dy * dy + dx * dx <= self.circle**2

    @property
    def window(self) -> tuple[int, int]:
        """Rows and columns of a window (positions beyond the grid included)."""
        return 2 * self.radius_y + 1, 2 * self.radius_x + 1

    @property
    def padded_width(self) -> int:
        return self.width + 2 * self.radius_x


class _ContextBuffer:
    """Features and labels of the reference frames and the recent frames.

    keys: the grid padded with radius_y zero rows above and below, flattened row by row, with
    radius_x zero positions before and after: ((h + 2 radius_y) * w + 2 radius_x, frames, D).
    The frame axis sits next to the channels, so the sources of one window row, all frames, are
    one matrix, and the next position's start one position later. labels: (h + 2 radius_y, w +
    2 radius_x, frames, C), zero-padded. The frame axis grows up to ``capacity`` (a step only
    sees frames that exist). Slots 0..fixed-1 hold the references (the first frame, then
    keyframes); slots fixed..capacity-1 a ring of the most recent frames. Each frame is copied
    in once, when it enters the context.
    """

    def __init__(
        self,
        geometry: _Geometry,
        capacity: int,
        dim: int,
        classes: int,
        device: torch.device | str,
        fixed: int = 1,
    ) -> None:
        self.geometry = geometry
        self.capacity = capacity
        g = geometry
        positions = (g.height + 2 * g.radius_y) * g.width + 2 * g.radius_x
        self.keys = torch.zeros(positions, 0, dim, device=device)
        self.labels = torch.zeros(
            g.height + 2 * g.radius_y, g.padded_width, 0, classes, device=device
        )
        self.fixed = fixed
        self._next_recent = fixed

    @property
    def count(self) -> int:
        return self.keys.shape[1]

    @property
    def classes(self) -> int:
        return self.labels.shape[-1]

    def put(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store (h, w, D) normalised features and (C, h, w) labels in the next slot."""
        if self.count < self.capacity:
            slot = self.count
            self.keys = F.pad(self.keys, (0, 0, 0, 1))
            self.labels = F.pad(self.labels, (0, 0, 0, 1))
        else:
            slot = self._next_recent
            ring = self.capacity - self.fixed
            self._next_recent = self.fixed + (slot - self.fixed + 1) % ring
        g = self.geometry
        start = g.radius_x + g.radius_y * g.width
        grid = self.keys[start : start + g.height * g.width]
        grid.view(g.height, g.width, *self.keys.shape[1:])[:, :, slot] = features
        columns = slice(g.radius_x, g.radius_x + g.width)
        self.labels[g.radius_y : g.radius_y + g.height, columns, slot] = labels.movedim(0, -1)

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
        ring = self.capacity - self.fixed
        new = _ContextBuffer(
            self.geometry,
            len(references) + 1 + ring,
            self.keys.shape[-1],
            self.classes,
            self.keys.device,
            fixed=len(references) + 1,
        )
        new.keys = self.keys[:, references].clone()
        new.labels = self.labels[:, :, references].clone()
        new.put(features, labels)
        return new

    def window_keys(self) -> torch.Tensor:
        """(h, w, window rows, window columns * frames, D) view: each target's window."""
        g = self.geometry
        position, frames, dim = self.keys.stride(0), self.count, self.keys.shape[-1]
        window_rows, window_cols = g.window
        return self.keys.as_strided(
            (g.height, g.width, window_rows, window_cols * frames, dim),
            (g.width * position, position, g.width * position, dim, 1),
            self.keys.storage_offset(),
        )

    def label_rows(self, targets: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Rows of ``labels.reshape(-1, C)`` of window candidates: targets (B, 1) flat target
        positions, window (B, K) indices into their (window rows, window columns * frames)."""
        g = self.geometry
        line = g.window[1] * self.count
        y, x = targets // g.width, targets % g.width
        origin = (y * g.padded_width + x) * self.count  # the window's corner, padded
        return origin + (window // line) * (g.padded_width * self.count) + window % line


def _row_groups(
    g: _Geometry, frames: int, keep: int, budget: int
) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Groups of source rows x columns whose products and candidate blocks fit in ``budget``
    bytes: whole rows when one does (as many as fit), else pieces of one row (at least one
    position). Returns the largest group's floats and the groups (y0, rows, x0, columns)."""
    window_rows, window_cols = g.window
    line = window_cols * frames

    def floats(rows: int, cols: int) -> int:
        """Products, the candidate block and its mask (bytes, counted as floats)."""
        targets = min(g.height, rows + 2 * g.radius_y) * cols
        mask = (rows + 2 * g.radius_y) * cols * rows * line // 4
        return rows * cols * window_rows * line + targets * (rows * line + 3 * keep) + mask

    rows, cols = 1, g.width
    if floats(1, g.width) * 4 <= budget:
        while rows < g.height and floats(rows + 1, g.width) * 4 <= budget:
            rows += 1
        rows = math.ceil(g.height / math.ceil(g.height / rows))  # balanced
    else:
        while cols > 1 and floats(1, cols) * 4 > budget:
            cols -= 1
    groups = [
        (y0, min(rows, g.height - y0), x0, min(cols, g.width - x0))
        for y0 in range(0, g.height, rows)
        for x0 in range(0, g.width, cols)
    ]
    return floats(rows, cols), groups


def _candidate_mask(
    g: _Geometry, frames: int, rows: int, x0: int, cols: int, device: torch.device
) -> torch.Tensor:
    """Which products of a group of ``rows`` source rows from y0 are candidates: (target rows
    y0 - radius_y .. y0 + rows + radius_y, columns x0 .. x0 + cols, source rows, window columns
    * frames), False off the target's window rows or off the grid's columns."""
    window_rows, window_cols = g.window
    t = torch.arange(rows + 2 * g.radius_y, device=device).view(-1, 1, 1, 1)
    y = torch.arange(rows, device=device).view(1, 1, -1, 1) + g.radius_y
    x = torch.arange(x0, x0 + cols, device=device).view(1, -1, 1, 1)
    dx = torch.arange(window_cols * frames, device=device) // frames - g.radius_x
    x = x + dx
    return ((t - y).abs() <= g.radius_y) & (x >= 0) & (x < g.width) & g.inside(t - y, dx)


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
        # the last step's work space: (key, floats, candidate mask or None)
        self._work: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

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

    def _context(self) -> _ContextBuffer:
        if self._buffer is None:
            raise RuntimeError("call reset() with the first frame first")
        return self._buffer

    def _target(self, features: torch.Tensor) -> torch.Tensor:
        geometry = self._context().geometry
        if features.shape[:2] != (geometry.height, geometry.width):
            raise ValueError(f"feature grid {tuple(features.shape[:2])} changed within a video")
        return F.normalize(features.float(), dim=-1)

    def step(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels (C, h, w) for a target frame's features (h, w, D); updates the queue."""
        target = self._target(features)
        soft = self._soft_labels(target, self._context())
        if self.config.context:
            self._context().put(target, soft)
        return soft

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Soft labels (C, h, w) for a frame's features, leaving the context as it is."""
        return self._soft_labels(self._target(features), self._context())

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
        self._buffer = self._context().with_reference(
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
        height, width = target.shape[:2]
        if buffer.geometry.windowed:
            votes = self._window_votes(target, buffer)
        else:
            votes = self._global_votes(target, buffer)
        if self.config.rules.renormalise:
            votes = _renormalised(votes)
        return votes.T.reshape(-1, height, width).contiguous()

    def _keep(self, candidates: int) -> tuple[int, int]:
        """(k, length of the running lists) for rows of ``candidates`` candidates."""
        k = min(self.config.topk, candidates)
        return k, min(candidates, k + 1 + _SPARE)

    def _window_votes(self, target: torch.Tensor, buffer: _ContextBuffer) -> torch.Tensor:
        """(h * w, C) votes over the square windows (see the module docstring)."""
        g = buffer.geometry
        height, width, dim = target.shape
        frames = buffer.count
        window_rows, window_cols = g.window
        line = window_cols * frames  # one window row: its columns, all frames
        k, keep = self._keep(window_rows * line)
        labels = buffer.labels.reshape(-1, buffer.classes)
        votes = target.new_empty(height * width, buffer.classes)
        unresolved = torch.zeros(height * width, dtype=torch.bool, device=target.device)
        # vote band by band of rows, as soon as their lists are final (small ops)
        for start, values, window in self._window_top(target, buffer, keep):
            rows = slice(start, start + len(values))
            targets = torch.arange(rows.start, rows.stop, device=target.device).unsqueeze(1)
            candidates = labels[buffer.label_rows(targets, window)]
            votes[rows], unresolved[rows] = self._vote(values, candidates, k)
        if keep < window_rows * line and unresolved.any():
            # ties with the k-th beyond the running list: redo these rows over whole windows
            windows = buffer.window_keys()
            queries = target.reshape(-1, dim)
            every = torch.arange(window_rows * line, device=target.device)
            step = max(1, self.config.max_chunk_bytes // (4 * window_rows * line * (dim + 3)))
            for rows in unresolved.nonzero()[:, 0].split(step):
                y, x = rows // width, rows % width
                sims = (windows[y, x].flatten(1, 2) @ queries[rows].unsqueeze(-1)).squeeze(-1)
                source_y = y.unsqueeze(1) + every // line - g.radius_y
                source_x = x.unsqueeze(1) + every % line // frames - g.radius_x
                outside = (source_y < 0) | (source_y >= height)
                outside |= (source_x < 0) | (source_x >= width)
                outside |= ~g.inside(source_y - y.unsqueeze(1), source_x - x.unsqueeze(1))
                sims.masked_fill_(outside, -math.inf)
                rows_labels = labels[buffer.label_rows(rows.unsqueeze(1), every.expand_as(sims))]
                votes[rows] = self._dense_vote(sims, rows_labels, k)
        return votes

    def _window_top(
        self, target: torch.Tensor, buffer: _ContextBuffer, keep: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Each target's ``keep`` best window similarities, in decreasing order (-inf: none),
        and their indices into its (window rows, window columns * frames), by bands of whole
        rows as they are final: (first flat target, values (n, keep), indices (n, keep)).

        For a group of source rows, item (y, x) of one batched product holds the similarities
        of the targets (y - radius_y .. y + radius_y, x) to the window row they share at y; the
        targets met by the group read theirs with a strided view and merge them into their
        running lists (positions off the grid, and off a target's window, at -inf).
        """
        g = buffer.geometry
        height, width, dim = target.shape
        frames, keys = buffer.count, buffer.keys
        window_rows, window_cols = g.window
        line = window_cols * frames
        device = target.device
        # queries padded with radius_y zero rows: item (y, x) reads rows y .. y + 2 radius_y
        queries = target.new_empty(height + 2 * g.radius_y, width, dim)
        queries[g.radius_y : g.radius_y + height] = target
        queries[: g.radius_y] = 0  # rows of no target: their products are never read
        queries[g.radius_y + height :] = 0
        top_values = target.new_full((height, width, keep), -math.inf)
        top_window = torch.zeros(height, width, keep, dtype=torch.long, device=device)
        size, groups = _row_groups(g, frames, keep, self.config.max_chunk_bytes)
        workspace, shared_mask = self._work_space(g, frames, size, groups, target)
        off = target.new_tensor(-math.inf)
        final = 0  # rows before it have been yielded
        for y0, rows, x0, cols in groups:
            items = rows * cols  # (y, x) row-major; cols is the width or rows is 1
            first = y0 * width + x0
            # item rows a (targets y - radius_y + a) that hold a target of the grid for some y
            low = max(0, g.radius_y - (y0 + rows - 1))
            held = min(window_rows, g.radius_y + height - y0) - low
            start = queries.storage_offset() + (first + low * width) * dim
            q = queries.as_strided((items, held, dim), (dim, width * dim, 1), start)
            position = keys.stride(0)
            offset = keys.storage_offset() + (first + g.radius_y * width) * position
            k = keys.as_strided((items, line, dim), (position, dim, 1), offset)
            sims = workspace[: items * held * line].view(items, held, line)
            torch.bmm(q, k.transpose(1, 2), out=sims)
            # target (t, x) meets source row y in row t - y + radius_y - low of item (y, x)
            t0, t1 = max(0, y0 - g.radius_y), min(height, y0 + rows + g.radius_y)
            met = t1 - t0
            shared = sims.as_strided(
                (met, cols, rows, line),
                (line, held * line, cols * held * line - line, 1),
                sims.storage_offset() + (t0 - y0 + g.radius_y - low) * line,
            )
            length = keep + rows * line  # a target's running list, then its fresh candidates
            block = workspace[items * held * line :][: met * cols * length]
            block = block.view(met, cols, length)
            # the running lists first: they prime the top-k's heap, few fresh values get in
            block[..., :keep] = top_values[t0:t1, x0 : x0 + cols]
            fresh = block[..., keep:].view(met, cols, rows, line)
            if shared_mask is None:  # pieces of a row
                mask = _candidate_mask(g, frames, rows, x0, cols, device)
            else:
                mask = shared_mask[:, :, :rows]
            # candidates copied, those off the window or off the grid at -inf, in one op
            lowest = t0 - y0 + g.radius_y
            torch.where(mask[lowest : lowest + met], shared, off, out=fresh)
            best = block.topk(keep, dim=-1)
            # a fresh candidate's index into its target's window: shift by its first row
            shift = (y0 - torch.arange(t0, t1, device=device) + g.radius_y) * line - keep
            kept = top_window[t0:t1, x0 : x0 + cols]
            old = kept.gather(-1, best.indices.clamp_max(keep - 1))
            top_window[t0:t1, x0 : x0 + cols] = torch.where(
                best.indices >= keep, best.indices + shift.view(-1, 1, 1), old
            )
            top_values[t0:t1, x0 : x0 + cols] = best.values
            if x0 + cols == width:  # rows more than radius_y above the next source row are final
                end = height if y0 + rows == height else max(final, y0 + rows - g.radius_y)
                if end > final:
                    yield (
                        final * width,
                        top_values[final:end].view(-1, keep),
                        top_window[final:end].view(-1, keep),
                    )
                    final = end

    def _work_space(
        self,
        g: _Geometry,
        frames: int,
        size: int,
        groups: list[tuple[int, int, int, int]],
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The groups' work space (``size`` floats) and, when groups span the width, their
        candidate mask; kept from one step to the next (same grid and context length)."""
        key = (g, frames, size, target.device, target.dtype)
        if self._work is None or self._work[0] != key:
            self._work = None  # release the old buffers first
            rows = max(group[1] for group in groups)
            mask = None
            if max(group[3] for group in groups) == g.width:
                mask = _candidate_mask(g, frames, rows, 0, g.width, target.device)
            self._work = (key, target.new_empty(size), mask)
        return self._work[1], self._work[2]

    def _global_votes(self, target: torch.Tensor, buffer: _ContextBuffer) -> torch.Tensor:
        """(h * w, C) votes when every context patch is a candidate: chunked products."""
        dim = target.shape[-1]
        keys = buffer.keys.reshape(-1, dim)
        labels = buffer.labels.reshape(-1, buffer.classes)
        k, keep = self._keep(keys.shape[0])
        step = max(1, self.config.max_chunk_bytes // (4 * keys.shape[0]))
        votes = []
        for queries in target.reshape(-1, dim).split(step):
            sims = queries @ keys.T
            best = sims.topk(keep, dim=-1)
            chunk, unresolved = self._vote(best.values, labels[best.indices], k)
            if keep < keys.shape[0] and unresolved.any():
                rows = unresolved.nonzero()[:, 0]
                chunk[rows] = self._dense_vote(sims[rows], labels, k)
            votes.append(chunk)
        return torch.cat(votes)

    def _vote(
        self, values: torch.Tensor, labels: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted vote of the best candidates (docs/protocol.md#propagation).

        values (B, K) in decreasing order (-inf: no candidate), labels (B, K, C). The k best
        are kept, and every candidate equal to the k-th; their weights exp(sim / temperature)
        are normalised to sum 1. Returns the votes (B, C) and the rows whose ties with the
        k-th may go on beyond the K candidates (to be redone over all candidates).
        """
        kth = values[:, k - 1 : k]
        votes = self._weighted(values, values[:, :1], kth, labels)
        return votes, (values[:, -1] >= kth[:, 0]) & torch.isfinite(kth[:, 0])

    def _dense_vote(self, sims: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """The vote of :meth:`_vote` over whole candidate rows: sims (n, L), labels (n, L, C)
        or (L, C) for all rows."""
        best = sims.topk(k, dim=-1).values
        return self._weighted(sims, best[:, :1], best[:, -1:], labels)

    def _weighted(
        self, values: torch.Tensor, top: torch.Tensor, kth: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Candidates at least ``kth`` weigh exp((value - top) / temperature), normalised."""
        kept = values >= kth  # entries at -inf weigh 0, even with fewer than k candidates
        weights = torch.exp((values - top) * (1.0 / self.config.temperature)) * kept
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return torch.matmul(weights.unsqueeze(1), labels).squeeze(1)  # labels (B, L, C) or (L, C)


def _renormalised(votes: torch.Tensor) -> torch.Tensor:
    """Each (N, C) vote divided by its sum, as the DINOv3 notebook does ("should already sum
    to 1, but just in case"); a vote of sum 0 (sources that all were void) stays 0
    (docs/protocol.md#dinov3-protocol)."""
    total = votes.sum(dim=1, keepdim=True)
    return torch.where(total > 0, votes / total, votes)


def upsample_soft(soft: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, h, w) soft map -> (C, h * p, w * p), bilinear as the reference does it
    (docs/protocol.md#propagation)."""
    return F.interpolate(
        soft[None].float(),
        scale_factor=patch_size,
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )[0]


def labels_from_soft(
    soft: torch.Tensor,
    patch_size: int,
    output_size: tuple[int, int] | None = None,
    normalisation: SoftNormalisation = "norm-mask",
) -> torch.Tensor:
    """Reference post-processing: bilinear upsampling by the patch size, per-channel min-max
    normalisation of channels whose max is positive, argmax. Returns (H', W') channel indices at
    ``h * patch_size`` x ``w * patch_size`` (resize to the frame size with nearest afterwards).
    """
    up = upsample_soft(soft, patch_size)
    return normalised_argmax(up, normalisation)


def labels_from_soft_nearest(
    soft: torch.Tensor, size: tuple[int, int], normalisation: SoftNormalisation = "min-max"
) -> torch.Tensor:
    """DINOv3's post-processing (docs/protocol.md#dinov3-protocol): nearest upsampling of the
    (C, h, w) soft map straight to ``size`` (the frame's), per-channel normalisation, argmax.
    Returns (H, W) channel indices."""
    up = F.interpolate(soft[None].float(), size=tuple(size), mode="nearest")[0]
    return normalised_argmax(up, normalisation)


def normalised_argmax(up: torch.Tensor, normalisation: SoftNormalisation) -> torch.Tensor:
    """Channel indices (H, W) of upsampled (C, H, W) soft maps, normalised per channel as the
    protocol says (``norm-mask``: DINO, ``min-max``: DINOv3)."""
    if normalisation == "min-max":
        return _min_max_argmax(up)
    return _normalised_argmax(up)


def _min_max_argmax(up: torch.Tensor) -> torch.Tensor:
    """Every channel to (x - min) / (max - min), a constant channel (0 / 0) to 0, then argmax
    (DINOv3's ``postprocess_probs``, docs/protocol.md#dinov3-protocol)."""
    flat = up.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1)
    normed = torch.nan_to_num((up - low) / (high - low), nan=0.0)
    return torch.argmax(normed, dim=0)


def _normalised_argmax(up: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation of (C, H, W) maps (channels whose max is positive),
    then argmax over channels (docs/protocol.md#propagation)."""
    flat = up.flatten(1)
    low = flat.amin(dim=1)
    top = flat.amax(dim=1)
    high = top - low  # = max(x - low): rounding is monotonic
    positive = top > 0
    scaled = positive & (high > 0)
    # per channel x -> (x - sub) / div + add, computed exactly as the reference: (x - low) / high
    # where the max is positive, x where it is not; a constant positive channel divides 0 by 0
    # in the reference (NaN wins the argmax): it becomes 2 here
    sub = torch.where(positive, low, 0.0).view(-1, 1, 1)
    div = torch.where(scaled, high, 1.0).view(-1, 1, 1)
    add = torch.where(positive & (high == 0), 2.0, 0.0).view(-1, 1, 1)
    normed = up.sub_(sub).div_(div).add_(add)
    return normed.max(dim=0).indices  # the first channel wins ties, as argmax (faster on CPU)


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
    normalisation: SoftNormalisation = "norm-mask",
) -> torch.Tensor:
    """:func:`labels_from_soft` with an edge-aware upsampling: the bilinearly upsampled soft
    map is guided-filtered with ``guide`` (H', W'), the grayscale frame in [0, 1] at
    ``h * patch_size`` x ``w * patch_size``, before the same normalisation and argmax
    (docs/protocol.md#refinements). ``radius`` in pixels, None: the patch size."""
    up = upsample_soft(soft, patch_size)
    if tuple(guide.shape) != tuple(up.shape[1:]):
        raise ValueError(f"guide {tuple(guide.shape)} != upsampled map {tuple(up.shape[1:])}")
    filtered = guided_filter(guide.to(up.device), up, radius or patch_size, eps)
    return normalised_argmax(filtered, normalisation)


def soft_to_channels(
    soft: torch.Tensor,
    config: PropagationConfig,
    patch_size: int,
    size: tuple[int, int],
    image: np.ndarray | None = None,
) -> torch.Tensor:
    """The post-processing of a (C, h, w) soft map into channel indices, in one place: the
    reference's bilinear upsampling by the patch size (docs/protocol.md#propagation), the
    frame-guided one (``upsample="guided"``, ``image`` the RGB frame,
    docs/protocol.md#refinements) or nearest upsampling straight to the frame ``size``
    (DINOv3, docs/protocol.md#dinov3-protocol); then the protocol's per-channel normalisation
    and the argmax. The caller maps channels to object ids and resizes to the frame."""
    normalisation = config.rules.soft_normalisation
    if config.upsample == "guided":
        if image is None:
            raise ValueError("guided upsampling needs the frame image")
        guide = guide_image(image, (soft.shape[1] * patch_size, soft.shape[2] * patch_size))
        return labels_from_soft_guided(
            soft,
            patch_size,
            guide,
            config.guided_radius,
            config.guided_eps,
            normalisation=normalisation,
        )
    if config.upsample == "nearest":
        return labels_from_soft_nearest(soft, size, normalisation)
    return labels_from_soft(soft, patch_size, normalisation=normalisation)


def guide_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H', W') float32 grayscale guide in [0, 1] of an RGB uint8 frame, resized (area) to
    ``size`` = the upsampled soft map (docs/protocol.md#refinements)."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    resized = cv2.resize(gray, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(resized.astype(np.float32) / 255.0)
