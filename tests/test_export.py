"""Patch-feature export: the Python API, the safetensors layouts and ``dino-vos features``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dino_vos.backbones import Backbone, load_backbone
from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.cli import main
from dino_vos.errors import InputError
from dino_vos.export import (
    FeatureExporter,
    export_features,
    extract_features,
    load_features,
    read_feature_metadata,
)
from dino_vos.features import BackboneFeatures, ResizeSpec
from dino_vos.sources import open_source
from dino_vos.synthetic import make_clip

ARCH = {"patch_size": 8, "depth": 2, "img_size": 64, "reg_tokens": 2}


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **ARCH)
    return Backbone(vit, "tiny").eval()


@pytest.fixture(scope="module")
def features() -> BackboneFeatures:
    return BackboneFeatures(tiny_backbone(), ResizeSpec(48, "patch"))


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    make_clip(num_frames=5, size=(48, 64)).write(root, video=root / "clip.mp4")
    return root


def test_defaults_equal_what_propagation_uses(features, clip_root):
    source = open_source(clip_root / "frames")
    frames = list(source)
    single = extract_features(frames[:1], features)
    assert torch.equal(single.patches[1][0], features(frames[0]))  # bit for bit
    batched = extract_features(source, features, batch_size=3)
    assert batched.patches[1].shape == (5, 6, 8, 192) and batched.names == [f.name for f in frames]
    for index, frame in enumerate(frames):
        torch.testing.assert_close(batched.patches[1][index], features.extract(frame.image))


def test_layers_norm_cls_dtype_and_l2(features):
    images = make_clip(num_frames=2, size=(48, 64)).frames
    batch = torch.stack([features.preprocess(image) for image in images])
    backbone = features.backbone
    with torch.no_grad():
        (first, last), grid = backbone.forward_tokens(batch, layers=[0, 1], norm=False)
    raw = extract_features(images, features, layers=[0, -1], norm=False, batch_size=2)
    assert list(raw.patches) == [0, 1] and list(raw.cls) == [0, 1]
    torch.testing.assert_close(raw.patches[0], backbone.split_tokens(first, grid)[1])
    torch.testing.assert_close(raw.cls[1], last[:, 0])
    assert raw.metadata["layers"] == [0, 1] and raw.metadata["grid"] == [6, 8]
    small = extract_features(images, features, dtype="fp16", l2=True, batch_size=2)
    assert small.patches[1].dtype == torch.float16 and small.cls[1].shape == (2, 192)
    norms = small.patches[1].float().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0)
    expected = torch.nn.functional.normalize(features.extract(images[0]), dim=-1).half()
    torch.testing.assert_close(small.patches[1][0], expected, atol=1e-3, rtol=1e-3)


def test_bad_layers_and_dtype(features):
    with pytest.raises(InputError, match="out of range for a 2-block"):
        FeatureExporter(features, layers=[2])
    with pytest.raises(InputError, match="fp16 or fp32"):
        FeatureExporter(features, dtype="bf16")  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_export_reloads_with_shape_and_metadata(layout, features, clip_root, tmp_path):
    source = open_source(clip_root / "clip.mp4")
    exporter = FeatureExporter(features, layers=[0, -1], dtype="fp16")
    summary = export_features(source, tmp_path / "out", exporter, layout=layout, batch_size=2)
    assert summary.num_frames == 5
    manifest = json.loads((tmp_path / "out" / "dino-vos.json").read_text())
    assert manifest["layout"] == layout and manifest["frames"] == 5
    assert manifest["tensors"] == {
        "layer0": [6, 8, 192],
        "layer0.cls": [192],
        "layer1": [6, 8, 192],
        "layer1.cls": [192],
    }
    file = tmp_path / "out" / manifest["files"][0]
    metadata = read_feature_metadata(file)
    expected = {
        "grid": [6, 8],
        "patch_size": 8,
        "input_size": [48, 64],
        "frame_size": [48, 64],
        "resize": {"rule": "patch", "short_side": 48},
        "backbone": "tiny",
        "weights": "random",
        "layers": [0, 1],
        "norm": True,
        "l2": False,
        "dtype": "fp16",
    }
    assert {key: metadata[key] for key in expected} == expected
    stored = load_file(str(file))  # a valid safetensors file for any reader
    leading = (5,) if layout == "video" else ()
    assert stored["layer1"].shape == (*leading, 6, 8, 192)
    assert stored["layer1"].dtype == torch.float16
    loaded = load_features(tmp_path / "out")
    direct = extract_features(source, features, layers=[0, -1], dtype="fp16")
    for layer in (0, 1):
        torch.testing.assert_close(loaded.patches[layer], direct.patches[layer])
        torch.testing.assert_close(loaded.cls[layer], direct.cls[layer])
    part = load_features(tmp_path / "out", frames=slice(1, 3), layers=[-1])
    assert part.names == ["00001", "00002"] and list(part.patches) == [1]
    assert torch.equal(part.patches[1], loaded.patches[1][1:3])


def test_load_features_errors(tmp_path):
    with pytest.raises(InputError, match="not a finished"):
        load_features(tmp_path)


# --- command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    arch = {"model": "vit_tiny_patch16_224", "kwargs": ARCH}
    save_backbone_safetensors(tiny_backbone().vit.state_dict(), path, arch)
    return path


def run(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def backbone_args(weights: Path) -> list[str]:
    return ["--weights", str(weights), "--short-side", "48", "--resize-rule", "patch"]


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("frames/00002.jpg", []),
        ("frames", ["--layers", "0,-1", "--batch-size", "2"]),
        ("clip.mp4", ["--layout", "video", "--dtype", "fp16", "--l2", "--no-norm"]),
    ],
    ids=["image", "folder", "video"],
)
def test_cli_features(kind, extra, clip_root, tiny_weights, tmp_path):
    out = tmp_path / "out"
    result = run(["features", clip_root / kind, "--out", out, *extra, *backbone_args(tiny_weights)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dino-vos.json").read_text())
    count = 1 if kind.endswith(".jpg") else 5
    assert manifest["frames"] == count and manifest["grid"] == [6, 8]
    assert manifest["weights"].startswith("file:") and manifest["patch_size"] == 8
    loaded = load_features(out)
    last = loaded.patches[1]
    assert last.shape == (count, 6, 8, 192)
    if "--l2" in extra:
        assert last.dtype == torch.float16 and manifest["norm"] is False
        norms = last.float().norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0)
    else:  # defaults: exactly what propagation computes for the same frame
        features = BackboneFeatures(
            load_backbone(None, weights=tiny_weights), ResizeSpec(48, "patch")
        )
        frame = next(iter(open_source(clip_root / kind, allow_image=True)))
        torch.testing.assert_close(last[0], features(frame), rtol=1e-5, atol=1e-5)
        if "--batch-size" not in extra:
            assert torch.equal(last[0], features(frame))


def test_cli_features_bad_inputs(clip_root, tiny_weights, tmp_path):
    image = clip_root / "frames" / "00000.jpg"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    cases = [
        (["features", tmp_path / "nope", "--out", tmp_path / "a"], "input not found"),
        (["features", image, "--out", tmp_path / "b", "--layers", "5"], "out of range"),
        (["features", image, "--out", tmp_path / "c", "--layers", "x"], "not a block index"),
        (["features", image, "--out", tmp_path / "d", "--dtype", "int8"], "int8"),
        (["features", image, "--out", image], "is a file"),
        (["features", broken, "--out", tmp_path / "e"], "cannot decode image"),
    ]
    for args, message in cases:
        result = run(args + backbone_args(tiny_weights))
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not any((tmp_path / name).exists() for name in "abcde")


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_failed_run_leaves_no_finished_output(layout, features, tmp_path):
    folder = tmp_path / "frames"
    clip = make_clip(num_frames=3, size=(48, 64))
    clip.write(tmp_path)
    make_clip(num_frames=1, size=(64, 64)).write(tmp_path / "other")
    (tmp_path / "other" / "frames" / "00000.jpg").replace(folder / "00001.jpg")  # wrong size
    with pytest.raises(InputError, match="all frames must share one size"):
        export_features(open_source(folder), tmp_path / "out", FeatureExporter(features), layout)
    assert not (tmp_path / "out").exists()
