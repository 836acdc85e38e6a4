"""The stateful video predictor: init_state / add_mask / propagate / reset_state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ColourFeatures

from dino_vos.errors import InputError
from dino_vos.features import PREFETCH_FRAMES
from dino_vos.predictor import VideoPropagator
from dino_vos.sources import Frame, MemorySource
from dino_vos.spec import PropagationConfig
from dino_vos.synthetic import make_clip

CONFIG = PropagationConfig(radius=6)


@pytest.fixture(scope="module")
def clip():
    return make_clip(10, (48, 72), num_objects=2, seed=3, object_ids=(1, 4))


class CountingSource(MemorySource):
    """A memory source that counts the frames handed out."""

    def __init__(self, frames) -> None:
        super().__init__(frames)
        self.decoded = 0

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.frames:
            self.decoded += 1
            yield frame


def test_start_on_a_later_frame_equals_the_clip_cut_there(clip):
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(list(clip.frames))
    predictor.add_mask(state, 4, clip.masks[4])
    results = list(predictor.propagate(state))
    assert [r.index for r in results] == list(range(4, 10))
    assert results[0].soft is None and np.array_equal(results[0].labels, clip.masks[4])
    cut = VideoPropagator(ColourFeatures(), CONFIG)
    cut_state = cut.init_state(list(clip.frames[4:]))
    cut.add_mask(cut_state, 0, clip.masks[4])
    expected = [r.labels for r in cut.propagate(cut_state)]
    for result, labels in zip(results, expected, strict=True):
        assert np.array_equal(result.labels, labels)


def test_propagate_is_a_generator_over_the_source(clip):
    source = CountingSource(list(clip.frames))
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(source)
    predictor.add_mask(state, 0, clip.masks[0])
    stream = predictor.propagate(state)
    assert source.decoded == 0  # nothing happens before the first result is asked for
    next(stream), next(stream)
    # decoding runs ahead in a thread, by a bounded number of frames (the queue + one in hand)
    assert 2 <= source.decoded <= 2 + PREFETCH_FRAMES + 1
    assert len(list(stream)) == 8 and source.decoded == 10


def test_masks_are_checked_and_reset(clip, tmp_path: Path):
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(list(clip.frames))
    with pytest.raises(InputError, match="mask is 10x5 but frame 2 of <memory> is 72x48"):
        predictor.add_mask(state, 2, np.zeros((5, 10), np.uint8))
    with pytest.raises(InputError, match=r"frame 10 is outside the video \(10 frames"):
        predictor.add_mask(state, 10, clip.masks[0])
    with pytest.raises(InputError, match="no mask given"):
        next(predictor.propagate(state))
    ids = predictor.add_mask(state, 0, clip.masks[0])
    assert ids.ids == (0, 1, 4)
    with pytest.raises(InputError, match="frame 3 has no mask"):
        next(predictor.propagate(state, start=3))
    with pytest.raises(InputError, match="unknown direction 'sideways'"):
        next(predictor.propagate(state, direction="sideways"))
    with pytest.raises(InputError, match="reverse=True contradicts direction='both'"):
        next(predictor.propagate(state, reverse=True, direction="both"))
    with pytest.raises(InputError, match="direction 'both' covers the whole video"):
        next(predictor.propagate(state, start=0, direction="both"))
    predictor.add_mask(state, 6, clip.masks[6])
    assert sorted(state.masks) == [0, 6] and state.objects[6] == {1, 4}
    predictor.reset_state(state)
    assert state.masks == {} and state.objects == {} and state.num_frames == 10
    with pytest.raises(InputError, match="no mask given"):
        next(predictor.propagate(state))


def test_init_state_opens_paths_and_limits(clip, tmp_path: Path):
    frames_dir, _ = clip.write(tmp_path / "clip")
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(frames_dir, limit=6)
    assert state.num_frames == 6 and state.frame_size == (48, 72)
    assert predictor.init_state(list(clip.frames), limit=3).num_frames == 3


def _jaccard(pred: np.ndarray, gt: np.ndarray, object_id: int) -> float:
    a, b = pred == object_id, gt == object_id
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_an_object_that_enters_later_is_absent_before_its_keyframe(clip):
    """YouTube-VOS style: the first mask shows object 1; object 4's mask comes at frame 5 alone."""
    first = np.where(clip.masks[0] == 4, 0, clip.masks[0]).astype(np.uint8)
    entering = np.where(clip.masks[5] == 4, 4, 0).astype(np.uint8)
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(list(clip.frames))
    predictor.add_mask(state, 0, first)
    predictor.add_mask(state, 5, entering)
    results = {r.index: r for r in predictor.propagate(state)}
    assert all(4 not in np.unique(results[t].labels) for t in range(5))
    assert results[5].object_ids.ids == (0, 1, 4) and results[5].soft is None
    assert np.array_equal(results[5].labels == 4, clip.masks[5] == 4)  # the annotation, exactly
    assert _jaccard(results[5].labels, clip.masks[5], 1) > 0.8  # object 1 kept its prediction
    after = [_jaccard(results[t].labels, clip.masks[t], 4) for t in range(6, 10)]
    assert min(after) > 0.7, after  # tracked from its keyframe on (0.78-0.83; from frame 0: 0.80+)
    assert results[9].soft.shape[0] == 3


