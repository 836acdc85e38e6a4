"""Named protocols (docs/protocol.md#protocols): ``dinov3`` against an independent, dense
implementation of the DINOv3 notebook's steps; ``dino`` unchanged; options override."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TVTF
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms import InterpolationMode

from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.cli import main
from dino_vos.masks import downsample_labels
from dino_vos.predictor import VideoPropagator
from dino_vos.propagation import LabelPropagator, normalised_argmax
from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec, resized_frame_size
from dino_vos.synthetic import make_clip
from dino_vos.transforms import frame_to_tensor

TINY16_ARCH = {
    "model": "vit_tiny_patch16_224",
    "kwargs": {"patch_size": 16, "depth": 2, "img_size": 64, "embed_dim": 48, "num_heads": 3},
}


# --- the DINOv3 notebook, written from its description: dense and simple ---------------------


def notebook_size(width: int, height: int, short_side: int, multiple: int) -> tuple[int, int]:
    """(new_height, new_width): short side rounded up to the patch, long side scaled from the
    rounded short side and rounded up (``ResizeToMultiple``)."""

    def round_up(side: float) -> int:
        return math.ceil(side / multiple) * multiple

    if width > height:
        new_height = round_up(short_side)
        return new_height, round_up(width * new_height / height)
    new_width = round_up(short_side)
    return round_up(height * new_width / width), new_width


def notebook_input(frame: np.ndarray, short_side: int, patch: int) -> torch.Tensor:
    """Resize (torchvision, PIL image, bicubic), ToTensor, ImageNet Normalize."""
    image = Image.fromarray(frame)
    size = notebook_size(*image.size, short_side, patch)
    image = TVTF.resize(image, list(size), interpolation=InterpolationMode.BICUBIC)
    tensor = TVTF.to_tensor(image)
    return TVTF.normalize(tensor, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def notebook_neighbourhood(h: int, w: int, size: float, shape: str = "circle") -> torch.Tensor:
    """(h, w, h, w) True where the distance of the two positions is <= size (Euclidean for a
    circle, Chebyshev for a square)."""
    ij = torch.stack(
        torch.meshgrid(
            torch.arange(h, dtype=torch.float32),
            torch.arange(w, dtype=torch.float32),
            indexing="ij",
        ),
        dim=-1,
    )
    order = 2 if shape == "circle" else math.inf
    norm = torch.linalg.vector_norm(ij[:, :, None, None, :] - ij[None, None], ord=order, dim=-1)
    return norm <= size


def notebook_propagate(current, context_features, context_probs, neighbourhood, topk, temperature):
    """current (h, w, D), context (t, h, w, D) and (t, h, w, M) -> (h, w, M)."""
    t, h, w, m = context_probs.shape
    dot = torch.einsum("ijd,tuvd->ijtuv", current, context_features)
    dot = torch.where(neighbourhood[:, :, None], dot, -torch.inf)
    dot = dot.flatten(2, -1).flatten(0, 1)
    kth = torch.topk(dot, dim=1, k=topk).values[:, -1:]
    dot = torch.where(dot >= kth, dot, -torch.inf)
    weights = F.softmax(dot / temperature, dim=1)
    probs = torch.mm(weights, context_probs.flatten(0, 2))
    probs = probs / probs.sum(dim=1, keepdim=True)
    return probs.unflatten(0, (h, w))


def notebook_postprocess(probs: torch.Tensor) -> torch.Tensor:
    """(1, M, H, W): per-channel min-max, NaN to 0."""
    vmin = probs.flatten(2, 3).min(dim=2).values[:, :, None, None]
    vmax = probs.flatten(2, 3).max(dim=2).values[:, :, None, None]
    return torch.nan_to_num((probs - vmin) / (vmax - vmin), nan=0)


def notebook_track(frames, first_mask, backbone, short_side, radius=12, topk=5, temperature=0.2,
                   context=7, shape="circle"):  # fmt: skip
    """Masks (T, H, W) of the notebook's loop over ``frames``."""
    patch = backbone.patch_size

    def forward(frame):
        with torch.inference_mode():
            feats = backbone(notebook_input(frame, short_side, patch)[None])[0]
        return F.normalize(feats, dim=-1, p=2)

    first_feats = forward(frames[0])
    h, w = first_feats.shape[:2]
    num_masks = int(first_mask.max()) + 1
    small = F.interpolate(
        torch.from_numpy(first_mask).long()[None, None].float(), (h, w), mode="nearest-exact"
    )[0, 0].long()
    first_probs = F.one_hot(small, num_masks).float()
    neighbourhood = notebook_neighbourhood(h, w, radius, shape)
    predictions = [first_mask]
    features_queue, probs_queue = [], []
    for frame in frames[1:]:
        current = forward(frame)
        probs = notebook_propagate(
            current,
            torch.stack([first_feats, *features_queue]),
            torch.stack([first_probs, *probs_queue]),
            neighbourhood,
            topk,
            temperature,
        )
        features_queue.append(current)
        probs_queue.append(probs)
        if len(features_queue) > context:
            features_queue.pop(0)
            probs_queue.pop(0)
        up = F.interpolate(probs.movedim(-1, -3)[None], size=first_mask.shape, mode="nearest")
        predictions.append(torch.argmax(notebook_postprocess(up)[0], dim=0).to(torch.uint8).numpy())
    return np.stack(predictions)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny16_weights(tmp_path_factory) -> Path:
    """A random-init tiny ViT with patch 16, saved as dino-vos safetensors."""
    torch.manual_seed(1)
    model = timm.create_model(TINY16_ARCH["model"], num_classes=0, **TINY16_ARCH["kwargs"])
    path = tmp_path_factory.mktemp("weights16") / "tiny16.safetensors"
    save_backbone_safetensors(model.state_dict(), path, TINY16_ARCH)
    return path


