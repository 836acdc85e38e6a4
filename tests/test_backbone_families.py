"""Backbone families: each runs its release files exactly as its own code does, by default.

A tiny random model is saved in the original release layout (DINO's ``vision_transformer.py``
state dict, DINOv3's ``dinov3/hub/backbones.py`` state dict; DINOv2 is covered in
``test_checkpoint_formats.py``), loaded without naming the architecture, and compared with an
independent forward written here from the family's documented rule (docs/protocol.md#backbones):
DINO's scale-factor position-embedding resize, DINOv3's rotary embedding.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file

from dino_vos.attention import cls_attention
from dino_vos.backbones import Backbone, load_backbone
from dino_vos.cli import main
from dino_vos.errors import ArchitectureGuessWarning, BackboneError
from dino_vos.families import DinoBackbone, Dinov2Backbone, Dinov3Backbone

DIM, HEADS, DEPTH, STORAGE = 64, 2, 2, 4
#: DINO's width here: 2 heads of 64 channels, the head count dino-vos infers for it.
DINO_DIM = 128


def _rand(g: torch.Generator, *shape: int, std: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _norm(t: torch.Tensor, state: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(t, (t.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"], eps)


def _linear(t: torch.Tensor, state: dict, name: str, bias: torch.Tensor | None = None):
    return F.linear(t, state[f"{name}.weight"], state.get(f"{name}.bias") if bias is None else bias)


def _heads(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)


# ------------------------------------------------------------------------------------------ DINO


def _dino_state(g: torch.Generator, patch: int = 8, stored: int = 4) -> dict:
    """DINO's VisionTransformer keys (those of timm): pos_embed over CLS + stored grid."""
    state = {
        "cls_token": _rand(g, 1, 1, DINO_DIM, std=1.0),
        "pos_embed": _rand(g, 1, 1 + stored * stored, DINO_DIM, std=1.0),
        "patch_embed.proj.weight": _rand(g, DINO_DIM, 3, patch, patch),
        "patch_embed.proj.bias": _rand(g, DINO_DIM),
        "norm.weight": 1 + _rand(g, DINO_DIM),
        "norm.bias": _rand(g, DINO_DIM),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        d = DINO_DIM
        for name, shape in (
            ("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d)),
        ):  # fmt: skip
            weight = 1 + _rand(g, *shape) if len(shape) == 1 else _rand(g, *shape)
            state |= {p + name + ".weight": weight, p + name + ".bias": _rand(g, shape[0])}
    return state


def _dino_forward(state: dict, images: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """DINO's forward: CLS + patches + pos_embed resized by scale factors (h + 0.1) / M, pre-norm
    blocks (LayerNorm eps 1e-6), final norm; patch tokens as a (B, h, w, D) grid."""
    x = F.conv2d(
        images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch
    )
    batch, _, h, w = x.shape
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    pos = state["pos_embed"]
    side = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, side, side, DINO_DIM).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")
    x = x + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, DINO_DIM)], 1)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        q, k, v = _linear(_norm(x, state, p + "norm1", 1e-6), state, p + "attn.qkv").chunk(3, -1)
        attn = F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v))
        x = x + _linear(attn.transpose(1, 2).reshape(x.shape), state, p + "attn.proj")
        hidden = F.gelu(_linear(_norm(x, state, p + "norm2", 1e-6), state, p + "mlp.fc1"))
        x = x + _linear(hidden, state, p + "mlp.fc2")
    return _norm(x, state, "norm", 1e-6)[:, 1:].reshape(batch, h, w, DINO_DIM)


