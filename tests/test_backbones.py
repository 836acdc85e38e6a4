"""Backbones: position embeddings, weights loading in every supported format, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_ARCH, make_tiny_vit
from pytest import fixture, raises

from dino_vos import hub
from dino_vos.backbones import Backbone, infer_arch, load_backbone
from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.errors import BackboneError, PartialWeightsWarning


@fixture
def tiny_backbone() -> Backbone:
    vit = timm.create_model(
        TINY_ARCH["model"], num_classes=0, dynamic_img_size=True, **TINY_ARCH["kwargs"]
    )
    torch.nn.init.normal_(vit.pos_embed, std=1.0)  # make interpolation differences visible
    return Backbone(vit, "tiny").eval()


def _added_pos(backbone: Backbone, height: int, width: int) -> torch.Tensor:
    """Position embeddings the backbone adds to the patch tokens for an input size."""
    images = torch.zeros(1, 3, height, width)
    tokens, _ = backbone.prepare_tokens(images)
    patches = backbone.vit.patch_embed(images).flatten(1, 2)
    return tokens[:, 1:] - patches


def test_reference_pos_embed_follows_the_dino_formula(tiny_backbone):
    stored = tiny_backbone.vit.pos_embed[:, 1:]  # 8 x 8 grid (64 px, patch 8)
    h, w = 6, 13
    expected = F.interpolate(
        stored.reshape(1, 8, 8, -1).permute(0, 3, 1, 2),
        scale_factor=((h + 0.1) / 8, (w + 0.1) / 8),
        mode="bicubic",
        align_corners=False,
    )
    expected = expected.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    ours = _added_pos(tiny_backbone, h * 8, w * 8)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # CLS position embedding is untouched
    tokens, _ = tiny_backbone.prepare_tokens(torch.zeros(1, 3, h * 8, w * 8))
    expected_cls = tiny_backbone.vit.cls_token[0] + tiny_backbone.vit.pos_embed[0, :1]
    torch.testing.assert_close(tokens[0, :1], expected_cls)


def test_timm_dynamic_resize_differs_from_the_reference(tiny_backbone):
    reference = _added_pos(tiny_backbone, 48, 104)
    tiny_backbone.pos_embed_mode = "timm"
    timm_pos = _added_pos(tiny_backbone, 48, 104)
    assert reference.shape == timm_pos.shape
    assert (reference - timm_pos).abs().max() > 1e-3


def test_stored_square_grid_is_not_resized(tiny_backbone):
    torch.testing.assert_close(
        _added_pos(tiny_backbone, 64, 64), tiny_backbone.vit.pos_embed[:, 1:]
    )


def _small_vit(**overrides):
    """A random timm ViT: patch 8, 32-d, 2 heads, 32 px stored grid (4 x 4)."""
    kwargs = dict(patch_size=8, depth=1, img_size=32, embed_dim=32, num_heads=2, num_classes=0)
    return timm.create_model(
        "vit_tiny_patch16_224", dynamic_img_size=True, **{**kwargs, **overrides}
    ).eval()


def test_patch_features_shape_and_register_tokens():
    vit = _small_vit(reg_tokens=4, no_embed_class=True)
    backbone = Backbone(vit, "reg").eval()
    assert backbone.num_prefix_tokens == 5
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 40, 56))
        (tokens,), grid = backbone.forward_tokens(torch.randn(2, 3, 40, 56))
    assert features.shape == (2, 5, 7, 32)
    assert tokens.shape == (2, 5 + 35, 32) and grid == (5, 7)


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_patch_features_equal_timms_own_forward_at_the_stored_grid(reg_tokens):
    """An independent computation: timm's forward_features, where no resize is involved."""
    vit = _small_vit(depth=2, reg_tokens=reg_tokens)
    backbone = Backbone(vit, "tiny").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = backbone(images)
        tokens = vit.forward_features(images)  # final norm included
    expected = tokens[:, vit.num_prefix_tokens :].reshape(2, 4, 4, 32)
    torch.testing.assert_close(ours, expected)


