"""The frame-feature path: background decoding, batched extraction, precision, devices."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, requires_shared_data, tiny_spec

from dino_vos.errors import InputError
from dino_vos.features import BackboneFeatures, embed_frames, prefetched
from dino_vos.predictor import VideoPropagator
from dino_vos.sources import FolderSource, Frame
from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec
from dino_vos.synthetic import make_clip

REPO = Path(__file__).resolve().parents[1]
PACKAGE = [REPO / "dino_vos", REPO / "eval", REPO / "pretrain"]  # all of dino_vos installed


@pytest.fixture(scope="module")
def clip():
    return make_clip(9, (64, 96), num_objects=2, seed=4)


def _features(weights: Path, batch_size: int, precision: str = "fp32") -> BackboneFeatures:
    return tiny_spec(weights, batch_size=batch_size, precision=precision).build()


def test_batched_features_equal_one_at_a_time(clip, tiny_weights):
    frames = [Frame(i, f"{i:05d}", image) for i, image in enumerate(clip.frames)]
    single = _features(tiny_weights, 1)
    batched = _features(tiny_weights, 4)
    assert batched.batch_size == 4 and single.batch_size == 1
    one = [single(frame) for frame in frames]
    streamed = list(embed_frames(batched, frames))
    assert [frame.index for frame, _ in streamed] == list(range(9))  # order kept, 4 + 4 + 1
    for (_, grid), expected in zip(streamed, one, strict=True):
        assert grid.shape == expected.shape and grid.dtype == torch.float32
        torch.testing.assert_close(grid, expected, rtol=1e-4, atol=1e-4)


def test_batched_propagation_gives_identical_masks(clip, tiny_weights):
    masks = {}
    for batch_size in (1, 3):
        predictor = VideoPropagator(_features(tiny_weights, batch_size), PropagationConfig())
        state = predictor.init_state(list(clip.frames))
        predictor.add_mask(state, 0, clip.masks[0])
        masks[batch_size] = np.stack([r.labels for r in predictor.propagate(state)])
    assert np.array_equal(masks[1], masks[3])


@requires_shared_data("davis2016-val-dev", "JPEGImages", "480p", "blackswan")
def test_batched_extraction_identical_masks_on_a_real_davis_sequence():
    root = SHARED_DATA / "davis2016-val-dev"
    source = FolderSource(root / "JPEGImages" / "480p" / "blackswan", limit=12)
    from dino_vos.masks import read_mask

    first = read_mask(root / "Annotations" / "480p" / "blackswan" / "00000.png")
    masks = {}
    for batch_size in (1, 4):
        spec = BackboneSpec("dino_vos_tiny", resize=ResizeSpec(240), device="cpu",
                            batch_size=batch_size)  # fmt: skip
        predictor = VideoPropagator(spec.build())
        state = predictor.init_state(source)
        predictor.add_mask(state, 0, first)
        masks[batch_size] = np.stack([r.labels for r in predictor.propagate(state)])
    assert np.array_equal(masks[1], masks[4])


def test_prefetch_runs_ahead_boundedly_and_hands_over_errors():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = prefetched(items(), depth=3)
    assert next(stream) == 0
    time.sleep(0.2)
    assert len(produced) <= 1 + 3 + 1  # the consumed one, the queue, one in hand
    stream.close()  # the consumer stops: so does the producer thread
    time.sleep(0.2)
    assert not any(t.name == "dino-vos-decoder" and t.is_alive() for t in threading.enumerate())
    assert len(produced) < 100

    def broken():
        yield 1
        raise InputError("frame 2 is not an image")

    stream = prefetched(broken(), depth=2)
    assert next(stream) == 1
    with pytest.raises(InputError, match="frame 2 is not an image"):
        next(stream)
    assert list(prefetched(iter(range(5)), depth=0)) == list(range(5))


def test_precision_choices(clip, tiny_weights):
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        _features(tiny_weights, 1, "fp16")
    fp32 = _features(tiny_weights, 1)
    bf16 = _features(tiny_weights, 1, "bf16")
    frame = Frame(0, "00000", clip.frames[0])
    a, b = fp32(frame), bf16(frame)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # autocast did run in bf16
    cosine = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cosine.mean() > 0.98


def test_no_hard_coded_device_in_the_package():
    """Tensors go where the backbone is: no .cuda() / device="cuda" literals in dino_vos."""
    offenders = []
    for path in (p for folder in PACKAGE for p in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            # torch.cuda.* (is_available, device_count) is fine; tensor.cuda() is not
            moved = isinstance(node, ast.Attribute) and node.attr == "cuda"
            if moved and not (isinstance(node.value, ast.Name) and node.value.id == "torch"):
                offenders.append(f"{path.name}:{node.lineno}")
            literal = isinstance(node, ast.keyword) and node.arg == "device"
            if literal and isinstance(node.value, ast.Constant) and node.value.value == "cuda":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