@pytest.fixture(scope="module")
def clip():
    """11 frames (the queue of 7 recent frames wraps), objects 3 and 7 (channels 0..7 in the
    notebook, 3 here)."""
    return make_clip(11, (96, 136), num_objects=2, seed=4, object_ids=(3, 7))


def run_protocol(weights: Path, clip, short_side: int, **overrides) -> np.ndarray:
    resize = ResizeSpec.for_protocol("dinov3", short_side=short_side)
    features = BackboneSpec(weights=str(weights), resize=resize, device="cpu").build()
    predictor = VideoPropagator(features, PropagationConfig.for_protocol("dinov3", **overrides))
    state = predictor.init_state(list(clip.frames))
    predictor.add_mask(state, 0, clip.masks[0])
    return np.stack([result.labels for result in predictor.propagate(state)]), features.backbone


# --- dinov3 equals the notebook ----------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "short_side", "overrides"),
    [
        ("tiny16_weights", 448, {}),  # patch 16: a 28 x 40 grid, radius 12 is a real circle
        ("tiny_weights", 224, {}),  # patch 8: the same grid
        ("tiny16_weights", 150, {"radius": 3, "topk": 7}),  # 150 -> 160: rounded up; overrides
    ],
)
def test_dinov3_protocol_equals_the_notebook(weights, short_side, overrides, clip, request):
    path = request.getfixturevalue(weights)
    ours, backbone = run_protocol(path, clip, short_side, **overrides)
    expected = notebook_track(list(clip.frames), clip.masks[0], backbone, short_side, **overrides)
    assert ours.shape == expected.shape == clip.masks.shape
    np.testing.assert_array_equal(ours, expected)
    assert set(np.unique(ours[1:])) == {0, 3, 7}  # both objects are tracked: a real test
    if overrides:  # a small circle matters: the square window gives other masks
        square = notebook_track(
            list(clip.frames), clip.masks[0], backbone, short_side, **overrides, shape="square"
        )
        assert (square != ours).any()


