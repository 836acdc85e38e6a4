"""Backward and bidirectional propagation in a bounded store (docs/protocol.md#keyframes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_vos.errors import InputError
from dino_vos.frame_store import FrameReader, FrameStore
from dino_vos.predictor import VideoPropagator
from dino_vos.sizes import format_size, parse_size
from dino_vos.sources import Frame, MemorySource, open_source
from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec
from dino_vos.synthetic import make_clip

CONFIG = PropagationConfig(radius=6)
UNLIMITED = 10**12
NUM_FRAMES = 20


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A generated 20-frame clip (objects 1 and 4) as frames/ and clip.mp4, and its masks."""
    folder = tmp_path_factory.mktemp("long")
    clip = make_clip(NUM_FRAMES, (64, 96), num_objects=2, seed=4, object_ids=(1, 4))
    frames, _ = clip.write(folder, video=folder / "clip.mp4")
    return frames, folder / "clip.mp4", clip.masks


@pytest.fixture(scope="module")
def features(tiny_weights):
    return BackboneSpec(weights=str(tiny_weights), resize=ResizeSpec(64), device="cpu").build()


def _sizes(features, source) -> tuple[int, int]:
    """Bytes of one frame's soft map (3 label channels: background, 1, 4) and features."""
    grid = features(next(iter(source)))
    return 3 * grid.shape[0] * grid.shape[1] * 4, grid.numel() * 4


def _run(features, source, keyframes, direction, budget, store_dir=None, on_result=None):
    predictor = VideoPropagator(features, CONFIG)
    state = predictor.init_state(source)
    for index, mask in keyframes.items():
        predictor.add_mask(state, index, mask)
    results = {}
    for result in predictor.propagate(
        state, direction=direction, store_dir=store_dir, store_budget=budget
    ):
        results[result.index] = result
        if on_result is not None:
            on_result()
    return results


def _assert_same(results, expected) -> None:
    assert list(results) == list(expected)  # the same frames, in the same order
    for index, result in results.items():
        assert np.array_equal(result.labels, expected[index].labels), index
        assert np.array_equal(result.image, expected[index].image), index
        assert (result.soft is None) == (expected[index].soft is None)
        assert result.soft is None or torch.equal(result.soft, expected[index].soft), index


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["folder", "video"])
def test_both_over_a_small_budget_gives_the_masks_of_an_unlimited_one(clip_files, features, kind):
    """Keyframes at the ends and one in the middle that brings object 4 in: budgets that hold
    every soft map but 3 frames' features (features computed again), and only 4 soft maps
    (the forward pass runs again per segment), give the unlimited budget's results."""
    frames, video, masks = clip_files
    source = open_source(frames if kind == "folder" else video)
    last = NUM_FRAMES - 1
    entering = np.where(masks[8] == 4, 4, 0).astype(np.uint8)
    first = np.where(masks[0] == 4, 0, masks[0]).astype(np.uint8)
    keyframes = {0: first, 8: entering, last: masks[last]}
    soft, feature = _sizes(features, source)
    expected = _run(features, source, keyframes, "both", UNLIMITED)
    assert 4 in np.unique(expected[12].labels) and 4 not in np.unique(expected[5].labels)
    for budget in ((NUM_FRAMES - 3) * soft + 3 * feature, 4 * soft):
        _assert_same(_run(features, source, keyframes, "both", budget), expected)


def test_backward_over_a_small_budget_gives_the_masks_of_an_unlimited_one(clip_files, features):
    frames, _, masks = clip_files
    source = open_source(frames)
    keyframes = {15: masks[15]}
    _, feature = _sizes(features, source)
    expected = _run(features, source, keyframes, "backward", UNLIMITED)
    assert list(expected) == list(range(15, -1, -1))
    for budget in (5 * feature, 0):
        _assert_same(_run(features, source, keyframes, "backward", budget), expected)


@pytest.mark.parametrize("direction", ["both", "backward"])
def test_the_store_stays_within_its_budget_and_holds_no_frame(
    clip_files, features, direction, tmp_path: Path
):
    frames, _, masks = clip_files
    source = open_source(frames)
    soft, feature = _sizes(features, source)
    budget = 6 * soft + 2 * feature
    keyframes = {0: masks[0], NUM_FRAMES - 1: masks[NUM_FRAMES - 1]}
    if direction == "backward":
        keyframes = {NUM_FRAMES - 1: masks[NUM_FRAMES - 1]}
    seen: list[int] = []
    largest: list[int] = []

    def measure() -> None:
        seen.append(_folder_bytes(tmp_path))
        largest.append(max((p.stat().st_size for p in tmp_path.rglob("*")), default=0))

    _run(features, source, keyframes, direction, budget, tmp_path, measure)
    assert 0 < max(seen) <= budget
    frame_bytes = 64 * 96 * 3
    assert max(largest) < frame_bytes  # never a decoded frame (only maps and features)
    assert list(tmp_path.iterdir()) == []  # and the store is gone


