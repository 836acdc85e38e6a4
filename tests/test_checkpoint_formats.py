"""Checkpoints as the original code writes them: DINOv2, iBOT, MoCo v3, MAE, timm, torch.compile.

Each test builds a tiny random model, saves it with the keys, wrappers and extra entries of the
original training or release code (facebookresearch/dinov2 ``hub/backbones.py`` and
``train/train.py``, bytedance/ibot ``main_ibot.py``, facebookresearch/moco-v3 ``main_moco.py``,
facebookresearch/mae ``util/misc.py``, timm), loads it without naming the architecture, and
compares the patch features with a forward of the same weights in their original layout. The
official DINO formats are tested in ``test_backbones.py``.
"""

from __future__ import annotations

import argparse
import functools
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TINY_ARCH, make_tiny_vit
from pytest import raises
from safetensors.torch import save_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from dino_vos.attention import cls_attention
from dino_vos.backbones import Backbone, load_backbone
from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.cli import main
from dino_vos.errors import ArchitectureGuessWarning, BackboneError, PartialWeightsWarning
from dino_vos.spec import BackboneSpec


def _vit(seed: int = 0, **kwargs) -> nn.Module:
    """A random timm ViT in eval mode; layer scales drawn around 1 so every block matters."""
    torch.manual_seed(seed)
    model = timm.create_model(kwargs.pop("model", "vit_small_patch16_224"), **kwargs).eval()
    for name, param in model.named_parameters():
        if name.endswith("gamma"):
            param.data.normal_(1.0, 0.2)
    return model


