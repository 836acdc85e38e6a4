"""DAVIS J&F for semi-supervised video object segmentation (docs/protocol.md#davis-jf).

Numbers follow the official ``davis2017-evaluation`` tool:

- J (region): |pred AND gt| / |pred OR gt| per object and frame, 1 when the union is empty.
- F (boundary): 1-pixel boundary maps (:func:`seg2bmap`), each dilated with a disk of radius
  ``ceil(0.008 * sqrt(H^2 + W^2))`` (:func:`disk`, OpenCV dilation); precision / recall of the
  matched boundary pixels with the tool's conventions for empty boundaries; F = 2PR / (P + R).
- Per object: Mean, Recall (fraction of frames > 0.5) and Decay (:func:`db_statistics`).
- Objects are ids ``1..K`` with K the largest id of the first annotation; ground-truth pixels
  labelled 255 (void) count as background, as in the official semi-supervised evaluation
  (``ignore_void=True`` excludes them from both masks instead).

Everything works on label images ((H, W) uint8 object ids), vectorised over objects.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

BOUNDARY_THRESHOLD = 0.008
VOID_LABEL = 255


@lru_cache(maxsize=16)
def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) uint8 disk: offset (i, j) is inside iff i^2 + j^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.uint8)


def boundary_radius(height: int, width: int, bound_th: float = BOUNDARY_THRESHOLD) -> int:
    """Tolerance in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        if not float(bound_th).is_integer():
            raise ValueError(f"a boundary tolerance in pixels must be an integer, got {bound_th}")
        return int(bound_th)
    return int(np.ceil(bound_th * np.linalg.norm((height, width))))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Boundary map of a binary mask (..., H, W), as the DAVIS ``seg2bmap``.

    A pixel is boundary where the mask differs from its right, bottom or bottom-right neighbour
    (outside the image counts as background); the last row compares only with the right
    neighbour, the last column only with the bottom one, and the last pixel is never boundary.
    """
    seg = np.asarray(seg, dtype=bool)
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    diagonal = np.zeros_like(seg)
    right[..., :, :-1] = seg[..., :, 1:]
    below[..., :-1, :] = seg[..., 1:, :]
    diagonal[..., :-1, :-1] = seg[..., 1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ diagonal)
    bmap[..., -1, :] = seg[..., -1, :] ^ right[..., -1, :]
    bmap[..., :, -1] = seg[..., :, -1] ^ below[..., :, -1]
    bmap[..., -1, -1] = False
    return bmap


def _boundary_matches(
    fg_boundary: np.ndarray, gt_boundary: np.ndarray, kernel: np.ndarray
) -> tuple[int, int]:
    """(fg pixels within the dilated gt boundary, gt pixels within the dilated fg boundary).

    Both maps are cropped to the bounding box of their boundary pixels first: dilation only
    ever reads boundary pixels, so the counts are those of the full frames.
    """
    either = fg_boundary | gt_boundary
    rows = np.flatnonzero(either.any(axis=1))
    cols = np.flatnonzero(either.any(axis=0))
    window = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    fg = fg_boundary[window].view(np.uint8)
    gt = gt_boundary[window].view(np.uint8)
    fg_match = cv2.countNonZero(cv2.bitwise_and(fg, cv2.dilate(gt, kernel)))
    gt_match = cv2.countNonZero(cv2.bitwise_and(gt, cv2.dilate(fg, kernel)))
    return fg_match, gt_match


def boundary_f(
    annotation: np.ndarray,
    segmentation: np.ndarray,
    void: np.ndarray | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> np.ndarray:
    """Boundary F of binary masks (..., H, W) against their annotations; returns shape (...)."""
    annotation = np.asarray(annotation, dtype=bool)
    segmentation = np.asarray(segmentation, dtype=bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape}")
    if void is not None:
        keep = ~np.broadcast_to(np.asarray(void, dtype=bool), annotation.shape)
        annotation, segmentation = annotation & keep, segmentation & keep
    height, width = annotation.shape[-2:]
    kernel = disk(boundary_radius(height, width, bound_th))
    gt_b = seg2bmap(annotation).reshape(-1, height, width)
    fg_b = seg2bmap(segmentation).reshape(-1, height, width)
    n_gt = gt_b.sum(axis=(1, 2))
    n_fg = fg_b.sum(axis=(1, 2))
    precision = np.where((n_fg > 0) & (n_gt == 0), 0.0, 1.0)
    recall = np.where((n_fg == 0) & (n_gt > 0), 0.0, 1.0)
    for index in np.flatnonzero((n_fg > 0) & (n_gt > 0)):
        fg_match, gt_match = _boundary_matches(fg_b[index], gt_b[index], kernel)
        precision[index] = fg_match / float(n_fg[index])
        recall[index] = gt_match / float(n_gt[index])
    total = precision + recall
    safe = np.where(total == 0, 1.0, total)
    f = np.where(total == 0, 0.0, 2 * precision * recall / safe)
    return f.reshape(annotation.shape[:-2])


def region_j(
    annotation: np.ndarray, segmentation: np.ndarray, void: np.ndarray | None = None
) -> np.ndarray:
    """Jaccard of binary masks (..., H, W); 1 where the union is empty; returns shape (...)."""
    annotation = np.asarray(annotation, dtype=bool)
    segmentation = np.asarray(segmentation, dtype=bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape}")
    keep = (
        np.ones(annotation.shape[-2:], dtype=bool)
        if void is None
        else ~np.broadcast_to(np.asarray(void, dtype=bool), annotation.shape)
    )
    inter = np.sum(annotation & segmentation & keep, axis=(-2, -1))
    union = np.sum((annotation | segmentation) & keep, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def frame_j(
    gt: np.ndarray, pred: np.ndarray, num_objects: int, valid: np.ndarray | None = None
) -> np.ndarray:
    """(K,) J of objects 1..K for one pair of label images (ids <= K), from a confusion matrix."""
    size = num_objects + 1
    index = gt.astype(np.intp) * size + pred
    if valid is not None:
        index = index[valid]
    counts = np.bincount(index.ravel(), minlength=size * size).reshape(size, size)
    inter = np.diagonal(counts)[1:]
    union = counts.sum(axis=1)[1:] + counts.sum(axis=0)[1:] - inter
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def frame_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    num_objects: int,
    ignore_void: bool = False,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """(J, F) of objects 1..K, each (K,), for a ground-truth / predicted label image pair.

    ``pred`` must only hold ids 0..K. Ground-truth 255 is background unless ``ignore_void``.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    void = gt == VOID_LABEL
    has_void = bool(void.any())
    if has_void:
        gt = np.where(void, 0, gt).astype(np.uint8)
    valid = ~void if (ignore_void and has_void) else None
    ids = np.arange(1, num_objects + 1, dtype=np.uint8)[:, None, None]
    j = frame_j(gt, pred, num_objects, valid)
    f = boundary_f(
        gt[None] == ids, pred[None] == ids, void if valid is not None else None, bound_th
    )
    return j, f