def test_dino_release_file_equals_the_dino_rule(tmp_path):
    state = _dino_state(torch.Generator().manual_seed(0))
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(state, path)
    with pytest.warns(ArchitectureGuessWarning, match="assumed 2 heads for width 128"):
        backbone = load_backbone(None, weights=path)
    assert isinstance(backbone, DinoBackbone) and not isinstance(backbone, Dinov2Backbone)
    assert backbone.pos_embed_mode == "reference"
    images = torch.randn(2, 3, 48, 104)  # 6 x 13 patches from a stored 4 x 4 grid
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), _dino_forward(state, images))
        timm_rule = load_backbone(None, weights=path, pos_embed="timm")(images)
    assert (timm_rule - _dino_forward(state, images)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- DINOv3


def _dinov3_state(g: torch.Generator, swiglu: bool = False) -> dict:
    """A DINOv3 ViT (patch 16) as ``DinoVisionTransformer.state_dict()`` names it: storage
    tokens, mask token, RoPE periods (base 100), qkv with a bias and its k-masking
    ``bias_mask``, layer scales ``ls1/ls2.gamma``, Mlp ``fc1/fc2`` or SwiGLU ``w1/w2/w3``."""
    head_dim = DIM // HEADS
    quarter = torch.arange(head_dim // 4, dtype=torch.float32)
    state = {
        "cls_token": _rand(g, 1, 1, DIM, std=1.0),
        "storage_tokens": _rand(g, 1, STORAGE, DIM, std=1.0),
        "mask_token": torch.zeros(1, DIM),
        "patch_embed.proj.weight": _rand(g, DIM, 3, 16, 16),
        "patch_embed.proj.bias": _rand(g, DIM),
        "rope_embed.periods": 100.0 ** (2 * quarter / (head_dim // 2)),
        "norm.weight": 1 + _rand(g, DIM),
        "norm.bias": _rand(g, DIM),
    }
    hidden = 176 if swiglu else 4 * DIM  # SwiGLUFFN: int(4 * 64 * 2 / 3) aligned to 8
    mlp = (
        [("mlp.w1", (hidden, DIM)), ("mlp.w2", (hidden, DIM)), ("mlp.w3", (DIM, hidden))]
        if swiglu
        else [("mlp.fc1", (hidden, DIM)), ("mlp.fc2", (DIM, hidden))]
    )
    for i in range(DEPTH):
        p = f"blocks.{i}."
        layers = [("norm1", (DIM,)), ("norm2", (DIM,)), ("attn.qkv", (3 * DIM, DIM))]
        for name, shape in [*layers, ("attn.proj", (DIM, DIM)), *mlp]:
            weight = 1 + _rand(g, *shape) if len(shape) == 1 else _rand(g, *shape)
            state |= {p + name + ".weight": weight, p + name + ".bias": _rand(g, shape[0])}
        state[p + "attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(DIM), torch.zeros(DIM), torch.ones(DIM)]
        )
        state[p + "ls1.gamma"] = 1 + _rand(g, DIM, std=0.2)
        state[p + "ls2.gamma"] = 1 + _rand(g, DIM, std=0.2)
    return state


def _rope(state: dict, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's RoPE for an h x w grid: patch centres normalised per side to [-1, 1], angles
    2 pi * coordinate / period for each of (y, x) and each period, laid out twice -> sin, cos
    of shape (h * w, head_dim)."""
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(h * w, 2)
    angles = 2 * math.pi * coords[:, :, None] / state["rope_embed.periods"]  # (hw, 2, hd / 4)
    angles = angles.reshape(h * w, -1).repeat(1, 2)
    return angles.sin(), angles.cos()


def _rotate(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, prefix: int) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin on the patch tokens; prefix tokens unchanged."""
    patches = t[:, :, prefix:]
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat([-second, first], -1) * sin
    return torch.cat([t[:, :, :prefix], rotated], dim=2)


def _dinov3_forward(state: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's forward from its documented rule: [CLS, storage, patches] without position
    embeddings; in each block the rotary embedding turns q and k of the patches, the k bias is
    masked to zero, layer scales on both branches; LayerNorm eps 1e-5. Returns the patch grid
    (B, h, w, D) and the last block's full attention (B, heads, T, T)."""
    x = F.conv2d(
        images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16
    )
    batch, _, h, w = x.shape
    prefix = 1 + STORAGE
    tokens = [state["cls_token"], state["storage_tokens"]]
    x = torch.cat([t.expand(batch, -1, -1) for t in tokens] + [x.flatten(2).transpose(1, 2)], 1)
    sin, cos = _rope(state, h, w)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        bias = state[p + "attn.qkv.bias"] * state[p + "attn.qkv.bias_mask"]
        qkv = _linear(_norm(x, state, p + "norm1", 1e-5), state, p + "attn.qkv", bias)
        q, k, v = (_heads(t) for t in qkv.chunk(3, -1))
        q, k = _rotate(q, sin, cos, prefix), _rotate(k, sin, cos, prefix)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape)
        x = x + state[p + "ls1.gamma"] * _linear(out, state, p + "attn.proj")
        y = _norm(x, state, p + "norm2", 1e-5)
        if p + "mlp.w1.weight" in state:
            y = F.silu(_linear(y, state, p + "mlp.w1")) * _linear(y, state, p + "mlp.w2")
            y = _linear(y, state, p + "mlp.w3")
        else:
            y = _linear(F.gelu(_linear(y, state, p + "mlp.fc1")), state, p + "mlp.fc2")
        x = x + state[p + "ls2.gamma"] * y
    patches = _norm(x, state, "norm", 1e-5)[:, prefix:].reshape(batch, h, w, DIM)
    return patches, attn


@pytest.mark.parametrize("swiglu", [False, True], ids=["vits16", "vits16plus"])
def test_dinov3_release_file_equals_the_rope_rule(tmp_path, swiglu):
    state = _dinov3_state(torch.Generator().manual_seed(1), swiglu)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(state, path)
    backbone = load_backbone(None, weights=path)
    assert isinstance(backbone, Dinov3Backbone) and backbone.pos_embed_mode == "rope"
    assert (backbone.patch_size, backbone.num_heads, backbone.depth) == (16, HEADS, DEPTH)
    assert backbone.num_prefix_tokens == 1 + STORAGE
    assert "DINOv3 state dict, dropped mask_token" in backbone.describe()
    images = torch.randn(2, 3, 48, 112)  # a 3 x 7 grid, never seen in training: no resize
    expected, attention = _dinov3_forward(state, images)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), expected, atol=1e-5, rtol=1e-5)
        maps = cls_attention(backbone, images)  # CLS row, storage tokens dropped
    torch.testing.assert_close(
        maps.flatten(2), attention[:, :, 0, 1 + STORAGE :], atol=1e-6, rtol=1e-5
    )
    with pytest.raises(BackboneError, match="DINOv3 model.*pos_embed=reference does not apply"):
        load_backbone(None, weights=path, pos_embed="reference")


def test_dinov3_release_file_by_short_name_and_missing_key(tmp_path):
    state = _dinov3_state(torch.Generator().manual_seed(2))
    path = tmp_path / "release.pth"
    torch.save(state, path)
    # the short name builds timm's ViT-S/16 (12 blocks of 384): this file does not fit it
    with pytest.raises(BackboneError, match=r"do not fit.*name="):
        load_backbone("dinov3_vits16", weights=path)
    del state["blocks.0.ls1.gamma"]  # inferred from the other block: the key is named
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"missing blocks\.\*\.gamma_1"):
        load_backbone(None, weights=path)


@pytest.mark.parametrize(
    "name, family, rule",
    [
        ("dinov3_vits16", Dinov3Backbone, "rope"),
        ("vit_base_patch16_dinov3", Dinov3Backbone, "rope"),
        ("vit_small_patch14_reg4_dinov2", Dinov2Backbone, "timm"),
        ("vit_small_patch14_dinov2", Dinov2Backbone, "reference"),
        ("dino_vits16", DinoBackbone, "reference"),
    ],
)
def test_family_and_rule_by_name(name, family, rule):
    backbone = load_backbone(name, pretrained=False)
    assert type(backbone) is family and backbone.pos_embed_mode == rule
    assert type(Backbone(backbone.vit, "again", arch=backbone.arch)) is family


def test_dinov3_offline_names_the_release_file(monkeypatch):
    from dino_vos import hub

    monkeypatch.setattr(hub, "hub_cached_file", lambda name: None)
    monkeypatch.setattr(hub, "torch_hub_file", lambda name: None)
    monkeypatch.setattr(hub, "online", lambda host="huggingface.co": False)
    with pytest.raises(
        BackboneError, match="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    ) as error:
        load_backbone("dinov3_vitl16")
    assert "\n" not in str(error.value)


def test_dinov3_commands_end_to_end(clip_dir, tmp_path):
    """propagate, attention and features with a DINOv3 release file (patch 16 everywhere)."""
    path = tmp_path / "dinov3.pth"
    torch.save(_dinov3_state(torch.Generator().manual_seed(3)), path)
    runner = CliRunner()
    common = ["--weights", str(path), "--short-side", "64"]
    for args in (
        ["propagate", str(clip_dir / "frames"), "--mask", str(clip_dir / "masks" / "00000.png"),
         "--out", str(tmp_path / "masks"), *common, "--shift-ensemble", "2"],
        ["attention", str(clip_dir / "frames"), "--out", str(tmp_path / "attention"), *common],
        ["features", str(clip_dir / "frames"), "--out", str(tmp_path / "features"), *common],
    ):  # fmt: skip
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6


def test_dinov3_timm_file_equals_timms_forward(tmp_path):
    """A timm DINOv3 file (Eva keys, no recorded architecture: the head count is a guess from
    the width, said in a warning) equals timm's own forward of the same weights."""
    torch.manual_seed(4)
    kwargs = dict(depth=1, num_classes=0)
    model = timm.create_model("vit_small_patch16_dinov3", **kwargs).eval()
    for name, param in model.named_parameters():
        if name.endswith(("gamma_1", "gamma_2")):
            param.data.normal_(1.0, 0.2)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.warns(ArchitectureGuessWarning, match="assumed 6 heads for width 384"):
        backbone = load_backbone(None, weights=path)
    assert isinstance(backbone, Dinov3Backbone) and backbone.num_prefix_tokens == 5
    images = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        expected = model.forward_features(images)[:, 5:].reshape(1, 3, 5, 384)
        torch.testing.assert_close(backbone(images), expected)


def test_short_name_takes_the_release_file_from_torch_hubs_cache(tmp_path, monkeypatch):
    """Offline, a short name whose official release file is in torch hub's cache loads it."""
    from dino_vos import backbones, hub
    from dino_vos.registry import RegisteredBackbone

    state = _dinov3_state(torch.Generator().manual_seed(5))
    release = tmp_path / "dinov3_tiny_pretrain_lvd1689m-00000000.pth"
    torch.save(state, release)
    entry = RegisteredBackbone(
        "dinov3_tiny",
        "a tiny DINOv3 for this test",
        "vit_small_patch16_dinov3_qkvb.lvd1689m",
        release.name,
        timm_kwargs=(("embed_dim", DIM), ("depth", DEPTH), ("num_heads", HEADS)),
    )
    monkeypatch.setattr(backbones, "registered_backbone", lambda name: entry)
    monkeypatch.setattr(hub, "hub_cached_file", lambda name: None)
    monkeypatch.setattr(
        hub, "torch_hub_file", lambda name: release if name == release.name else None
    )
    monkeypatch.setattr(hub, "online", lambda host="huggingface.co": False)
    backbone = load_backbone("dinov3_tiny")
    assert backbone.weights_id.startswith(f"file:{release.resolve()}")
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), _dinov3_forward(state, images)[0])
