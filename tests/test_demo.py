"""The shipped backbone (offline, by name) and ``dino-vos demo``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA, requires_shared_data

from dino_vos import backbones
from dino_vos.backbones import SHIPPED_BACKBONE, SHIPPED_WEIGHTS_DIR, load_backbone
from dino_vos.cli import main
from dino_vos.demo import run_demo, score_against
from dino_vos.features import BackboneFeatures, ResizeSpec
from dino_vos.masks import read_mask

SHIPPED = SHIPPED_WEIGHTS_DIR / f"{SHIPPED_BACKBONE}.safetensors"
pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in the package")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(backbones, "_online", lambda host="huggingface.co": False)
    monkeypatch.setattr(backbones, "_hub_cached_file", lambda name: None)


def test_shipped_weights_load_offline_by_name_and_are_the_default(offline):
    model = load_backbone(SHIPPED_BACKBONE)
    assert model.weights_id.startswith("file:") and model.patch_size == 8
    assert SHIPPED.stat().st_size <= 12 * 2**20
    assert backbones.default_backbone_name() == SHIPPED_BACKBONE
    assert load_backbone().name == SHIPPED_BACKBONE


def _davis_jf(model, sequences: tuple[str, ...], frames: int = 25) -> float:
    from dino_vos.pipeline import VideoPropagator
    from dino_vos.sources import FolderSource

    root = SHARED_DATA / "davis2016-val-dev"
    scores = []
    for sequence in sequences:
        source = FolderSource(root / "JPEGImages" / "480p" / sequence, limit=frames)
        gt = np.stack(
            [
                read_mask(root / "Annotations" / "480p" / sequence / f"{f.stem}.png")
                for f in source.files
            ]
        )
        propagator = VideoPropagator(BackboneFeatures(model, ResizeSpec(240)))
        predicted = np.stack([r.labels for r in propagator.propagate(source, gt[0])])
        scores.append(score_against(gt, predicted, sequence)[0]["J&F-Mean"])
    return float(np.mean(scores))


@requires_shared_data("davis2016-val-dev")
def test_shipped_backbone_beats_random_init_on_real_video(offline):
    """Measured on DAVIS frames: the generated clips are easy for random features as well."""
    shipped = load_backbone(SHIPPED_BACKBONE)
    torch.manual_seed(0)
    random = load_backbone(None, weights=SHIPPED)
    random.vit.init_weights()  # the same architecture, re-initialised
    sequences = ("blackswan", "cows", "dog")
    trained_jf, random_jf = _davis_jf(shipped, sequences), _davis_jf(random, sequences)
    assert trained_jf > random_jf + 0.02, (trained_jf, random_jf)


def test_demo_end_to_end(tmp_path, offline):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Backbone: {SHIPPED_BACKBONE}" in result.output
    assert "J&F on the generated clip" in result.output
    assert len(list((out / "masks").glob("*.png"))) == 24
    assert (out / "overlay.mp4").stat().st_size > 0
    assert (out / "clip" / "masks" / "00000.png").is_file()


def test_demo_on_a_user_clip_has_no_score(tmp_path, clip_dir, offline):
    out = tmp_path / "own"
    args = [
        "demo",
        "--out",
        str(out),
        "--video",
        str(clip_dir / "clip.mp4"),
        "--mask",
        str(clip_dir / "masks" / "00000.png"),
        "--short-side",
        "64",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "J&F" not in result.output
    assert sorted(p.name for p in (out / "masks").glob("*.png"))[-1] == "00005.png"
    assert set(np.unique(read_mask(out / "masks" / "00005.png")).tolist()) <= {0, 3, 7}


def test_demo_needs_video_and_mask_together(tmp_path, clip_dir):
    result = CliRunner().invoke(
        main, ["demo", "--out", str(tmp_path), "--video", str(clip_dir / "clip.mp4")]
    )
    assert result.exit_code == 2 and "--video and --mask together" in result.output


def test_run_demo_scores_the_generated_clip(tmp_path, offline):
    features = BackboneFeatures(load_backbone(SHIPPED_BACKBONE), ResizeSpec(240))
    result = run_demo(tmp_path / "api", features)
    assert result.scores is not None and 0 <= result.scores["J&F-Mean"] <= 1
    assert set(result.per_object) == {1, 2, 3, 4}
