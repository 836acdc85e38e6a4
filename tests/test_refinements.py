"""Training-free refinements beyond the reference protocol (docs/protocol.md#refinements):
presets, guided upsampling, sub-token shift ensembling."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dino_vos.cli import main
from dino_vos.cli.options import propagation_options, with_backbone_spec
from dino_vos.features import BackboneFeatures, ShiftEnsembleFeatures, embed_frames
from dino_vos.masks import ObjectIds, resize_labels
from dino_vos.predictor import VideoPropagator
from dino_vos.propagation import (
    guide_image,
    guided_filter,
    labels_from_soft,
    labels_from_soft_guided,
)
from dino_vos.sources import Frame
from dino_vos.spec import PROPAGATION_PRESETS, BackboneSpec, PropagationConfig, ResizeSpec
from dino_vos.synthetic import make_clip
from dino_vos.writers import MANIFEST_NAME


@click.command()
@propagation_options
@with_backbone_spec(frames=True)
def show(config: PropagationConfig, spec: BackboneSpec) -> None:
    click.echo(json.dumps({**config.to_dict(), "shift_ensemble": spec.shift_ensemble}))


def _show(*args: str) -> dict:
    result = CliRunner().invoke(show, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- presets ---------------------------------------------------------------------------------


def test_dino_preset_is_the_reference_default():
    assert PropagationConfig.preset("dino") == PropagationConfig()
    assert _show() == {**PropagationConfig().to_dict(), "shift_ensemble": 1}


@pytest.mark.parametrize(
    ("name", "topk", "context", "temperature"),
    [("crw", 10, 20, 0.05), ("vfs", 10, 20, 0.07)],
)
def test_presets_set_their_values(name, topk, context, temperature):
    shown = _show("--preset", name)
    assert (shown["topk"], shown["context"], shown["temperature"]) == (topk, context, temperature)
    assert shown["radius"] == 12  # presets keep the reference window
    assert PropagationConfig.preset(name).to_dict() == {
        k: v for k, v in shown.items() if k != "shift_ensemble"
    }


def test_explicit_options_override_the_preset_even_at_their_default_value():
    shown = _show("--topk", "5", "--preset", "crw", "--temperature", "0.2")
    assert (shown["topk"], shown["context"], shown["temperature"]) == (5, 20, 0.2)
    shown = _show("--preset", "vfs", "--context", "7")
    assert (shown["topk"], shown["context"], shown["temperature"]) == (10, 7, 0.07)


def test_bad_preset_and_upsample_exit_2_with_one_line():
    for args in (["--preset", "stc"], ["--upsample", "bicubic"], ["--shift-ensemble", "0"]):
        result = CliRunner().invoke(show, args)
        assert result.exit_code == 2 and "Traceback" not in result.output
    with pytest.raises(ValueError, match="unknown preset"):
        PropagationConfig.preset("stc")
    assert set(PROPAGATION_PRESETS) == {"dino", "crw", "vfs"}


# --- guided upsampling -----------------------------------------------------------------------


def _step_case(patch: int = 8, h: int = 6, w: int = 8):
    """A soft map whose object edge falls between patch columns 3 and 4, and a guide whose
    edge lies inside patch column 3 (at pixel 29)."""
    soft = torch.zeros(2, h, w)
    soft[1, :, 4:] = 1.0
    soft[0] = 1.0 - soft[1]
    guide = torch.zeros(h * patch, w * patch)
    guide[:, 29:] = 1.0
    return soft, guide


def test_guided_upsampling_moves_labels_only_near_edges():
    soft, guide = _step_case()
    plain = labels_from_soft(soft, 8)
    guided = labels_from_soft_guided(soft, 8, guide, radius=8, eps=1e-3)
    assert guided.shape == plain.shape == (48, 64)
    changed = (guided != plain).nonzero()[:, 1]
    assert changed.numel() > 0  # the edge moved towards the image edge ...
    assert changed.min() >= 29 - 8 and changed.max() <= 32 + 8  # ... and nothing far from it
    assert (guided[:, 29:] == 1).all()  # it now follows the guide's edge


def test_guided_filter_of_a_flat_guide_is_a_box_mean_and_keeps_constants():
    src = torch.rand(3, 20, 24)
    flat = guided_filter(torch.full((20, 24), 0.5), torch.ones(3, 20, 24), 4, 1e-3)
    torch.testing.assert_close(flat, torch.ones(3, 20, 24))
    assert guided_filter(torch.rand(20, 24), src, 4, 1e-3).shape == src.shape


def test_guide_size_must_match():
    soft, guide = _step_case()
    with pytest.raises(ValueError, match="guide"):
        labels_from_soft_guided(soft, 8, guide[:-1])


class _Grid:
    patch_size = 8

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width


def test_default_labels_path_is_bit_identical_and_ignores_the_image():
    torch.manual_seed(0)
    soft = torch.rand(3, 6, 8)
    ids = ObjectIds((0, 2, 5))
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    predictor = VideoPropagator(_Grid(), PropagationConfig())  # type: ignore[arg-type]
    before = resize_labels(ids.to_ids(labels_from_soft(soft, 8).numpy()), (50, 70))
    assert np.array_equal(predictor.labels(soft, ids, (50, 70)), before)
    assert np.array_equal(predictor.labels(soft, ids, (50, 70), image), before)
    guided = VideoPropagator(_Grid(), PropagationConfig(upsample="guided"))  # type: ignore[arg-type]
    labels = guided.labels(soft, ids, (50, 70), image)
    assert labels.shape == (50, 70) and set(np.unique(labels)) <= {0, 2, 5}
    assert guide_image(image, (48, 64)).shape == (48, 64)


def test_guided_propagation_keeps_shapes_and_ids(tiny_weights):
    clip = make_clip(5, (64, 96), num_objects=2, seed=4, object_ids=(1, 4))
    features = BackboneSpec(weights=str(tiny_weights), resize=ResizeSpec(64), device="cpu").build()
    out = {}
    for mode in ("bilinear", "guided"):
        predictor = VideoPropagator(features, PropagationConfig(upsample=mode))
        state = predictor.init_state(list(clip.frames))
        predictor.add_mask(state, 0, clip.masks[0])
        out[mode] = np.stack([r.labels for r in predictor.propagate(state)])
    assert out["guided"].shape == out["bilinear"].shape == (5, 64, 96)
    assert set(np.unique(out["guided"])) <= {0, 1, 4}
    assert np.array_equal(out["guided"][0], clip.masks[0])


# --- shift ensembling ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames():
    clip = make_clip(3, (64, 96), num_objects=2, seed=4)
    return [Frame(i, f"{i:05d}", image) for i, image in enumerate(clip.frames)]


def _spec(weights, n: int, batch_size: int = 1) -> BackboneSpec:
    return BackboneSpec(weights=str(weights), resize=ResizeSpec(64), device="cpu",
                        batch_size=batch_size, shift_ensemble=n)  # fmt: skip


def test_shift_ensemble_of_one_equals_plain_features(tiny_weights, frames):
    plain = _spec(tiny_weights, 1).build()
    assert type(plain) is BackboneFeatures
    one = ShiftEnsembleFeatures(plain, 1)
    assert one.shifts() == [(0, 0)]
    for frame in frames:
        assert torch.equal(one(frame), plain(frame))


def test_shift_ensemble_of_two_keeps_the_grid_and_differs(tiny_weights, frames):
    plain = _spec(tiny_weights, 1).build()
    two = _spec(tiny_weights, 2, batch_size=2).build()
    assert isinstance(two, ShiftEnsembleFeatures) and two.shift_ensemble == 2
    p = two.patch_size
    assert two.shifts() == [(0, 0), (0, p // 2), (p // 2, 0), (p // 2, p // 2)]
    streamed = [grid for _, grid in embed_frames(two, frames)]  # batched path
    for frame, grid in zip(frames, streamed, strict=True):
        expected = plain(frame)
        assert grid.shape == expected.shape and grid.dtype == torch.float32
        assert not torch.allclose(grid, expected, atol=1e-3)
        torch.testing.assert_close(grid, two(frame), rtol=1e-4, atol=1e-4)  # batch = single


def test_shift_back_is_a_half_patch_average():
    from dino_vos.features import _shift_back

    grid = torch.arange(4.0).view(1, 4, 1, 1)
    assert _shift_back(grid, 0.5, dim=1).flatten().tolist() == [0.0, 0.5, 1.5, 2.5]
    assert torch.equal(_shift_back(grid, 0.0, dim=1), grid)


# --- manifests -------------------------------------------------------------------------------


def test_propagate_manifest_records_the_options(clip_dir, tiny_weights, tmp_path):
    out = tmp_path / "out"
    args = ["propagate", clip_dir / "frames", "--mask", clip_dir / "masks" / "00000.png",
            "--out", out, "--weights", tiny_weights, "--short-side", "64", "--device", "cpu",
            "--max-frames", "4", "--preset", "vfs", "--topk", "3", "--upsample", "guided",
            "--shift-ensemble", "2"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    text = json.dumps(manifest)
    assert '"upsample": "guided"' in text and '"shift_ensemble": 2' in text
    assert '"topk": 3' in text and '"context": 20' in text and '"temperature": 0.07' in text
