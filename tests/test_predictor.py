"""The stateful video predictor: init_state / add_mask / propagate / reset_state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_propagation import ColourFeatures

from dino_vos.errors import InputError
from dino_vos.predictor import VideoPropagator
from dino_vos.sources import Frame, MemorySource
from dino_vos.spec import PropagationConfig
from dino_vos.synthetic import make_clip

CONFIG = PropagationConfig(radius=6, tile=8)


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
    assert source.decoded == 2
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
    with pytest.raises(InputError, match="backward propagation is not supported yet"):
        next(predictor.propagate(state, reverse=True))
    predictor.add_mask(state, 6, clip.masks[6])
    with pytest.raises(InputError, match=r"masks on frames \[6\] after the start frame 0"):
        next(predictor.propagate(state))
    predictor.reset_state(state)
    assert state.masks == {} and state.num_frames == 10
    with pytest.raises(InputError, match="no mask given"):
        next(predictor.propagate(state))


def test_init_state_opens_paths_and_limits(clip, tmp_path: Path):
    frames_dir, _ = clip.write(tmp_path / "clip")
    predictor = VideoPropagator(ColourFeatures(), CONFIG)
    state = predictor.init_state(frames_dir, limit=6)
    assert state.num_frames == 6 and state.frame_size == (48, 72)
    assert predictor.init_state(list(clip.frames), limit=3).num_frames == 3