def _official_checkpoint(path, teacher, student):
    def wrap(model, prefix):
        state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
        state[f"{prefix}head.last_layer.weight_g"] = torch.ones(10, 1)
        return state

    torch.save(
        {
            "teacher": wrap(teacher, "backbone."),
            "student": wrap(student, "module.backbone."),
            "epoch": 3,
        },
        path,
    )


def test_official_training_checkpoint_teacher_and_student(tmp_path):
    teacher, student = make_tiny_vit(1), make_tiny_vit(2)
    path = tmp_path / "checkpoint.pth"
    _official_checkpoint(path, teacher, student)
    loaded = load_backbone(None, weights=path)
    assert torch.equal(loaded.vit.blocks[1].mlp.fc2.weight, teacher.blocks[1].mlp.fc2.weight)
    assert loaded.patch_size == 8 and loaded.depth == 2 and loaded.embed_dim == 48
    as_student = load_backbone(None, weights=path, checkpoint_key="student")
    assert torch.equal(as_student.vit.pos_embed, student.pos_embed)


def _main_dino_checkpoint(path, teacher, student, **args_overrides):
    """A checkpoint laid out as DINO's ``main_dino.py`` saves it: the student under DDP
    (``module.``), both wrapped with the projection head, the AdamW state, the epoch, the run's
    ``args`` (an ``argparse.Namespace``), the loss centre and the fp16 scaler state."""
    import argparse

    def wrapped(model, prefix):
        state = {f"{prefix}backbone.{k}": v for k, v in model.state_dict().items()}
        head = {"mlp.0.weight": torch.randn(16, 128), "mlp.0.bias": torch.zeros(16)}
        head |= {
            "last_layer.weight_g": torch.ones(10, 1),
            "last_layer.weight_v": torch.ones(10, 16),
        }
        return state | {f"{prefix}head.{k}": v for k, v in head.items()}

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student(torch.zeros(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(
        arch="vit_small", patch_size=8, out_dim=65536, norm_last_layer=True,
        momentum_teacher=0.996, use_bn_in_head=False, warmup_teacher_temp=0.04,
        global_crops_scale=(0.4, 1.0), local_crops_number=8, data_path="/path/to/imagenet",
        output_dir=".", saveckp_freq=20, seed=0, num_workers=10, dist_url="env://",
        local_rank=0, rank=0, world_size=8, gpu=0,
    )  # fmt: skip
    vars(args).update(args_overrides)
    save_dict = {
        "student": wrapped(student, "module."),
        "teacher": wrapped(teacher, ""),
        "optimizer": optimizer.state_dict(),
        "epoch": 100,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 65536)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 0},
    }  # fmt: skip
    torch.save(save_dict, path)


def test_main_dino_training_checkpoint_loads_safely(tmp_path):
    # a width outside the standard ViT sizes (and so not that of args.arch): one head per 64
    # channels, as in every DINO ViT
    def dino_like_vit(seed):
        torch.manual_seed(seed)
        kwargs = dict(patch_size=8, depth=2, img_size=64, embed_dim=128, num_heads=2)
        return timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)

    teacher, student = dino_like_vit(1), dino_like_vit(2)
    path = tmp_path / "checkpoint0100.pth"
    _main_dino_checkpoint(path, teacher, student)
    images = torch.randn(2, 3, 64, 64)
    for key, network in (("teacher", teacher), ("student", student)):
        loaded = load_backbone(None, weights=path, checkpoint_key=key)
        assert loaded.depth == 2 and loaded.patch_size == 8  # inferred from the weights
        with torch.no_grad():  # the original network's own forward, in its own layout
            direct = network.eval().forward_features(images)[:, 1:].reshape(2, 8, 8, 128)
            torch.testing.assert_close(loaded(images), direct)
        assert loaded.source.startswith(f"DINO training checkpoint ({key}), dropped head")
    # a missing key is named in one line, and --allow-partial loads the rest
    teacher_state = {k: v for k, v in teacher.state_dict().items() if k != "norm.bias"}
    partial = tmp_path / "partial.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher_state.items()}}, partial)
    with raises(BackboneError, match=r"missing norm\.bias\).*allow_partial=True"):
        load_backbone(None, weights=partial)
    with pytest.warns(PartialWeightsWarning, match="1 missing key, left random: norm.bias"):
        load_backbone(None, weights=partial, allow_partial=True)
    # only argparse.Namespace is let through: any other object is still refused by name
    import pathlib

    _main_dino_checkpoint(path, teacher, student, output_dir=pathlib.PurePosixPath("/runs/dino"))
    with raises(BackboneError, match="needs the Python object pathlib.PurePosixPath"):
        load_backbone(None, weights=path)