def _patches(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's own forward (final norm included), prefix tokens removed, as a (B, h, w, D) grid."""
    with torch.no_grad():
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
    side = math.isqrt(tokens.shape[1])
    return tokens.reshape(tokens.shape[0], side, side, -1)


def _features(path, images: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return load_backbone(None, weights=path, **kwargs)(images)


def _refused(path, *fragments: str, **kwargs) -> str:
    """Loading ``path`` fails with one line that names every fragment (keys, formats)."""
    with raises(BackboneError) as error:
        load_backbone(kwargs.pop("name", None), weights=path, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------- DINOv2


def _dinov2_state(registers: int, swiglu: bool, img_size: int, seed: int = 0) -> dict:
    """A ViT-S/14 (2 blocks) state dict as DinoVisionTransformer names it: ``mask_token``,
    ``cls_token``, ``pos_embed`` over CLS + grid (registers have no position), ``ls1.gamma``,
    ``register_tokens``, and SwiGLUFFNFused's ``w12``/``w3`` in the ViT-g layout."""
    g = torch.Generator().manual_seed(seed)
    dim, grid = 384, (img_size // 14) ** 2
    hidden = (int(dim * 4 * 2 / 3) + 7) // 8 * 8 if swiglu else dim * 4

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    state = {
        "cls_token": rand(1, 1, dim, std=1.0),
        "pos_embed": rand(1, 1 + grid, dim, std=1.0),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": rand(dim, 3, 14, 14),
        "patch_embed.proj.bias": rand(dim),
        "norm.weight": 1 + rand(dim),
        "norm.bias": rand(dim),
    }
    if registers:
        state["register_tokens"] = rand(1, registers, dim, std=1.0)
    for i in range(2):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": 1 + rand(dim),
            p + "norm1.bias": rand(dim),
            p + "attn.qkv.weight": rand(3 * dim, dim),
            p + "attn.qkv.bias": rand(3 * dim),
            p + "attn.proj.weight": rand(dim, dim),
            p + "attn.proj.bias": rand(dim),
            p + "ls1.gamma": 1 + rand(dim, std=0.2),
            p + "norm2.weight": 1 + rand(dim),
            p + "norm2.bias": rand(dim),
            p + "ls2.gamma": 1 + rand(dim, std=0.2),
        }
        fc1, fc2 = ("mlp.w12", "mlp.w3") if swiglu else ("mlp.fc1", "mlp.fc2")
        rows = 2 * hidden if swiglu else hidden
        state |= {
            p + fc1 + ".weight": rand(rows, dim),
            p + fc1 + ".bias": rand(rows),
            p + fc2 + ".weight": rand(dim, hidden),
            p + fc2 + ".bias": rand(dim),
        }
    return state


def _dinov2_pos_embed(state: dict, side: int, offset: float, antialias: bool) -> torch.Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding for a square side x side grid: unchanged at
    the stored grid, else bicubic by scale factor (side + offset) / M when ``interpolate_offset``
    is set (0.1, the hub default without registers), by size with antialias otherwise (the
    hub's register models: offset 0, antialias True)."""
    pos = state["pos_embed"]
    stored = math.isqrt(pos.shape[1] - 1)
    if stored == side:
        return pos
    grid = pos[:, 1:].reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
    if offset:
        scale = (side + offset) / stored
        resized = F.interpolate(
            grid, scale_factor=(scale, scale), mode="bicubic", antialias=antialias
        )
    else:
        resized = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=antialias)
    return torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)


def _dinov2_forward(
    state: dict, images: torch.Tensor, offset: float = 0.1, antialias: bool = False, heads: int = 6
) -> torch.Tensor:
    """DinoVisionTransformer.forward_features written from its source: patch conv, CLS, + the
    (interpolated) pos_embed, registers inserted after CLS, pre-norm blocks with layer scale
    (Mlp or SwiGLU), final norm; returns x_norm_patchtokens as a (B, h, w, D) grid."""
    batch, dim = images.shape[0], state["cls_token"].shape[-1]
    x = F.conv2d(
        images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14
    )
    side = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + _dinov2_pos_embed(state, side, offset, antialias)
    registers = state.get("register_tokens")
    if registers is not None:
        x = torch.cat([x[:, :1], registers.expand(batch, -1, -1), x[:, 1:]], dim=1)

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (dim,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    def linear(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        q, k, v = (
            linear(norm(x, p + "norm1"), p + "attn.qkv")
            .reshape(batch, x.shape[1], 3, heads, dim // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(dim // heads)).softmax(dim=-1) @ v
        x = x + state[p + "ls1.gamma"] * linear(
            attn.transpose(1, 2).reshape(x.shape), p + "attn.proj"
        )
        h = norm(x, p + "norm2")
        if p + "mlp.w12.weight" in state:
            x1, x2 = linear(h, p + "mlp.w12").chunk(2, dim=-1)
            h = linear(F.silu(x1) * x2, p + "mlp.w3")
        else:
            h = linear(F.gelu(linear(h, p + "mlp.fc1")), p + "mlp.fc2")
        x = x + state[p + "ls2.gamma"] * h
    prefix = 1 + (registers.shape[1] if registers is not None else 0)
    return norm(x, "norm")[:, prefix:].reshape(batch, side, side, dim)


@pytest.mark.parametrize(
    "registers, swiglu",
    [(0, False), (4, False), (0, True)],
    ids=["vits14", "vits14_reg4", "swiglu"],
)
def test_dinov2_released_backbone(tmp_path, registers, swiglu):
    """dinov2_vits14[_reg4]_pretrain.pth: a bare state dict over the 518 px (37 x 37) grid, used
    on 56 px frames. DINOv2 resizes the position embeddings of its models without registers by
    the DINO formula, and those of its register models by size with antialias (timm's resize):
    the default (``auto``) follows the model, and forcing the other rule differs."""
    state = _dinov2_state(registers, swiglu, img_size=518)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = load_backbone(None, weights=path)
    assert loaded.pos_embed_mode == ("timm" if registers else "reference")
    assert (loaded.patch_size, loaded.num_heads, loaded.depth) == (14, 6, 2)
    assert loaded.num_prefix_tokens == 1 + registers
    assert "DINOv2 state dict, dropped mask_token" in loaded.describe()
    images = _images(56)
    interpolation = {"offset": 0.0, "antialias": True} if registers else {}
    with torch.no_grad():
        expected = _dinov2_forward(state, images, **interpolation)
        torch.testing.assert_close(loaded(images), expected, atol=2e-4, rtol=1e-4)
        other = load_backbone(None, weights=path, pos_embed="reference" if registers else "timm")
        assert (other(images) - expected).abs().max() > 1e-2
    if registers:  # the named model without registers: one line naming the key
        _refused(path, "unexpected register_tokens (4", name="vit_small_patch14_dinov2")
    else:  # a key missing from the file is named, block 0's too (layer scale from any block)
        for block in (1, 0):
            torch.save({k: v for k, v in state.items() if k != f"blocks.{block}.ls1.gamma"}, path)
            _refused(path, "DINOv2 state dict", "missing blocks.*.ls1.gamma", "allow_partial=True")


def test_dinov2_training_teacher_checkpoint_with_chunked_blocks(tmp_path):
    """eval/training_N/teacher_checkpoint.pth: {"teacher": SSLMetaArch.teacher.state_dict()},
    i.e. ``backbone.*`` (blocks nested as blocks.<chunk>.<i> with block_chunks), ``dino_head.*``
    and ``ibot_head.*``."""
    flat = _dinov2_state(registers=4, swiglu=False, img_size=56)
    chunked = {}
    for key, value in flat.items():  # block_chunks=2, depth 2: chunk c holds Identity*c + block c
        parts = key.split(".")
        if parts[0] == "blocks":
            key = ".".join(["blocks", parts[1], *parts[1:]])
        chunked[f"backbone.{key}"] = value
    heads = {"mlp.0.weight": torch.randn(32, 384), "last_layer.weight_g": torch.ones(64, 1)}
    teacher = chunked | {f"dino_head.{k}": v for k, v in heads.items()}
    teacher |= {f"ibot_head.{k}": v for k, v in heads.items()}
    assert "backbone.blocks.1.1.attn.qkv.weight" in teacher
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    loaded = load_backbone(None, weights=path)
    assert loaded.depth == 2 and loaded.num_prefix_tokens == 5
    assert "DINOv2 training checkpoint (teacher)" in loaded.source
    assert "dino_head" in loaded.source and "ibot_head" in loaded.source
    images = _images(56)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images), _dinov2_forward(flat, images), atol=2e-4, rtol=1e-4
        )
    _refused(path, "has no 'student' entry", checkpoint_key="student")
    # a block that is missing from the file is named, and only --allow-partial loads the rest
    del teacher["backbone.blocks.1.1.ls2.gamma"]
    torch.save({"teacher": teacher}, path)
    _refused(path, "missing blocks.*.ls2.gamma", "allow_partial=True")
    with pytest.warns(PartialWeightsWarning, match=r"left random: blocks\.\*\.ls2\.gamma"):
        load_backbone(None, weights=path, allow_partial=True)


# ------------------------------------------------------------------------------------------ iBOT


def test_ibot_training_checkpoint_and_released_teacher(tmp_path):
    """main_ibot.py's checkpoint.pth: student under DDP (``module.backbone.*`` with the MIM
    token ``masked_embed``, ``module.head.*`` with ``last_layer2``), teacher (``backbone.*``,
    ``head.*``), optimizer, epoch, args, ibot_loss (two centres), fp16 scaler; and the released
    ``checkpoint_teacher.pth`` ({"state_dict": teacher backbone})."""
    kwargs = dict(depth=2, img_size=32, num_classes=0)
    teacher, student = _vit(1, **kwargs), _vit(2, **kwargs)

    def wrapped(model, prefix, masked):
        state = {f"{prefix}backbone.{k}": v for k, v in model.state_dict().items()}
        if masked:
            state[f"{prefix}backbone.masked_embed"] = torch.zeros(1, 384)
        head = {"mlp.0.weight": torch.randn(16, 384), "last_layer.weight_g": torch.ones(8, 1)}
        head |= {
            "last_layer2.weight_g": torch.ones(8, 1),
            "last_layer2.weight_v": torch.ones(8, 16),
        }
        return state | {f"{prefix}head.{k}": v for k, v in head.items()}

    optimizer = torch.optim.AdamW(student.parameters())
    args = argparse.Namespace(
        arch="vit_small", patch_size=16, out_dim=8192, patch_out_dim=8192, shared_head=False,
        norm_last_layer=True, use_masked_im_modeling=True, pred_ratio=[0.0, 0.3],
        global_crops_scale=(0.14, 1.0), local_crops_number=10, output_dir=".", world_size=16,
    )  # fmt: skip
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": wrapped(student, "module.", masked=True),
            "teacher": wrapped(teacher, "", masked=False),
            "optimizer": optimizer.state_dict(),
            "epoch": 100,
            "args": args,
            "ibot_loss": {"center": torch.zeros(1, 8192), "center2": torch.zeros(1, 1, 8192)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        },
        path,
    )
    images = _images(32)
    for key, network in (("teacher", teacher), ("student", student)):
        loaded = load_backbone(None, weights=path, checkpoint_key=key)
        assert loaded.num_heads == 6 and loaded.source.startswith(
            f"iBOT training checkpoint ({key})"
        )
        assert ("masked_embed" in loaded.source) == (key == "student")
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), _patches(network, images))
    released = tmp_path / "checkpoint_teacher.pth"
    released_state = teacher.state_dict()
    torch.save({"state_dict": released_state}, released)
    torch.testing.assert_close(_features(released, images), _patches(teacher, images))
    _refused(released, "state dict in 'state_dict'", "does not apply", checkpoint_key="student")
    _refused(released, "cls_token is (1, 1, 384) not (1, 1, 192)", name="vit_tiny_patch16_224")
    del released_state["norm.bias"]
    torch.save({"state_dict": released_state}, released)
    _refused(released, "missing norm.bias", "allow_partial=True")


# -------------------------------------------------------------------------------------- MoCo v3


def test_moco_v3_checkpoint_base_and_momentum_encoders(tmp_path):
    """main_moco.py's checkpoint_%04d.pth.tar: epoch, arch, DDP state_dict of MoCo (base and
    momentum encoders with 3-layer BN projection heads, a predictor), optimizer, scaler. MoCo
    v3's ViT-S has 12 heads (vits.py), which the recorded ``arch`` says."""

    def mlp(layers, in_dim, hidden, out):  # MoCo._build_mlp
        modules = []
        for i in range(layers):
            modules.append(
                nn.Linear(
                    in_dim if i == 0 else hidden, out if i == layers - 1 else hidden, bias=False
                )
            )
            modules += (
                [nn.BatchNorm1d(hidden), nn.ReLU()]
                if i < layers - 1
                else [nn.BatchNorm1d(out, affine=False)]
            )
        return nn.Sequential(*modules)

    class MoCo(nn.Module):
        def __init__(self):
            super().__init__()
            kwargs = dict(num_heads=12, depth=2, img_size=32, num_classes=64)
            self.base_encoder, self.momentum_encoder = _vit(1, **kwargs), _vit(2, **kwargs)
            for encoder in (self.base_encoder, self.momentum_encoder):
                encoder.head = mlp(3, 384, 64, 16)
            self.predictor = mlp(2, 16, 64, 16)

    moco = MoCo().eval()
    path = tmp_path / "checkpoint_0299.pth.tar"
    torch.save(
        {
            "epoch": 300,
            "arch": "vit_small",
            "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()},
            "optimizer": torch.optim.AdamW(moco.parameters()).state_dict(),
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        },
        path,
    )
    images = _images(32)
    loaded = load_backbone(None, weights=path)  # the base encoder by default
    assert loaded.num_heads == 12
    assert (
        loaded.source
        == "MoCo v3 checkpoint (base_encoder), dropped head, momentum_encoder, predictor"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), _patches(moco.base_encoder, images))
    momentum = _features(path, images, checkpoint_key="momentum_encoder")
    torch.testing.assert_close(momentum, _patches(moco.momentum_encoder, images))
    _refused(
        path,
        "MoCo v3 checkpoint",
        "checkpoint_key=base_encoder or momentum_encoder",
        checkpoint_key="teacher",
    )
    _refused(path, "cls_token is (1, 1, 384) not (1, 1, 192)", name="vit_tiny_patch16_224")
    # a key missing from the base encoder is never taken from the momentum encoder
    # convert_to_deit.py's file ({"model": base encoder}) records no arch: 6 heads are a guess,
    # said in one warning line naming the way to state it; mocov3_vits16 states it
    content = torch.load(path, weights_only=True)
    deit = {
        k[len("module.base_encoder.") :]: v
        for k, v in content["state_dict"].items()
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head")
    }
    converted = tmp_path / "moco_deit.pth"
    torch.save({"model": deit}, converted)
    with pytest.warns(ArchitectureGuessWarning, match=r"assumed 6 heads.*name=") as caught:
        assert load_backbone(None, weights=converted).num_heads == 6
    assert "\n" not in str(caught[0].message)
    assert load_backbone("mocov3_vits16", pretrained=False).num_heads == 12
    del content["state_dict"]["module.base_encoder.norm.weight"]
    torch.save(content, path)
    _refused(path, "MoCo v3 checkpoint (base_encoder)", "missing norm.weight")


