"""The windowed propagation engine against a dense reference of docs/protocol.md#propagation."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ColourFeatures

from dino_vos.dense_reference import dense_propagate, window_mask
from dino_vos.masks import ObjectIds, resize_labels
from dino_vos.predictor import VideoPropagator
from dino_vos.propagation import (
    LabelPropagator,
    PropagationConfig,
    _Geometry,
    _row_groups,
    labels_from_soft,
)
from dino_vos.sources import Frame
from dino_vos.synthetic import make_clip


def _random_case(height, width, frames, classes, dim=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(height, width, dim, generator=generator)
    keys = torch.randn(frames, height, width, dim, generator=generator)
    labels = torch.softmax(3 * torch.randn(frames, classes, height, width, generator=generator), 1)
    return target, keys, labels


@pytest.mark.parametrize(
    ("height", "width", "frames", "classes", "topk", "radius", "budget"),
    [
        (7, 9, 1, 2, 5, 2, 2_000),  # groups are pieces of a row
        (12, 17, 4, 3, 5, 3, 20_000),
        (20, 13, 3, 4, 3, None, 20_000),  # no window
        (11, 9, 3, 2, 2, 0, 20_000),  # radius 0: the same position only
        (10, 10, 8, 2, 1, 12, 20_000),  # window larger than the grid
        (16, 24, 3, 5, 10, 5, 10**7),  # one group of rows
        (5, 31, 2, 3, 5, 1, 20_000),
        (9, 9, 8, 6, 20, 4, 5_000),
        (12, 6, 2, 3, 5, 4, 20_000),  # the window spans the width but not the height
    ],
)
def test_windowed_step_matches_dense_reference(
    height, width, frames, classes, topk, radius, budget
):
    target, keys, labels = _random_case(height, width, frames, classes)
    config = PropagationConfig(topk=topk, radius=radius, max_chunk_bytes=budget)
    soft = LabelPropagator(config).soft_labels(
        F.normalize(target, dim=-1), F.normalize(keys, dim=-1), labels
    )
    expected = dense_propagate(target, keys, labels, topk=topk, radius=radius)
    torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(soft.argmax(0), expected.argmax(0))


@pytest.mark.parametrize(
    ("budget", "rows", "columns"),
    [(20_000, 1, 6), (60_000, 1, 17), (150_000, 3, 17), (32 * 2**20, 15, 17)],
)
def test_memory_budget_does_not_change_the_result(budget, rows, columns):
    """Pieces of a source row, one row, groups of rows, all rows: the same soft labels."""
    target, keys, labels = _random_case(15, 17, 3, 3)
    target, keys = F.normalize(target, dim=-1), F.normalize(keys, dim=-1)
    config = PropagationConfig(topk=5, radius=4, max_chunk_bytes=budget)
    _, groups = _row_groups(_Geometry.create(15, 17, config), 3, 10, budget)
    assert (max(g[1] for g in groups), max(g[3] for g in groups)) == (rows, columns)
    soft = LabelPropagator(config).soft_labels(target, keys, labels)
    expected = dense_propagate(target, keys, labels, topk=5, radius=4)
    torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(soft.argmax(0), expected.argmax(0))


def test_ties_with_the_kth_value_are_kept():
    """One-hot features give exactly tied similarities; all ties with the k-th must vote."""
    generator = torch.Generator().manual_seed(1)
    target = F.one_hot(torch.randint(0, 3, (9, 11), generator=generator), 5).float()
    keys = F.one_hot(torch.randint(0, 3, (3, 9, 11), generator=generator), 5).float()
    labels = torch.softmax(3 * torch.randn(3, 3, 9, 11, generator=generator), 1)
    config = PropagationConfig(topk=5, radius=3)
    soft = LabelPropagator(config).soft_labels(target, keys, labels)
    expected = dense_propagate(target, keys, labels, topk=5, radius=3)
    torch.testing.assert_close(soft, expected, atol=1e-6, rtol=1e-6)
    # Without the tie rule only 5 entries would vote: the result would differ.
    counts = F.normalize(target.flatten(0, 1), dim=1) @ F.normalize(keys.flatten(1, 2), dim=2).mT
    assert (counts == 1).sum(-1).max() > 5


def _kept_counts(target, keys, topk, radius):
    """Per target: how many in-window candidates the dense rule keeps (ties with the k-th)."""
    height, width, dim = target.shape
    sims = target.reshape(-1, dim) @ keys.reshape(len(keys), -1, dim).mT  # (M, N, N)
    inside = window_mask(height, width, radius).bool()
    sims = sims.masked_fill(~inside, -math.inf).transpose(0, 1).reshape(height * width, -1)
    kth = sims.topk(topk, dim=-1).values[:, -1:]
    return (sims >= kth).sum(-1)


@pytest.mark.parametrize("radius", [2, None])
def test_ties_of_every_length_match_dense_reference(radius):
    """One-hot features give exact ties: none, a few past the k-th, and more than any short
    list of best candidates holds; a repeated context frame doubles every tie."""
    generator = torch.Generator().manual_seed(7)
    height, width, topk = 8, 10, 4
    # category counts by region: 40 (ties rare), 8 (a few), 2 (many)
    categories = torch.tensor([40, 8, 2]).repeat_interleave(torch.tensor([4, 3, 3]))
    draw = torch.rand(4, height, width, generator=generator) * categories
    features = F.one_hot(draw.long(), 40).float()
    target, keys = features[0], torch.cat([features[1:], features[1:2]])  # frame 3 = frame 1
    labels = torch.softmax(3 * torch.randn(4, 3, height, width, generator=generator), 1)
    config = PropagationConfig(topk=topk, radius=radius, max_chunk_bytes=30_000)
    soft = LabelPropagator(config).soft_labels(target, keys, labels)
    expected = dense_propagate(target, keys, labels, topk=topk, radius=radius)
    torch.testing.assert_close(soft, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(soft.argmax(0), expected.argmax(0))
    counts = _kept_counts(target, keys, topk, radius)
    assert (counts == topk).any()  # no tie
    assert ((counts > topk) & (counts <= topk + 4)).any()  # a few tied with the k-th
    assert (counts > 4 * topk).any()  # long ties


def test_added_context_frames_vote_like_the_dense_reference():
    """Frames with known labels pushed by add_context vote as context frames."""
    target, keys, labels = _random_case(13, 18, 3, 3)
    target, keys = F.normalize(target, dim=-1), F.normalize(keys, dim=-1)
    engine = LabelPropagator(PropagationConfig(context=2, radius=4))
    engine.reset(keys[0], labels[0])
    for frame_keys, frame_labels in zip(keys[1:], labels[1:], strict=True):
        engine.add_context(frame_keys, frame_labels)
    assert engine.context_size == 3
    expected = dense_propagate(target, keys, labels, topk=5, radius=4)
    torch.testing.assert_close(engine.step(target), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        engine.add_context(keys[0], labels[0][:2])


def _dense_over(target: torch.Tensor, entries: list, **kwargs) -> torch.Tensor:
    """The dense formulation over (features, labels) context entries."""
    keys = torch.stack([features for features, _ in entries])
    labels = torch.stack([label for _, label in entries])
    return dense_propagate(target, keys, labels, **kwargs)


@pytest.mark.parametrize(("context", "frames"), [(0, 4), (2, 7), (7, 12)])
def test_context_queue_matches_reference_loop(context, frames):
    """First frame + the `context` most recent soft maps, as the reference queue."""
    height, width, classes = 11, 14, 3
    generator = torch.Generator().manual_seed(context)
    feats = torch.randn(frames, height, width, 16, generator=generator)
    first = F.one_hot(torch.randint(0, classes, (height, width), generator=generator), classes)
    first = first.permute(2, 0, 1).float()
    config = PropagationConfig(topk=4, context=context, radius=4)
    engine = LabelPropagator(config)
    engine.reset(feats[0], first)
    queue: deque = deque(maxlen=context) if context else deque(maxlen=1)
    for t in range(1, frames):
        entries = [(feats[0], first), *(queue if context else [])]
        expected = _dense_over(feats[t], entries, topk=4, radius=4)
        soft = engine.step(feats[t])
        torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-5)
        assert engine.context_size == 1 + min(t, context)
        if context:
            queue.append((feats[t], expected))


@pytest.mark.parametrize("max_references", [1, 2, 3])
def test_references_and_new_classes_match_a_dense_loop(max_references):
    """Keyframes as permanent references (oldest after the first dropped beyond the bound, the
    recent queue restarted) and label channels added mid-video: each step equals the dense
    formulation over the same set of frames."""
    height, width, classes, context = 9, 12, 2, 2
    generator = torch.Generator().manual_seed(max_references)
    feats = torch.randn(9, height, width, 16, generator=generator)
    hot = F.one_hot(torch.randint(0, classes + 1, (height, width), generator=generator), 3)
    first = hot.permute(2, 0, 1).float()[:classes]  # channel 2 (a later object) not yet known
    config = PropagationConfig(topk=4, context=context, radius=3, max_references=max_references)
    engine = LabelPropagator(config)
    engine.reset(feats[0], first)
    references, queue = [(feats[0], first)], deque(maxlen=context)
    for t in range(1, 9):
        if t in (3, 5, 7):  # keyframes; the one at 5 brings a third object
            if t == 5:
                engine.add_classes(1)
                references = [(f, F.pad(lab, (0, 0, 0, 0, 0, 1))) for f, lab in references]
                queue = deque([(f, F.pad(lab, (0, 0, 0, 0, 0, 1))) for f, lab in queue], context)
            labels = hot.permute(2, 0, 1).float()[: engine.num_classes]
            engine.add_reference(feats[t], labels)
            if len(references) < max_references:
                references.append((feats[t], labels))
            elif max_references > 1:
                references = [references[0], *references[2:], (feats[t], labels)]
            if max_references > 1:
                queue.clear()  # the recent frames start again after a keyframe
            continue
        expected = _dense_over(feats[t], [*references, *queue], topk=4, radius=3)
        soft = engine.step(feats[t])
        torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-5)
        queue.append((feats[t], expected))
        assert engine.context_size == len(references) + len(queue)


def _reference_labels(soft: torch.Tensor, patch: int) -> torch.Tensor:
    """The reference post-processing, written as in the DINO script (norm_mask loop)."""
    up = F.interpolate(soft[None], scale_factor=patch, mode="bilinear", align_corners=False)[0]
    for c in range(up.shape[0]):
        channel = up[c]
        if channel.max() > 0:
            channel = channel - channel.min()
            up[c] = channel / channel.max()
    return up.argmax(0)


def test_labels_from_soft_matches_reference_postprocessing():
    generator = torch.Generator().manual_seed(0)
    soft = torch.softmax(2 * torch.randn(4, 9, 13, generator=generator), 0)
    soft[2] = 0  # an absent object keeps its zeros
    assert torch.equal(labels_from_soft(soft, 8), _reference_labels(soft.clone(), 8))
    assert labels_from_soft(soft, 8).shape == (72, 104)


@pytest.mark.parametrize("case", ["constant", "negative", "ties", "single patch"])
def test_labels_from_soft_edge_cases_match_reference(case):
    """Constant positive channels (0 / 0 in the reference), channels without a positive value,
    equal values across channels (the first wins) and a 1 x 1 grid."""
    generator = torch.Generator().manual_seed(3)
    soft = torch.softmax(2 * torch.randn(4, 6, 7, generator=generator), 0)
    if case == "constant":
        soft[1] = 0.25
    elif case == "negative":
        soft[0] = -soft[0]
        soft[3] = 0
    elif case == "ties":
        soft = (soft * 3).round() / 3
    else:
        soft = soft[:, :1, :1].clone()
        soft[2] = 0.5
    for patch in (1, 8):
        assert torch.equal(labels_from_soft(soft, patch), _reference_labels(soft.clone(), patch))


def _jaccard(pred: np.ndarray, gt: np.ndarray, object_id: int) -> float:
    a, b = pred == object_id, gt == object_id
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_generated_clip_is_tracked_with_colour_features():
    clip = make_clip(16, (96, 144), num_objects=3, seed=5, object_ids=(2, 5, 9))
    frames = [Frame(i, f"{i:05d}", image) for i, image in enumerate(clip.frames)]
    propagator = VideoPropagator(ColourFeatures(), PropagationConfig(radius=6))
    state = propagator.init_state(frames)
    propagator.add_mask(state, 0, clip.masks[0])
    results = list(propagator.propagate(state))
    assert [r.index for r in results] == list(range(16))
    assert results[0].soft is None and np.array_equal(results[0].labels, clip.masks[0])
    scores = [
        _jaccard(r.labels, clip.masks[r.index], obj) for r in results[1:] for obj in (2, 5, 9)
    ]
    assert set(np.unique(results[-1].labels)) <= {0, 2, 5, 9}
    assert np.mean(scores) >= 0.9, np.mean(scores)


def test_first_mask_is_resized_with_pil_nearest_to_the_grid():
    mask = np.zeros((48, 80), np.uint8)
    mask[10:30, 20:50] = 4
    mask[0:5, 0:5] = 255  # void: an all-zero label vector
    labels, ids = VideoPropagator(ColourFeatures()).mask_labels(mask, (48, 80))
    assert ids == ObjectIds((0, 4))
    small = resize_labels(mask, (24, 40))
    assert labels.shape == (2, 24, 40)
    assert torch.equal(labels[1], torch.from_numpy(small == 4).float())
    assert labels[:, 0, 0].sum() == 0
