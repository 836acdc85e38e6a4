"""Known-answer tests of the DAVIS J&F metric and its statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dino_vos.eval.davis_metrics import (
    ObjectScores,
    boundary_f,
    boundary_radius,
    db_statistics,
    decay_bin_edges,
    decay_bins,
    disk,
    frame_scores,
    global_statistics,
    num_objects_of,
    region_j,
    score_frames,
    seg2bmap,
)


def square(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


# --- an independent, loop-based version of the definitions (docs/protocol.md#davis-jf) ---


def naive_bmap(seg: np.ndarray) -> np.ndarray:
    height, width = seg.shape
    out = np.zeros_like(seg, dtype=bool)
    for y in range(height):
        for x in range(width):
            value = seg[y, x]
            right = seg[y, x + 1] if x + 1 < width else False
            below = seg[y + 1, x] if y + 1 < height else False
            diag = seg[y + 1, x + 1] if (x + 1 < width and y + 1 < height) else False
            if y == height - 1 and x == width - 1:
                out[y, x] = False
            elif x == width - 1:
                out[y, x] = value != below
            elif y == height - 1:
                out[y, x] = value != right
            else:
                out[y, x] = value != right or value != below or value != diag
    return out


def naive_f(gt: np.ndarray, pred: np.ndarray) -> float:
    height, width = gt.shape
    radius = math.ceil(0.008 * math.hypot(height, width))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    structure = yy**2 + xx**2 <= radius**2
    gt_b, pred_b = naive_bmap(gt), naive_bmap(pred)
    n_gt, n_pred = gt_b.sum(), pred_b.sum()
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # (P, R) = (1, 0) or (0, 1)
    precision = (pred_b & ndimage.binary_dilation(gt_b, structure)).sum() / n_pred
    recall = (gt_b & ndimage.binary_dilation(pred_b, structure)).sum() / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def random_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if rng.random() < 0.2:
        return rng.random(shape) < 0.3  # speckle: many tiny boundaries
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(0, 4)):
        cy, cx = rng.integers(-4, shape[0] + 4), rng.integers(-4, shape[1] + 4)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(1, 15) ** 2
    return mask


def test_matches_naive_definition_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(4, 48, 2))
        gt, pred = random_mask(rng, shape), random_mask(rng, shape)
        assert np.array_equal(seg2bmap(gt), naive_bmap(gt))
        assert boundary_f(gt, pred) == pytest.approx(naive_f(gt, pred), abs=1e-12)
        union = (gt | pred).sum()
        expected_j = 1.0 if union == 0 else (gt & pred).sum() / union
        assert region_j(gt, pred) == pytest.approx(expected_j, abs=1e-12)


# --- hand-computed cases -----------------------------------------------------------------------


def test_boundary_radius_and_disk():
    assert boundary_radius(480, 854) == 8
    assert boundary_radius(100, 100) == 2  # ceil(0.008 * 141.4)
    assert boundary_radius(60, 80) == 1  # ceil(0.8)
    assert boundary_radius(60, 80, bound_th=3) == 3
    kernel = disk(8)
    assert kernel.shape == (17, 17)
    assert kernel.sum() == 197  # lattice points with i^2 + j^2 <= 64
    assert kernel[8, 0] == kernel[0, 8] == 1 and kernel[0, 0] == 0
    assert np.array_equal(disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def test_seg2bmap_square_and_image_borders():
    # a 10x10 square: an outer L above/left (11 + 10) and an inner L right/below (10 + 9)
    assert seg2bmap(square((60, 80), 20, 20, 10)).sum() == 40
    # the right half of the image: only the column left of it; the image border is no boundary
    right_half = np.zeros((100, 100), dtype=bool)
    right_half[:, 50:] = True
    bmap = seg2bmap(right_half)
    assert bmap.sum() == 100 and bmap[:, 49].all()
    bottom_half = np.zeros((100, 100), dtype=bool)
    bottom_half[50:] = True
    assert seg2bmap(bottom_half).sum() == 100 and seg2bmap(bottom_half)[49].all()
    assert seg2bmap(np.ones((30, 40), dtype=bool)).sum() == 0


def test_identical_empty_and_both_empty():
    gt = square((480, 854), 100, 200, 50)
    empty = np.zeros_like(gt)
    assert region_j(gt, gt) == 1.0 and boundary_f(gt, gt) == 1.0
    assert region_j(gt, empty) == 0.0 and boundary_f(gt, empty) == 0.0  # empty prediction
    assert region_j(empty, gt) == 0.0 and boundary_f(empty, gt) == 0.0  # empty ground truth
    assert region_j(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0  # both empty


def test_shifted_square_within_tolerance():
    gt = square((480, 854), 100, 200, 10)
    pred = square((480, 854), 100, 203, 10)  # 3 px right: J = 70 / 130, boundaries within 8 px
    assert region_j(gt, pred) == pytest.approx(7 / 13)
    assert boundary_f(gt, pred) == 1.0


def test_thin_line_shifted_beyond_tolerance():
    gt = np.zeros((100, 100), dtype=bool)
    gt[50, 10:90] = True
    pred = np.roll(gt, 3, axis=0)
    # boundaries: rows 49-50 and 52-53 (162 px each); radius 2 matches rows 50 and 52 only
    assert seg2bmap(gt).sum() == 162
    assert region_j(gt, pred) == 0.0
    assert boundary_f(gt, pred) == pytest.approx(0.5)


def test_full_frame_object_has_no_boundary():
    full = np.ones((40, 60), dtype=bool)
    assert boundary_f(full, full) == 1.0
    assert boundary_f(full, np.zeros_like(full)) == 1.0  # neither has boundary pixels: P = R = 1
    assert region_j(full, np.zeros_like(full)) == 0.0


def test_void_pixels_excluded_when_given():
    gt = square((50, 50), 10, 10, 20)
    pred = square((50, 50), 10, 10, 20) | square((50, 50), 35, 35, 5)
    void = square((50, 50), 34, 34, 8)
    assert region_j(gt, pred) == pytest.approx(400 / 425)
    assert region_j(gt, pred, void) == 1.0
    assert boundary_f(gt, pred, void) == 1.0
    assert boundary_f(gt, pred) < 1.0


# --- label images, objects and statistics -------------------------------------------------------


def test_frame_scores_on_label_images():
    gt = np.zeros((48, 64), dtype=np.uint8)
    gt[5:20, 5:20] = 1
    gt[25:40, 30:50] = 2
    pred = np.zeros_like(gt)
    pred[5:20, 8:23] = 1  # object 2 missing from the prediction: scored as empty
    j, f = frame_scores(gt, pred, 2)
    assert j[0] == pytest.approx(region_j(gt == 1, pred == 1))
    assert f[0] == pytest.approx(boundary_f(gt == 1, pred == 1))
    assert j[1] == 0.0 and f[1] == 0.0


def test_void_label_is_background_unless_ignored():
    gt = np.zeros((40, 40), dtype=np.uint8)
    gt[5:15, 5:15] = 1
    gt[20:30, 20:30] = 255
    pred = gt.copy()
    pred[20:30, 20:30] = 1  # predicts object 1 on the void region
    j, _ = frame_scores(gt, pred, 1)
    assert j[0] == pytest.approx(100 / 200)  # the official tool: void counts as background
    j_ignored, f_ignored = frame_scores(gt, pred, 1, ignore_void=True)
    assert j_ignored[0] == 1.0 and f_ignored[0] == 1.0
    assert num_objects_of(gt) == 1


def test_score_frames_shapes():
    gt = np.zeros((3, 20, 20), dtype=np.uint8)
    gt[:, 2:8, 2:8] = 3
    j, f = score_frames(gt, gt, 3)
    assert j.shape == f.shape == (3, 3)
    assert np.all(j == 1) and np.all(f == 1)  # objects 1 and 2 are absent in both: 1


@pytest.mark.parametrize(
    ("num_frames", "edges"),
    [
        (3, [0, 1, 1, 2, 2]),
        (4, [0, 1, 2, 2, 3]),  # 2.5 rounds up (banker's rounding would give 1)
        (6, [0, 1, 3, 4, 5]),
        (10, [0, 2, 5, 7, 9]),
    ],
)
def test_decay_bin_edges(num_frames, edges):
    assert decay_bin_edges(num_frames).tolist() == edges


def test_decay_bins_share_edges_and_decay_value():
    values = np.arange(10, dtype=float)
    bins = decay_bins(values)
    assert [b.tolist() for b in bins] == [[0, 1, 2], [2, 3, 4, 5], [5, 6, 7], [7, 8, 9]]
    _, _, decay = db_statistics(values)
    assert decay == pytest.approx(1.0 - 8.0)


def test_recall_is_strictly_above_half():
    mean, recall, _ = db_statistics(np.array([0.5, 0.5, 0.51, 0.2]))
    assert recall == 0.25
    assert mean == pytest.approx(0.4275)


def test_global_statistics_average_objects():
    a = ObjectScores("a", 1, np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.5, 0.5]))
    b = ObjectScores("b", 1, np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0]))
    stats = global_statistics([a, b])
    assert stats["J-Mean"] == 0.5 and stats["F-Mean"] == 0.75
    assert stats["J&F-Mean"] == 0.625
    assert stats["J-Recall"] == 0.5 and stats["F-Recall"] == 0.5  # 0.5 is not > 0.5
    assert a.name == "a_1"
    assert ObjectScores.from_dict(a.to_dict()).statistics() == a.statistics()