# ------------------------------------------------------------------------------------------- MAE


class _MaskedAutoencoderViT(nn.Module):
    """models_mae.MaskedAutoencoderViT, small: a timm-Block encoder with a final norm, then the
    decoder (decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm,
    decoder_pred)."""

    def __init__(self, dim=768, heads=12, depth=1, img_size=32, patch=16, decoder_dim=32):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
        grid = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, grid + 1, decoder_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, 4, 4.0, qkv_bias=True, norm_layer=norm)]
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch**2 * 3)

    def forward_encoder(self, images: torch.Tensor) -> torch.Tensor:
        """forward_encoder without masking: pos added to patches, CLS + its pos, blocks, norm."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]
        side = math.isqrt(x.shape[1])
        return x.reshape(x.shape[0], side, side, -1)


def test_mae_pretraining_checkpoint(tmp_path):
    """main_pretrain.py's checkpoint-N.pth (misc.save_model): model (encoder and decoder),
    optimizer, epoch, scaler, args; the decoder and its mask_token are dropped."""
    torch.manual_seed(0)
    mae = _MaskedAutoencoderViT().eval()
    args = argparse.Namespace(
        model="mae_vit_base_patch16", input_size=32, mask_ratio=0.75, norm_pix_loss=True,
        blr=1.5e-4, output_dir="./output_dir", log_dir="./output_dir", device="cuda",
        distributed=True, world_size=8, dist_url="env://",
    )  # fmt: skip
    path = tmp_path / "checkpoint-799.pth"
    content = {
        "model": mae.state_dict(),
        "optimizer": torch.optim.AdamW(mae.parameters()).state_dict(),
        "epoch": 799,
        "scaler": {"scale": 65536.0},
        "args": args,
    }
    torch.save(content, path)
    loaded = load_backbone(None, weights=path)
    assert loaded.num_heads == 12 and loaded.depth == 1
    assert loaded.source.startswith("MAE checkpoint, dropped mask_token")
    for group in ("decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_pred"):
        assert group in loaded.source
    images = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), mae.forward_encoder(images))
    # a fine-tuned MAE with global pooling has fc_norm instead of norm: refused, or partial
    content["model"] = {
        k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v
        for k, v in mae.state_dict().items()
    }
    torch.save(content, path)
    _refused(path, "missing norm.weight, norm.bias", "MAE checkpoint")
    with pytest.warns(
        PartialWeightsWarning, match="2 missing keys, left random: norm.weight, norm.bias"
    ):
        partial = load_backbone(None, weights=path, allow_partial=True)
    assert torch.equal(partial.vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------- timm, torch.compile


def test_timm_state_dicts_safetensors_pth_and_compiled(tmp_path):
    """timm's own layout saved with safetensors' save_file(model.state_dict()) and torch.save, the
    classifier included; and the ``module._orig_mod.`` keys of a torch.compile'd model in DDP."""
    model = _vit(model="vit_small_patch14_reg4_dinov2", depth=2, img_size=56, num_classes=10)
    images = _images(56)
    expected = _patches(model, images)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    # torch.compile's OptimizedModule holds the model as the submodule ``_orig_mod`` (and DDP as
    # ``module``): the same nesting, without importing dynamo, which takes seconds
    compiled = nn.Module()
    compiled._orig_mod = model
    ddp = nn.Module()
    ddp.module = compiled
    assert next(iter(ddp.state_dict())).startswith("module._orig_mod.")
    torch.save(ddp.state_dict(), tmp_path / "compiled.pth")
    for name in ("model.safetensors", "model.pth", "compiled.pth"):
        loaded = load_backbone(None, weights=tmp_path / name)
        assert loaded.num_prefix_tokens == 5 and loaded.num_heads == 6, name
        assert loaded.source.endswith("dropped head"), loaded.source
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), expected)
    _refused(
        tmp_path / "model.safetensors",
        "safetensors state dict",
        "missing blocks.*.norm1.weight",
        "unexpected blocks.*.ls1.gamma, blocks.*.ls2.gamma, reg_token",
        "is (384,) not (192,)",
        name="vit_tiny_patch16_224",
    )


