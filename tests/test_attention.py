"""Last-block CLS attention, threshold masks and the ``dino-vos attention`` command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dino_vos.attention import (
    cls_attention,
    cls_attention_row,
    heatmap,
    last_block_input,
    mean_attention,
    threshold_attention,
)
from dino_vos.backbones import Backbone, load_backbone
from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.cli import main
from dino_vos.errors import BackboneError
from dino_vos.features import BackboneFeatures, ResizeSpec
from dino_vos.sources import read_image
from dino_vos.synthetic import make_clip

TINY = {"patch_size": 8, "depth": 2, "img_size": 64}
REGISTERS = {"reg_tokens": 4, "no_embed_class": True, "class_token": True}
NO_CLS = {"class_token": False, "global_pool": "avg", "fc_norm": False}


def tiny_backbone(seed: int = 0, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True, **{**TINY, **kwargs}
    )
    return Backbone(vit, "tiny").eval()


def images(batch: int = 2, size: tuple[int, int] = (48, 80)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def reference_attention(backbone: Backbone, batch: torch.Tensor) -> torch.Tensor:
    """Full softmax(q k^T / sqrt(d)) on the last block's norm1 input, captured by a hook."""
    captured = {}
    block = backbone.vit.blocks[-1]
    handle = block.register_forward_pre_hook(lambda _, args: captured.update(x=args[0]))
    with torch.no_grad():
        backbone(batch)
        handle.remove()
        attn = block.attn
        y = block.norm1(captured["x"])
        b, n, _ = y.shape
        qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        full = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1)
    return full


def unfused_attention(backbone: Backbone, batch: torch.Tensor) -> torch.Tensor:
    """The attention matrix timm itself computes with fusion off (captured at attn_drop)."""
    model = copy.deepcopy(backbone)
    for block in model.vit.blocks:
        block.attn.fused_attn = False
    captured = {}
    model.vit.blocks[-1].attn.attn_drop.register_forward_hook(
        lambda _, args, out: captured.update(attn=out)
    )
    with torch.no_grad():
        model(batch)
    return captured["attn"]


@pytest.mark.parametrize("kwargs", [{}, REGISTERS, {"depth": 1}], ids=["plain", "reg4", "depth1"])
def test_cls_attention_matches_explicit_reference(kwargs):
    backbone = tiny_backbone(**kwargs)
    batch = images()
    maps = cls_attention(backbone, batch)
    prefix = backbone.num_prefix_tokens
    assert prefix == 1 + kwargs.get("reg_tokens", 0)
    h, w = backbone.grid_size(*batch.shape[-2:])
    assert maps.shape == (2, backbone.num_heads, h, w)
    for full in (reference_attention(backbone, batch), unfused_attention(backbone, batch)):
        expected = full[:, :, 0, prefix:].reshape(maps.shape)
        torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, REGISTERS], ids=["plain", "reg4"])
def test_rows_sum_to_one_before_dropping_prefix(kwargs):
    backbone = tiny_backbone(**kwargs)
    batch = images()
    with torch.no_grad():
        tokens, (h, w) = last_block_input(backbone, batch)
        row = cls_attention_row(backbone, tokens)
    assert row.shape == (2, backbone.num_heads, backbone.num_prefix_tokens + h * w)
    torch.testing.assert_close(row.sum(-1), torch.ones(2, backbone.num_heads))
    maps = cls_attention(backbone, batch)
    dropped = row[:, :, : backbone.num_prefix_tokens].sum(-1)
    torch.testing.assert_close(maps.sum((-2, -1)), 1 - dropped)
    assert (dropped > 0).all()


def test_fused_attention_stays_on():
    backbone = tiny_backbone()
    before = [block.attn.fused_attn for block in backbone.vit.blocks]
    cls_attention(backbone, images())
    assert [block.attn.fused_attn for block in backbone.vit.blocks] == before
    assert timm.layers.use_fused_attn() == before[0]


def test_no_cls_token_is_a_clear_error():
    backbone = tiny_backbone(**NO_CLS)
    with pytest.raises(BackboneError, match="no CLS token"):
        cls_attention(backbone, images())


def test_mean_attention():
    maps = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(mean_attention(maps), maps.mean(1))
    assert mean_attention(maps[0]).shape == (4, 5)


def test_threshold_known_example():
    maps = torch.tensor([[0.1, 0.5], [0.15, 0.25]])  # sums to 1: sorted 0.5, 0.25, 0.15, 0.1
    assert threshold_attention(maps, 0.45).tolist() == [[False, True], [False, False]]
    assert threshold_attention(maps, 0.6).tolist() == [[False, True], [False, True]]
    assert threshold_attention(maps, 0.8).tolist() == [[False, True], [True, True]]
    assert threshold_attention(maps, 0.95).tolist() == [[True, True], [True, True]]
    assert threshold_attention(maps * 7, 0.6).tolist() == [[False, True], [False, True]]


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_threshold_keeps_mass_and_is_minimal(threshold):
    maps = torch.rand(2, 3, 6, 9, generator=torch.Generator().manual_seed(3)) ** 4
    masks = threshold_attention(maps, threshold)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    normalised = maps.double() / maps.double().sum((-2, -1), keepdim=True)
    for norm_map, mask in zip(normalised.flatten(0, 1), masks.flatten(0, 1), strict=True):
        kept = norm_map[mask]
        assert kept.sum() >= threshold - 1e-9
        assert kept.sum() - kept.min() < threshold  # dropping the smallest kept patch falls short
        if not mask.all():  # the kept patches are the largest ones
            assert kept.min() >= norm_map[~mask].max()