def test_circular_engine_matches_the_dense_notebook_step():
    """Windowed engine with the circle, every memory budget and radius, against the dense
    step; one-hot features give exact ties (kept on both sides)."""
    generator = torch.Generator().manual_seed(0)
    cases = [
        (28, 40, 4, 12, 5, 32 * 2**20),
        (20, 31, 3, 5, 5, 20_000),  # pieces of a row
        (10, 12, 2, 12, 5, 32 * 2**20),  # the square holds the grid, the circle does not
        (9, 9, 3, 1, 3, 5_000),
        (12, 17, 2, 0, 1, 20_000),  # radius 0: the same position
    ]
    for h, w, t, radius, topk, budget in cases:
        target = F.normalize(torch.randn(h, w, 16, generator=generator), dim=-1)
        keys = F.normalize(torch.randn(t, h, w, 16, generator=generator), dim=-1)
        probs = torch.rand(t, h, w, 3, generator=generator)  # not summing to 1: renormalised
        config = PropagationConfig.for_protocol(
            "dinov3", radius=radius, topk=topk, max_chunk_bytes=budget
        )
        soft = LabelPropagator(config).soft_labels(target, keys, probs.movedim(-1, 1))
        expected = notebook_propagate(
            target, keys, probs, notebook_neighbourhood(h, w, radius), topk, 0.2
        ).movedim(-1, 0)
        torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(soft.argmax(0), expected.argmax(0))
    # ties: one-hot features, every window position of the same class ties
    classes = torch.randint(0, 4, (3, 14, 15), generator=generator)
    keys = F.one_hot(classes, 4).float()
    target = keys[0]
    probs = torch.softmax(torch.randn(3, 14, 15, 2, generator=generator), -1)
    config = PropagationConfig.for_protocol("dinov3", radius=4, topk=5)
    soft = LabelPropagator(config).soft_labels(target, keys, probs.movedim(-1, 1))
    expected = notebook_propagate(target, keys, probs, notebook_neighbourhood(14, 15, 4), 5, 0.2)
    torch.testing.assert_close(soft, expected.movedim(-1, 0), atol=1e-5, rtol=1e-5)


def test_mask_downsampling_and_min_max_switches():
    """nearest-exact is torch's (PIL's nearest differs at some sizes); min-max sends a constant
    channel to 0 where DINO's norm_mask lets it win."""
    mask = np.random.default_rng(0).integers(0, 5, (480, 854)).astype(np.uint8)
    differ = 0
    for size in [(28, 41), (45, 80), (30, 54), (60, 107)]:
        small = downsample_labels(mask, size, "nearest-exact")
        exact = F.interpolate(
            torch.from_numpy(mask)[None, None].float(), size, mode="nearest-exact"
        )
        np.testing.assert_array_equal(small, exact[0, 0].long().numpy())
        differ += int((small != downsample_labels(mask, size, "pil-nearest")).sum())
    assert differ > 0
    soft = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0))
    soft[1] = 0.5  # a constant channel
    expected = torch.argmax(notebook_postprocess(soft[None])[0], dim=0)
    assert torch.equal(normalised_argmax(soft.clone(), "min-max"), expected)
    assert (expected != 1).all() and (normalised_argmax(soft.clone(), "norm-mask") == 1).all()


def test_ceil_resize_and_bicubic_frames_equal_the_notebook():
    for height, width, short, patch in [
        (480, 854, 960, 16), (480, 854, 240, 16), (854, 480, 960, 14), (100, 100, 96, 16),
        (72, 104, 61, 8), (1080, 1920, 960, 16),
    ]:  # fmt: skip
        assert resized_frame_size(height, width, short, "ceil", patch) == notebook_size(
            width, height, short, patch
        )
    frame = make_clip(1, (96, 136), seed=2).frames[0]
    size = resized_frame_size(96, 136, 112, "ceil", 16)
    ours = frame_to_tensor(frame, size, std=(0.229, 0.224, 0.225), interpolation="bicubic")
    assert torch.equal(ours, notebook_input(frame, 112, 16))


# --- dino unchanged; records; options ----------------------------------------------------


def test_dino_protocol_is_the_default_and_its_records_are_unchanged():
    assert PropagationConfig.for_protocol("dino") == PropagationConfig()
    assert ResizeSpec.for_protocol("dino") == ResizeSpec()
    assert ResizeSpec().key() == "reference-480"
    assert PropagationConfig().to_dict() == {
        "topk": 5, "context": 7, "radius": 12, "temperature": 0.1, "max_references": 5,
        "max_chunk_bytes": 32 * 2**20,
    }  # fmt: skip
    dinov3 = PropagationConfig.for_protocol("dinov3")
    assert dinov3.to_dict()["protocol"] == "dinov3" and dinov3.temperature == 0.2
    assert dinov3.upsample == "nearest" and "upsample" not in dinov3.to_dict()
    assert ResizeSpec.for_protocol("dinov3").key() == "ceil-960-bicubic-imagenet"
    with pytest.raises(ValueError, match="unknown protocol 'dinov2': use one of dino, dinov3"):
        PropagationConfig(protocol="dinov2")