# ------------------------------------------------------------------------- timm DINO model names


@functools.cache
def _random_init(name: str) -> Backbone:
    """A timm model by name, random init, built once for the tests below (which restore what
    they change): a ViT-S takes a moment on a busy CPU."""
    torch.manual_seed(0)
    return load_backbone(name, pretrained=False)


@pytest.mark.parametrize(
    "name, prefix, size",
    [
        ("vit_small_patch16_224.dino", 1, (64, 96)),
        ("vit_small_patch14_dinov2.lvd142m", 1, (56, 84)),
        ("vit_small_patch14_reg4_dinov2.lvd142m", 5, (56, 84)),
    ],
)
def test_timm_dino_and_dinov2_models_by_name(name, prefix, size):
    """Random init of the timm DINO/DINOv2 ViTs: patch 16/14, CLS + registers, any frame size."""
    backbone = _random_init(name)
    backbone.pos_embed_mode = "reference"
    assert backbone.num_prefix_tokens == prefix and backbone.num_heads == 6
    images = torch.randn(1, 3, *size)
    grid = (size[0] // backbone.patch_size, size[1] // backbone.patch_size)
    assert grid == (4, 6)
    with torch.no_grad():
        reference = backbone(images)  # the DINO formula resizes the stored 14x14 / 37x37 grid
        backbone.pos_embed_mode = "timm"
        timm_mode = backbone(images)
        tokens = backbone.vit.forward_features(images)  # timm's own dynamic-size forward
    assert reference.shape == (1, *grid, 384)
    torch.testing.assert_close(timm_mode, tokens[:, prefix:].reshape(1, *grid, 384))


def test_attention_of_a_register_model_covers_patches_only():
    backbone = _random_init("vit_small_patch14_reg4_dinov2.lvd142m")
    images = torch.randn(1, 3, 56, 84)
    maps = cls_attention(backbone, images)
    assert maps.shape == (1, 6, 4, 6)
    captured = {}
    for block in backbone.vit.blocks:
        block.attn.fused_attn = False  # timm's explicit softmax, captured after it
    hook = backbone.vit.blocks[-1].attn.attn_drop.register_forward_hook(
        lambda _, args, out: captured.update(attn=out)
    )
    with torch.no_grad():
        backbone(images)
    hook.remove()
    for block in backbone.vit.blocks:
        block.attn.fused_attn = True
    full = captured["attn"][:, :, 0]  # CLS row over CLS, 4 registers, 24 patches
    assert full.shape[-1] == 1 + 4 + 24
    torch.testing.assert_close(maps.flatten(2), full[:, :, 5:], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- --allow-partial (CLI)


def test_allow_partial_from_the_command_line(clip_dir, tmp_path):
    state = make_tiny_vit().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.mlp.extra"] = torch.zeros(3)
    weights = tmp_path / "partial.safetensors"
    save_backbone_safetensors(state, weights, TINY_ARCH)
    args = [
        "propagate", str(clip_dir / "frames"), "--mask", str(clip_dir / "masks" / "00000.png"),
        "--weights", str(weights), "--short-side", "64", "--device", "cpu", "--max-frames", "2",
    ]  # fmt: skip
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2, refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "missing blocks.*.mlp.fc2.bias" in errors[0]
    assert "unexpected blocks.*.mlp.extra" in errors[0] and "Traceback" not in refused.output
    partial = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "partial"), "--allow-partial"]
    )
    assert partial.exit_code == 0, partial.output
    assert "Warning: --allow-partial" in partial.output
    assert "left random: blocks.*.mlp.fc2.bias" in partial.output
    assert "ignored: blocks.*.mlp.extra" in partial.output
    spec = BackboneSpec(weights=str(weights), allow_partial=True)
    with pytest.warns(PartialWeightsWarning):
        backbone = spec.build_backbone()
    assert torch.count_nonzero(backbone.vit.blocks[1].mlp.fc2.bias) == 0  # timm's init: zeros
