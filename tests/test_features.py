"""dino_vos.features: the shift ensemble against an independent oracle, and the settings record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino_vos.features import BackboneFeatures, BatchExtractor, ShiftEnsembleFeatures, embed_frames
from dino_vos.sources import Frame
from dino_vos.spec import BackboneSpec, ResizeSpec
from dino_vos.synthetic import make_clip


@pytest.fixture(scope="module")
def plain(tiny_weights) -> BackboneFeatures:
    spec = BackboneSpec(weights=str(tiny_weights), resize=ResizeSpec(64), device="cpu")
    features = spec.build()
    assert type(features) is BackboneFeatures
    return features


@pytest.fixture(scope="module")
def frames() -> list[Frame]:
    clip = make_clip(2, (64, 96), num_objects=2, seed=7)
    return [Frame(i, f"{i:05d}", image) for i, image in enumerate(clip.frames)]


def _shifted_input(tensor: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Pixel (i, j) of the result is pixel (i + dy, j + dx) of the input, clamped to its edge."""
    _, height, width = tensor.shape
    rows = np.minimum(np.arange(height) + dy, height - 1)
    cols = np.minimum(np.arange(width) + dx, width - 1)
    return tensor[:, rows][:, :, cols]


def _resample_at(grid: np.ndarray, offset_y: float, offset_x: float) -> np.ndarray:
    """Values of ``grid`` (h, w, D) at positions (y - offset_y, x - offset_x) for every patch
    (y, x), bilinear, positions clamped into the grid."""
    height, width, _ = grid.shape
    out = np.empty_like(grid)
    for y in range(height):
        for x in range(width):
            sy = min(max(y - offset_y, 0.0), height - 1.0)
            sx = min(max(x - offset_x, 0.0), width - 1.0)
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            fy, fx = sy - y0, sx - x0
            out[y, x] = (
                (1 - fy) * (1 - fx) * grid[y0, x0]
                + (1 - fy) * fx * grid[y0, x1]
                + fy * (1 - fx) * grid[y1, x0]
                + fy * fx * grid[y1, x1]
            )
    return out


def _oracle(plain: BackboneFeatures, frame: Frame, n: int) -> np.ndarray:
    """The mean of n^2 explicitly shifted forwards, each mapped back onto the frame's patches."""
    p = plain.patch_size
    tensor = plain.preprocess(frame.image)
    grids = []
    for i in range(n):
        for j in range(n):
            dy, dx = round(i * p / n), round(j * p / n)
            with torch.inference_mode():
                grid = plain.backbone(_shifted_input(tensor, dy, dx)[None])[0].numpy()
            # patch (y, x) of the shifted input is centred at (y + dy/p, x + dx/p) of the frame
            grids.append(_resample_at(grid.astype(np.float64), dy / p, dx / p))
    return np.mean(grids, axis=0)


@pytest.mark.parametrize("n", [2, 3])
def test_shift_ensemble_is_the_mean_of_shifted_forwards(plain, frames, n):
    ensemble = ShiftEnsembleFeatures(plain, n)
    assert isinstance(ensemble, BatchExtractor) and ensemble.batch_size == plain.batch_size
    streamed = [grid for _, grid in embed_frames(ensemble, frames)]
    for frame, grid in zip(frames, streamed, strict=True):
        expected = _oracle(plain, frame, n)
        np.testing.assert_allclose(ensemble(frame).numpy(), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(grid.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_shift_ensemble_wraps_without_copying_its_base(plain):
    ensemble = ShiftEnsembleFeatures(plain, 2)
    assert ensemble.base is plain and ensemble.backbone is plain.backbone
    assert "precision" not in vars(ensemble)  # composition: the base keeps its own state


def test_settings_record_names_everything_that_makes_the_features(plain):
    record = plain.settings()
    assert record["settings_version"] >= 1 and record["shift_ensemble"] == 1
    assert record["backbone"] == plain.backbone.name and record["resize"] == "reference-64"
    assert record["mean"] == list(plain.mean) and record["std"] == list(plain.std)
    assert plain.settings("given")["weights_fingerprint"] == "given"
    shifted = ShiftEnsembleFeatures(plain, 3).settings()
    assert shifted == {**record, "shift_ensemble": 3}