def test_bare_state_dict_with_named_and_inferred_architecture(tmp_path):
    """A released DINO backbone (dino_deitsmall16_pretrain.pth): a bare state dict, no head."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    path = tmp_path / "dino_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone("vit_tiny_patch16_224", weights=path)
    assert torch.equal(loaded.vit.cls_token, model.cls_token)
    assert infer_arch(model.state_dict())["kwargs"]["num_heads"] == 3  # ViT-Ti's width
    inferred = load_backbone(None, weights=path)
    assert inferred.num_heads == 3 and inferred.source == "state dict"
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        direct = model.forward_features(images)[:, 1:].reshape(1, 14, 14, 192)
        torch.testing.assert_close(inferred(images), direct)


def test_safetensors_with_recorded_architecture(tmp_path, tiny_weights):
    loaded = load_backbone(str(tiny_weights))  # a path given as the backbone name
    assert loaded.weights_id.startswith("file:")
    with torch.no_grad():
        assert loaded(torch.zeros(1, 3, 64, 96)).shape == (1, 8, 12, 48)
    half = tmp_path / "half.safetensors"
    save_backbone_safetensors(make_tiny_vit().state_dict(), half, TINY_ARCH, dtype=torch.float16)
    assert load_backbone(None, weights=half).vit.pos_embed.dtype == torch.float32


def test_random_init_by_name():
    model = load_backbone("vit_tiny_patch16_224", pretrained=False)
    assert model.weights_id == "random" and model.patch_size == 16


def test_errors_are_clear(tmp_path, monkeypatch):
    with raises(BackboneError, match="unknown backbone 'not_a_model'"):
        load_backbone("not_a_model")
    with raises(BackboneError, match="not a ViT"):
        load_backbone("resnet18", pretrained=False)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with raises(BackboneError, match="is not a PyTorch checkpoint"):
        load_backbone(None, weights=garbage)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # arbitrary objects are refused
    with raises(BackboneError, match=r"needs the Python object torch\.nn\.modules\.linear\.Linear"):
        load_backbone(None, weights=pickled)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"\x80\x02garbage")
    with raises(BackboneError, match="cannot read checkpoint .*: Unsupported operand") as error:
        load_backbone(None, weights=truncated)
    assert "weights_only" not in str(error.value)  # no advice to turn the safety off
    with raises(BackboneError, match="weights file not found"):
        load_backbone(None, weights=tmp_path / "missing.pth")
    mismatched = tmp_path / "mismatched.pth"
    torch.save(make_tiny_vit().state_dict(), mismatched)
    with raises(BackboneError, match="do not fit"):
        load_backbone("vit_small_patch16_224", weights=mismatched)
    only_teacher = tmp_path / "teacher_only.pth"
    torch.save({"teacher": make_tiny_vit().state_dict()}, only_teacher)
    with raises(BackboneError, match="checkpoint_key=teacher"):
        load_backbone(None, weights=only_teacher, checkpoint_key="student")


def test_offline_without_cached_weights_names_the_fix(monkeypatch):
    monkeypatch.setattr(hub, "hub_cached_file", lambda name: None)
    monkeypatch.setattr(hub, "online", lambda host="huggingface.co": False)
    with raises(BackboneError, match=r"dino_deitsmall8_pretrain\.pth.*weights=PATH"):
        load_backbone("dino_vits8")