def test_a_budget_below_one_soft_map_is_refused(clip_files, features):
    frames, _, masks = clip_files
    keyframes = {0: masks[0], NUM_FRAMES - 1: masks[NUM_FRAMES - 1]}
    with pytest.raises(InputError, match="store_budget=100 bytes cannot hold one frame"):
        _run(features, open_source(frames), keyframes, "both", 100)


class SeekingOffByOne(MemorySource):
    """A source whose random access lands one frame late (as an inexact video seek can)."""

    def __init__(self, frames) -> None:
        super().__init__(frames)
        self.iterations = 0

    def __iter__(self) -> Iterator[Frame]:
        self.iterations += 1
        return super().__iter__()

    def read_frames(self, start: int, stop: int) -> list[np.ndarray]:
        return [f.image for f in self.frames[start + 1 : stop + 1]]


def test_a_wrong_seek_is_caught_and_read_in_order(clip_files, features):
    _, _, masks = clip_files
    clip = make_clip(NUM_FRAMES, (64, 96), num_objects=2, seed=4, object_ids=(1, 4))
    source = SeekingOffByOne(list(clip.frames))
    keyframes = {NUM_FRAMES - 1: masks[NUM_FRAMES - 1]}
    results = _run(features, source, keyframes, "backward", 0)
    expected = _run(features, MemorySource(list(clip.frames)), keyframes, "backward", 0)
    _assert_same(results, expected)
    assert source.iterations > 1  # the first pass, then the chunks read again in order


def test_reader_reads_chunks_from_the_end(clip_files):
    frames, video, _ = clip_files
    for source in (open_source(frames), open_source(video)):
        reader = FrameReader(source, NUM_FRAMES)
        for frame in source:
            reader.fingerprint(frame)
        reader.chunk = 6
        indices = [[f.index for f in chunk] for chunk in reader.backward(13)]
        assert indices == [[13, 12, 11, 10, 9, 8], [7, 6, 5, 4, 3, 2], [1, 0]]
        decoded = {f.index: f.image for f in source}
        for chunk in reader.backward(13):
            assert all(np.array_equal(f.image, decoded[f.index]) for f in chunk)


def test_store_round_trip_and_accounting(tmp_path: Path):
    with FrameStore(tmp_path, budget=90) as store:
        tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
        assert store.fits(48) and not store.fits(91)
        store.put("a", tensor)
        assert store.used == 48 and "a" in store and _folder_bytes(tmp_path) == 48
        with pytest.raises(RuntimeError, match="budget exceeded"):
            store.put("b", tensor)
        assert torch.equal(store.pop("a"), tensor) and store.used == 0 and store.peak == 48
        assert _folder_bytes(tmp_path) == 0
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("500m") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("0") == 0 and parse_size("1.5 kb") == 1500
    for bad in ("lots", "4i", "-1GB"):
        with pytest.raises(InputError, match="cannot read size"):
            parse_size(bad)
    assert format_size(4 * 10**9) == "4 GB" and format_size(12_345_678) == "12.3 MB"


def test_cli_store_budget(clip_files, tiny_weights, tmp_path: Path):
    from click.testing import CliRunner

    from dino_vos.cli import main
    from dino_vos.masks import read_mask, write_indexed_png

    frames, _, masks = clip_files
    last = NUM_FRAMES - 1
    write_indexed_png(tmp_path / "first.png", masks[0])
    write_indexed_png(tmp_path / "last.png", masks[last])
    common = [
        "propagate", str(frames), "--mask", f"0={tmp_path / 'first.png'}",
        "--mask", f"{last}={tmp_path / 'last.png'}", "--direction", "both",
        "--weights", str(tiny_weights), "--short-side", "48", "--device", "cpu",
    ]  # fmt: skip
    outputs = {}
    for budget in ("4GB", "3kB"):
        out = tmp_path / budget
        result = CliRunner().invoke(main, [*common, "--out", str(out), "--store-budget", budget])
        assert result.exit_code == 0, result.output
        outputs[budget] = {p.name: read_mask(p) for p in sorted(out.glob("*.png"))}
    assert len(outputs["4GB"]) == NUM_FRAMES
    assert all(np.array_equal(outputs["4GB"][k], outputs["3kB"][k]) for k in outputs["4GB"])
    for budget, message in (("lots", "cannot read size 'lots'"), ("10", "cannot hold one")):
        out = tmp_path / f"bad-{budget}"
        result = CliRunner().invoke(main, [*common, "--out", str(out), "--store-budget", budget])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists() or not any(out.iterdir())