def test_threshold_rejects_bad_fraction():
    with pytest.raises(ValueError):
        threshold_attention(torch.rand(3, 3), 0.0)


def test_heatmap_is_colour_mapped_at_frame_size():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    heat = heatmap(values, (30, 40), "viridis")
    assert heat.shape == (30, 40, 3) and heat.dtype == np.uint8
    assert not np.array_equal(heat[0, 0], heat[-1, -1])
    assert np.array_equal(heatmap(np.ones((3, 4)), (6, 8))[0, 0], heatmap(values, (6, 8))[0, 0])


# --- command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    backbone = tiny_backbone(**REGISTERS)
    arch = {"model": "vit_tiny_patch16_224", "kwargs": {**TINY, **REGISTERS}}
    save_backbone_safetensors(backbone.vit.state_dict(), path, arch)
    return path


@pytest.fixture(scope="module")
def clip_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    frames, _ = make_clip(num_frames=4, size=(48, 64)).write(root, video=root / "clip.mp4")
    return {"folder": frames, "image": frames / "00001.jpg", "video": root / "clip.mp4"}


def run(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def backbone_args(weights: Path) -> list[str]:
    return ["--weights", str(weights), "--short-side", "48", "--resize-rule", "patch"]


@pytest.mark.parametrize("kind", ["image", "folder", "video"])
def test_cli_attention(kind, clip_paths, tiny_weights, tmp_path):
    out, overlay = tmp_path / "out", tmp_path / "overlay.mp4"
    args = ["attention", clip_paths[kind], "--out", out, "--threshold", "--save-raw"]
    args += ["--overlay", overlay, "--montage", "--batch-size", "3"]
    result = run(args + backbone_args(tiny_weights))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dino-vos.json").read_text())
    count = 1 if kind == "image" else 4
    assert manifest["frames"] == count and manifest["threshold"] == 0.6
    assert manifest["heads"] == 3 and manifest["register_tokens"] == 4
    h, w = manifest["grid"]
    assert (h, w) == (6, 8)
    name = manifest["names"][0]
    for folder in ("mean", "head0", "head2", "mask-mean", "mask-head1", "montage"):
        assert len(list((out / folder).glob("*.png"))) == count
    heat = cv2.imread(str(out / "head0" / f"{name}.png"))
    assert heat.shape == (48, 64, 3)
    mask = cv2.imread(str(out / "mask-head0" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    raw = load_file(str(out / "raw" / f"{name}.safetensors"))
    assert raw["attention"].shape == (3, h, w) and raw["masks"].shape == (3, h, w)
    assert 0.5 < raw["attention"].sum() < 3.0
    video = cv2.VideoCapture(str(overlay))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == count
    if kind == "video":
        assert video.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    video.release()
    assert not (out / ".dino-vos-partial").exists()


def test_cli_raw_maps_equal_the_api(clip_paths, tiny_weights, tmp_path):
    result = run(
        ["attention", clip_paths["image"], "--out", tmp_path, "--save-raw"]
        + backbone_args(tiny_weights)
    )
    assert result.exit_code == 0, result.output
    features = BackboneFeatures(load_backbone(None, weights=tiny_weights), ResizeSpec(48, "patch"))
    batch = features.preprocess(read_image(clip_paths["image"]))[None]
    raw = load_file(str(tmp_path / "raw" / "00001.safetensors"))["attention"]
    torch.testing.assert_close(raw, cls_attention(features.backbone, batch)[0])


def test_cli_attention_bad_inputs(clip_paths, tiny_weights, tmp_path):
    common = backbone_args(tiny_weights)
    cases = [
        (["attention", tmp_path / "missing.mp4", "--out", tmp_path / "a"], "input not found"),
        (["attention", clip_paths["folder"].parent, "--out", tmp_path / "b"], "no image frames"),
        (
            ["attention", clip_paths["image"], "--out", tmp_path / "c", "--overlay", "x.gif"],
            "must end in",
        ),
        (["attention", clip_paths["image"], "--out", tmp_path / "d", "--threshold", "1.5"], "1.5"),
        (["attention", clip_paths["image"], "--out", clip_paths["image"]], "is a file"),
    ]
    for args, message in cases:
        result = run(args + common)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_cli_attention_without_cls_token(clip_paths, tmp_path):
    path = tmp_path / "nocls.safetensors"
    kwargs = {**TINY, **NO_CLS}
    backbone = tiny_backbone(**NO_CLS)
    save_backbone_safetensors(
        backbone.vit.state_dict(), path, {"model": "vit_tiny_patch16_224", "kwargs": kwargs}
    )
    result = run(["attention", clip_paths["image"], "--out", tmp_path / "o"] + backbone_args(path))
    assert result.exit_code == 2 and "no CLS token" in result.output


def test_cli_seed_makes_random_init_reproducible(clip_paths, tmp_path):
    def raw_maps(seed: int, out: str) -> torch.Tensor:
        args = ["attention", clip_paths["image"], "--out", tmp_path / out, "--save-raw"]
        args += ["--backbone", "vit_tiny_patch16_224", "--random-init", "--seed", seed]
        args += ["--short-side", "32", "--resize-rule", "patch"]
        result = run(args)
        assert result.exit_code == 0, result.output
        return load_file(str(tmp_path / out / "raw" / "00001.safetensors"))["attention"]

    first = raw_maps(3, "a")
    assert first.shape == (3, 2, 3)
    assert torch.equal(first, raw_maps(3, "b"))
    assert not torch.equal(first, raw_maps(4, "c"))