def test_a_correction_sets_its_frame_and_changes_the_frames_after_it(clip):
    predictor = VideoPropagator(ColourFeatures(), PropagationConfig(radius=2, topk=1))
    state = predictor.init_state(list(clip.frames))
    predictor.add_mask(state, 0, clip.masks[0])
    plain = {r.index: r.labels for r in predictor.propagate(state)}
    wrong = plain[4].copy()
    wrong[:, : wrong.shape[1] // 2] = 0  # the user erases objects on the left half at frame 4
    predictor.add_mask(state, 4, wrong, objects=(1, 4))  # authoritative for every object
    corrected = {r.index: r.labels for r in predictor.propagate(state)}
    assert all(np.array_equal(plain[t], corrected[t]) for t in range(4))  # before: untouched
    assert np.array_equal(corrected[4], wrong)
    left = slice(0, wrong.shape[1] // 2)
    assert any(not np.array_equal(plain[t], corrected[t]) for t in range(5, 10))
    assert sum((corrected[t][:, left] > 0).sum() for t in range(5, 10)) < sum(
        (plain[t][:, left] > 0).sum() for t in range(5, 10)
    )


def test_cli_keyframes_from_masks_and_a_sparse_folder(clip, tiny_weights, tmp_path):
    from click.testing import CliRunner

    from dino_vos.cli import main
    from dino_vos.masks import read_mask, write_indexed_png

    frames, _ = clip.write(tmp_path / "clip")
    first = np.where(clip.masks[0] == 4, 0, clip.masks[0]).astype(np.uint8)
    entering = np.where(clip.masks[5] == 4, 4, 0).astype(np.uint8)
    sparse = tmp_path / "Annotations"
    sparse.mkdir()
    write_indexed_png(sparse / "00000.png", first)
    write_indexed_png(sparse / "00005.png", entering)
    common = ["--weights", str(tiny_weights), "--short-side", "48", "--device", "cpu"]
    by_flag = ["--mask", str(sparse / "00000.png"), "--mask", f"5={sparse / '00005.png'}"]
    by_flag += ["--max-references", "2"]
    for name, given in (("flags", by_flag), ("folder", ["--masks", str(sparse)])):
        out = tmp_path / name
        result = CliRunner().invoke(
            main, ["propagate", str(frames), *given, "--out", str(out), *common]
        )
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "dino-vos.json").read_text())
        assert manifest["keyframes"] == ["00000", "00005"] and manifest["object_ids"] == [0, 1, 4]
        assert manifest["propagation"]["max_references"] == (2 if name == "flags" else 5)
        assert all(4 not in np.unique(read_mask(out / f"{t:05d}.png")) for t in range(5))
        assert np.array_equal(read_mask(out / "00005.png") == 4, entering == 4)
    bad = [
        (["--mask", f"99={sparse / '00005.png'}"], "no frame '99'"),
        (["--mask", str(sparse / "00000.png"), "--mask", f"0={sparse / '00005.png'}"],
         "two annotations for frame 0"),
        (["--masks", str(tmp_path)], "is named like a frame"),
        ([], "give the first frame's annotation"),
    ]  # fmt: skip
    for given, message in bad:
        result = CliRunner().invoke(
            main, ["propagate", str(frames), *given, "--out", str(tmp_path / "x"), *common]
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Backbone:" not in result.output


def test_backward_from_the_last_frame_is_forward_on_the_reversed_clip(clip, tmp_path: Path):
    source = CountingSource(list(clip.frames))
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(source)
    predictor.add_mask(state, 9, clip.masks[9])
    backward = list(predictor.propagate(state, direction="backward", store_dir=tmp_path))
    assert [r.index for r in backward] == list(range(9, -1, -1))
    assert source.decoded == 10  # one decoding pass; the frames are read back from the store
    assert list(tmp_path.iterdir()) == []  # and the store is gone
    mirror = VideoPropagator(ColourFeatures(), CONFIG)
    mirror_state = mirror.init_state(list(clip.frames[::-1]))
    mirror.add_mask(mirror_state, 0, clip.masks[9])
    forward = list(mirror.propagate(mirror_state))
    for result, expected in zip(backward, forward, strict=True):
        assert np.array_equal(result.labels, expected.labels)
        assert np.array_equal(result.image, expected.image)
        assert (result.soft is None) == (expected.soft is None)
        assert result.soft is None or torch.equal(result.soft, expected.soft)
    assert [r.index for r in predictor.propagate(state, reverse=True, start=9)][-1] == 0


def test_backward_applies_keyframes_in_its_own_order(clip):
    """Mirror of an object entering later: object 4 is annotated only at frame 3, so going
    backward from frame 9 it is absent from frames 9..4 and tracked from frame 3 down."""
    last = np.where(clip.masks[9] == 4, 0, clip.masks[9]).astype(np.uint8)
    entering = np.where(clip.masks[3] == 4, 4, 0).astype(np.uint8)
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(list(clip.frames))
    predictor.add_mask(state, 9, last)
    predictor.add_mask(state, 3, entering)
    results = {r.index: r for r in predictor.propagate(state, direction="backward")}
    assert sorted(results) == list(range(10))
    assert all(4 not in np.unique(results[t].labels) for t in range(4, 10))
    assert np.array_equal(results[3].labels == 4, entering == 4)
    assert min(_jaccard(results[t].labels, clip.masks[t], 4) for t in range(3)) > 0.7


def _drifting_clip(num_frames: int = 12, size: tuple[int, int] = (40, 64)):
    """A square that moves right while its colour turns from red to blue, on grey noise."""
    rng = np.random.default_rng(0)
    frames, masks = [], []
    for t in range(num_frames):
        image = np.clip(rng.normal(128, 6, (*size, 3)), 0, 255)
        mask = np.zeros(size, np.uint8)
        x, y = 6 + 3 * t, 14
        mix = t / (num_frames - 1)
        image[y : y + 12, x : x + 12] = (230 * (1 - mix) + 25 * mix, 25, 25 * (1 - mix) + 230 * mix)
        mask[y : y + 12, x : x + 12] = 1
        frames.append(image.astype(np.uint8))
        masks.append(mask)
    return frames, masks


def test_both_directions_beat_either_one_on_a_drifting_object():
    frames, masks = _drifting_clip()
    last = len(frames) - 1
    config = PropagationConfig(radius=4, context=0)
    scores = {}
    for direction in ("forward", "backward", "both"):
        predictor = VideoPropagator(ColourFeatures(), config)
        state = predictor.init_state(frames)
        predictor.add_mask(state, 0, masks[0])
        predictor.add_mask(state, last, masks[last])
        results = {r.index: r for r in predictor.propagate(state, direction=direction)}
        assert sorted(results) == list(range(len(frames)))
        assert np.array_equal(results[0].labels, masks[0])
        assert np.array_equal(results[last].labels, masks[last])
        scores[direction] = np.mean(
            [_jaccard(results[t].labels, masks[t], 1) for t in range(1, last)]
        )
    assert scores["both"] >= max(scores["forward"], scores["backward"]) + 0.05, scores


def test_both_keeps_objects_absent_before_their_first_keyframe(clip):
    first = np.where(clip.masks[2] == 4, 0, clip.masks[2]).astype(np.uint8)
    entering = np.where(clip.masks[6] == 4, 4, 0).astype(np.uint8)
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(list(clip.frames))
    predictor.add_mask(state, 2, first)
    predictor.add_mask(state, 6, entering)
    order = [r.index for r in predictor.propagate(state, direction="both")]
    assert order == [7, 8, 9, 6, 5, 4, 3, 2, 1, 0]  # final after the last keyframe, then backward
    results = {r.index: r for r in predictor.propagate(state, direction="both")}
    assert all(4 not in np.unique(results[t].labels) for t in range(6))
    assert np.array_equal(results[2].labels, first)
    assert np.array_equal(results[6].labels == 4, entering == 4)
    assert _jaccard(results[6].labels, clip.masks[6], 1) > 0.8  # object 1 kept at the keyframe
    assert min(_jaccard(results[t].labels, clip.masks[t], 1) for t in (0, 1)) > 0.7  # backward
    assert results[4].object_ids.ids == (0, 1) and results[4].soft.shape[0] == 2


def test_cli_direction_writes_every_frame_and_an_ordered_overlay(clip, tiny_weights, tmp_path):
    from click.testing import CliRunner

    from dino_vos.cli import main
    from dino_vos.masks import read_mask, write_indexed_png
    from dino_vos.sources import open_source

    frames, _ = clip.write(tmp_path / "clip")
    write_indexed_png(tmp_path / "last.png", clip.masks[9])
    write_indexed_png(tmp_path / "mid.png", clip.masks[4])
    common = ["--weights", str(tiny_weights), "--short-side", "48", "--device", "cpu"]
    runs = {
        "backward": (["--mask", f"9={tmp_path / 'last.png'}"], range(10)),
        "both": (["--mask", f"4={tmp_path / 'mid.png'}", "--mask", f"9={tmp_path / 'last.png'}"],
                 range(10)),
    }  # fmt: skip
    for direction, (given, written) in runs.items():
        out, overlay = tmp_path / direction, tmp_path / f"{direction}.mp4"
        result = CliRunner().invoke(
            main,
            ["propagate", str(frames), *given, "--direction", direction, "--out", str(out),
             "--overlay", str(overlay), *common],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "dino-vos.json").read_text())
        assert manifest["direction"] == direction and manifest["object_ids"] == [0, 1, 4]
        assert sorted(p.name for p in out.glob("*.png")) == [f"{t:05d}.png" for t in written]
        assert manifest["frames"] == len(written)
        assert np.array_equal(read_mask(out / "00009.png"), clip.masks[9])
        video = open_source(overlay)
        assert len(video) == 10
        # the overlay follows the frames' order: its first frame shows frame 0's mask
        first = next(iter(video)).image.astype(int)
        blended_0 = np.asarray(clip.frames[0], int)
        assert np.abs(first - blended_0).mean() < np.abs(first - np.asarray(clip.frames[9])).mean()
