"""The checkpoint format table: every entry recognises its own layout and finds the backbone.

One example per entry of :data:`dino_vos.formats.FORMATS`, laid out as the original code lays
out its files (keys and extra entries; tensors are tiny since no model is built): the example
is recognised as that entry (the first match of the table), and the extracted state dict holds
exactly the backbone's keys. A new format needs a new example here.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from dino_vos.formats import FORMATS, detect_format, extract_backbone_weights

VIT = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.bias"]


def _state(keys: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.zeros(1) for k in keys}


def _heads(prefix: str = "") -> dict[str, torch.Tensor]:
    return _state(["head.mlp.0.weight", "head.last_layer.weight_g"], prefix)


def _training(backbone_keys: list[str] = VIT, **extra) -> dict:
    """main_dino.py / main_ibot.py / DINOv2: DDP student, teacher, both with a head."""
    return {
        "student": _state(backbone_keys, "module.backbone.") | _heads("module."),
        "teacher": _state(backbone_keys, "backbone.") | _heads(),
        "optimizer": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(arch="vit_small"),
        **extra,
    }


DINOV3 = [*VIT[2:], "storage_tokens", "mask_token", "rope_embed.periods", "cls_token"]
#: name -> (content, checkpoint_key, expected network, expected backbone keys)
EXAMPLES = {
    "dino-vos pretraining checkpoint": (_training(format="dino-vos-pretrain"), None, "teacher",
                                        VIT),
    "iBOT training checkpoint": (_training(ibot_loss={"center": torch.zeros(1)}), "student",
                                 "student", VIT),
    "DINO training checkpoint": (_training(dino_loss={"center": torch.zeros(1)}), None,
                                 "teacher", VIT),
    "DINOv2 training checkpoint": (_training([*VIT, "mask_token"]), None, "teacher",
                                   [*VIT, "mask_token"]),
    "training checkpoint": (_training(), None, "teacher", VIT),
    "MoCo v3 checkpoint": ({"arch": "vit_small", "epoch": 300, "state_dict": _state(VIT,
                           "module.base_encoder.") | _state(VIT, "module.momentum_encoder.")},
                           "momentum_encoder", "momentum_encoder", VIT),
    "state dict (entry)": ({"ema": _state(VIT), "step": 3}, "ema", "ema", VIT),
    "MAE checkpoint": ({"model": _state([*VIT, "mask_token", "decoder_embed.weight"])}, None,
                       None, VIT),
    "DINOv3 state dict": (_state(DINOV3), None, None, DINOV3),
    "DINOv2 state dict": (_state([*VIT, "mask_token"]), None, None, [*VIT, "mask_token"]),
    "state dict": (_state(VIT) | _heads(), None, None, VIT),
    "state dict in 'state_dict'": ({"state_dict": _state(VIT, "module.")}, None, None, VIT),
    "state dict in 'model'": ({"model": _state(VIT), "epoch": 3}, None, None, VIT),
    "state dict in 'backbone'": ({"backbone": _state(VIT)}, None, None, VIT),
}  # fmt: skip


def _example_name(index: int) -> str:
    name = FORMATS[index].name
    return "state dict (entry)" if name == "state dict" and index < len(FORMATS) - 4 else name


@pytest.mark.parametrize("index", range(len(FORMATS)), ids=_example_name)
def test_every_format_recognises_its_layout(index):
    fmt = FORMATS[index]
    content, key, network, keys = EXAMPLES[_example_name(index)]
    assert detect_format(content, key) is fmt
    weights = extract_backbone_weights(content, key, source="example.pth")
    assert weights.kind is fmt and weights.network == network
    assert sorted(weights.state) == sorted(keys)
    assert weights.describe().startswith(f"{fmt.name} ({network})" if network else fmt.name)


def test_every_example_names_an_entry():
    assert sorted(map(_example_name, range(len(FORMATS)))) == sorted(EXAMPLES)