def test_cli_protocol_is_recorded_and_explicit_options_override(clip_dir, tiny_weights, tmp_path):
    def run(out: Path, *extra: str) -> dict:
        args = ["propagate", str(clip_dir / "frames"), "--mask", str(clip_dir / "masks/00000.png")]
        args += ["--out", str(out), "--weights", str(tiny_weights), "--device", "cpu", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return json.loads((out / "dino-vos.json").read_text())

    dino = run(tmp_path / "dino", "--short-side", "64")
    assert "protocol" not in dino["propagation"] and dino["resize"] == "reference-64"
    v3 = run(tmp_path / "v3", "--protocol", "dinov3", "--short-side", "60", "--topk", "3")
    assert v3["resize"] == "ceil-60-bicubic-imagenet"
    assert v3["propagation"]["protocol"] == "dinov3"
    assert (v3["propagation"]["topk"], v3["propagation"]["temperature"]) == (3, 0.2)
    crw = run(tmp_path / "crw", "--protocol", "dinov3", "--short-side", "60", "--preset", "crw")
    assert (crw["propagation"]["topk"], crw["propagation"]["context"]) == (10, 20)
    assert crw["propagation"]["radius"] == 12 and crw["propagation"]["protocol"] == "dinov3"


def test_eval_davis_does_not_reuse_dino_results_for_dinov3(tiny_weights, tmp_path):
    from conftest import write_davis

    root = write_davis(tmp_path / "davis", {"alpha": (2017, 2, 5, (48, 80))})
    out = tmp_path / "out"

    def run(*extra: str) -> dict:
        args = ["eval", "davis", "--davis-root", str(root), "--weights", str(tiny_weights)]
        args += ["--short-side", "64", "--device", "cpu", "--out", str(out), *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return json.loads((out / "davis_results-val.json").read_text())

    assert run()["sequences"][0]["status"] == "propagated"
    report = run("--protocol", "dinov3")
    assert report["sequences"][0]["status"] == "propagated"  # not the dino masks
    assert report["settings"]["propagation"]["protocol"] == "dinov3"
    assert report["settings"]["propagation_protocol"] == "dinov3"
    assert report["settings"]["resize"] == "ceil-64-bicubic-imagenet"
    manifest = json.loads((out / "alpha" / "dino-vos.json").read_text())
    assert manifest["propagation"]["protocol"] == "dinov3"
    assert run("--protocol", "dinov3")["sequences"][0]["status"] == "skipped"


def test_sweep_under_dinov3_keeps_the_protocol(tiny_weights, tmp_path):
    from conftest import write_davis

    root = write_davis(tmp_path / "davis", {"alpha": (2017, 2, 5, (48, 80))})

    def run(out: Path, *extra: str) -> None:
        args = ["eval", "davis", "--davis-root", str(root), "--weights", str(tiny_weights)]
        args += ["--short-side", "64", "--device", "cpu", "--out", str(out), "--protocol"]
        result = CliRunner().invoke(main, [*args, "dinov3", *extra])
        assert result.exit_code == 0, result.output

    run(tmp_path / "sweep", "--sweep", "topk=1,3")
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["base_propagation"]["protocol"] == "dinov3"
    run(tmp_path / "plain", "--topk", "3", "--cache", str(tmp_path / "cache"))
    plain = json.loads((tmp_path / "plain" / "davis_results-val.json").read_text())
    (row,) = [row for row in sweep["rows"] if row["topk"] == 3]
    setting = json.loads(
        (tmp_path / "sweep" / "settings" / row["tag"] / "davis_results-val.json").read_text()
    )
    assert setting["settings"]["propagation"] == plain["settings"]["propagation"]
    assert setting["settings"]["resize"] == "ceil-64-bicubic-imagenet"
    assert row["J&F-Mean"] == plain["global"]["J&F-Mean"]
