"""The shipped backbone (offline, by name) and ``dino-vos demo``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA, requires_shared_data

from dino_vos import backbones, hub
from dino_vos.backbones import load_backbone
from dino_vos.cli import main
from dino_vos.errors import BackboneError
from dino_vos.eval.demo import DEMO_FRAMES, DEMO_OBJECTS, DEMO_SIZE, run_demo, score_against
from dino_vos.features import BackboneFeatures, ResizeSpec
from dino_vos.masks import read_mask
from dino_vos.predictor import VideoPropagator
from dino_vos.registry import SHIPPED_BACKBONE, SHIPPED_WEIGHTS_DIR
from dino_vos.sources import Frame
from dino_vos.synthetic import make_clip

SHIPPED = SHIPPED_WEIGHTS_DIR / f"{SHIPPED_BACKBONE}.safetensors"
pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in the package")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub, "online", lambda host="huggingface.co": False)
    monkeypatch.setattr(hub, "hub_cached_file", lambda name: None)


def test_shipped_weights_load_offline_by_name_and_are_the_default(offline):
    model = load_backbone(SHIPPED_BACKBONE)
    assert model.weights_id.startswith("file:") and model.patch_size == 8
    assert SHIPPED.stat().st_size <= 12 * 2**20
    assert backbones.default_backbone_name() == SHIPPED_BACKBONE
    assert load_backbone().name == SHIPPED_BACKBONE


def _jf(model, frames, ground_truth: np.ndarray, short_side: int = 240) -> float:
    """J&F-Mean of propagating ``ground_truth[0]`` through ``frames`` at ``short_side``."""
    propagator = VideoPropagator(BackboneFeatures(model, ResizeSpec(short_side)))
    state = propagator.init_state(frames)
    propagator.add_mask(state, 0, ground_truth[0])
    predicted = np.stack([r.labels for r in propagator.propagate(state)])
    return score_against(ground_truth, predicted)[0]["J&F-Mean"]


def _clip_jf(model, clip) -> float:
    frames = [Frame(i, f"{i:05d}", image) for i, image in enumerate(clip.frames)]
    return _jf(model, frames, clip.masks, DEMO_SIZE[0])


def test_random_init_of_the_shipped_architecture(offline):
    shipped = load_backbone(SHIPPED_BACKBONE)
    random = load_backbone(SHIPPED_BACKBONE, pretrained=False)
    assert random.name == f"{SHIPPED_BACKBONE} (random init)" and random.arch == shipped.arch
    assert not torch.equal(random.vit.pos_embed, shipped.vit.pos_embed)
    with pytest.raises(BackboneError, match="random init takes no weights file"):
        load_backbone(None, weights=SHIPPED, pretrained=False)


#: Mean J&F over the two demo clips below that the shipped weights must reach. Measured: shipped
#: 0.783 (the first weights: 0.730); five random inits of the same architecture 0.656-0.680.
GENERATED_CLIP_THRESHOLD = 0.70


@pytest.mark.slow
def test_shipped_backbone_beats_random_init_on_the_generated_clip(offline):
    """On the demo's grass clips (objects close in colour to a grainy background)."""
    clips = [make_clip(DEMO_FRAMES, DEMO_SIZE, DEMO_OBJECTS, seed=s, style="grass") for s in (0, 1)]
    shipped = np.mean([_clip_jf(load_backbone(SHIPPED_BACKBONE), clip) for clip in clips])
    random_scores = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        random = load_backbone(SHIPPED_BACKBONE, pretrained=False)
        assert random.weights_id == "random"
        random_scores.append(np.mean([_clip_jf(random, clip) for clip in clips]))
    assert shipped >= GENERATED_CLIP_THRESHOLD > max(random_scores), (shipped, random_scores)


def _davis_jf(model, sequences: tuple[str, ...], frames: int = 25) -> float:
    from dino_vos.sources import FolderSource

    root = SHARED_DATA / "davis2016-val-dev"
    scores = []
    for sequence in sequences:
        source = FolderSource(root / "JPEGImages" / "480p" / sequence, limit=frames)
        annotations = root / "Annotations" / "480p" / sequence
        gt = np.stack([read_mask(annotations / f"{f.stem}.png") for f in source.files])
        scores.append(_jf(model, source, gt))
    return float(np.mean(scores))


@pytest.mark.slow
@requires_shared_data("davis2016-val-dev")
def test_shipped_backbone_beats_random_init_on_real_video(offline):
    """The same comparison on real DAVIS frames."""
    shipped = load_backbone(SHIPPED_BACKBONE)
    torch.manual_seed(0)
    random = load_backbone(SHIPPED_BACKBONE, pretrained=False)  # same architecture
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


def test_demo_checks_the_user_clip_before_loading_a_model(tmp_path, clip_dir):
    out = tmp_path / "out"
    args = ["demo", "--out", str(out), "--video", str(tmp_path / "missing.mp4")]
    result = CliRunner().invoke(main, [*args, "--mask", str(clip_dir / "masks" / "00000.png")])
    assert result.exit_code == 2
    assert "input not found" in result.output and "missing.mp4" in result.output
    assert "Backbone:" not in result.output and "Traceback" not in result.output
    assert not out.exists()