def score_frames(
    gt_frames: np.ndarray,
    pred_frames: np.ndarray,
    num_objects: int,
    ignore_void: bool = False,
    bound_th: float = BOUNDARY_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """(J, F), each (K, T), over T frames of label images (T, H, W)."""
    j = np.zeros((num_objects, len(gt_frames)))
    f = np.zeros((num_objects, len(gt_frames)))
    for t, (gt, pred) in enumerate(zip(gt_frames, pred_frames, strict=True)):
        j[:, t], f[:, t] = frame_scores(gt, pred, num_objects, ignore_void, bound_th)
    return j, f


def num_objects_of(first_annotation: np.ndarray) -> int:
    """K = the largest object id of the first annotation (void 255 does not count)."""
    labels = np.asarray(first_annotation)
    return int(labels[labels != VOID_LABEL].max(initial=0))


def decay_bin_edges(num_frames: int) -> np.ndarray:
    """Edges round(linspace(1, N, 5)) - 1 (halves rounded up) of the 4 shared-edge Decay bins.

    The official tool casts these edges to uint8, which wraps around beyond 256 scored frames;
    here they stay exact (identical for every DAVIS sequence).
    """
    return (np.round(np.linspace(1, num_frames, 5) + 1e-10) - 1).astype(np.int64)


def decay_bins(values: np.ndarray) -> list[np.ndarray]:
    """The 4 Decay bins of per-frame values; neighbouring bins share their edge frame."""
    edges = decay_bin_edges(len(values))
    return [values[edges[i] : edges[i + 1] + 1] for i in range(4)]


def db_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of per-frame values: Recall counts values strictly above 0.5."""
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        bins = decay_bins(values)
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


@dataclass
class ObjectScores:
    """Per-frame J and F of one object of one sequence (scored frames only)."""

    sequence: str
    object_id: int
    j: np.ndarray
    f: np.ndarray

    @property
    def name(self) -> str:
        """``<sequence>_<object id>``, the official per-sequence row name."""
        return f"{self.sequence}_{self.object_id}"

    def statistics(self) -> dict[str, float]:
        j_mean, j_recall, j_decay = db_statistics(self.j)
        f_mean, f_recall, f_decay = db_statistics(self.f)
        return {
            "J-Mean": j_mean,
            "J-Recall": j_recall,
            "J-Decay": j_decay,
            "F-Mean": f_mean,
            "F-Recall": f_recall,
            "F-Decay": f_decay,
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "sequence": self.sequence,
            "object_id": self.object_id,
            **self.statistics(),
            "J": self.j.tolist(),
            "F": self.f.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectScores:
        return cls(
            str(data["sequence"]),
            int(data["object_id"]),
            np.asarray(data["J"], dtype=np.float64),
            np.asarray(data["F"], dtype=np.float64),
        )


GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def global_statistics(objects: list[ObjectScores]) -> dict[str, float]:
    """The 7 global numbers: every statistic averaged over objects, J&F-Mean = (J + F) / 2."""
    if not objects:
        raise ValueError("no objects to average")
    rows = [obj.statistics() for obj in objects]
    means = {key: float(np.mean([row[key] for row in rows])) for key in GLOBAL_COLUMNS[1:]}
    return {"J&F-Mean": (means["J-Mean"] + means["F-Mean"]) / 2.0, **means}
