"""Training checkpoints as the training loops write them load with ``weights_only=True``.

``main_dino.py`` and iBOT's ``main_ibot.py`` set each parameter group's ``lr`` and
``weight_decay`` from numpy cosine schedules at every iteration, so the optimizer state of a
real ``checkpoint.pth`` holds ``numpy.float64`` values; the run's ``args`` is an
``argparse.Namespace`` and the fp16 ``GradScaler`` state is saved too. Only the numpy globals
that rebuild plain scalars and dtypes are let through: a pickle that calls anything else is
still refused by name.
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
import timm
import torch

from dino_vos.backbones import load_backbone
from dino_vos.errors import BackboneError


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(patch_size=8, depth=2, img_size=32, embed_dim=192, num_heads=3, num_classes=0)
    return timm.create_model("vit_tiny_patch16_224", **kwargs)


def _cosine(base: float, final: float, iters: int) -> np.ndarray:
    """A numpy schedule like ``utils.cosine_scheduler`` (float64 values)."""
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(iters) / iters))


def _loop_checkpoint(path, kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Run one real training step the way the loop does and save its checkpoint.

    ``kind``: ``dino`` (main_dino.py: ``dino_loss``), ``ibot`` (main_ibot.py: ``ibot_loss``,
    ``masked_embed`` in the student) or ``dino-vos`` (pretrain/checkpoint.py's format)."""
    student, teacher = _vit(1), _vit(2)
    regularized = [p for n, p in student.named_parameters() if not n.endswith("bias")]
    not_regularized = [p for n, p in student.named_parameters() if n.endswith("bias")]
    groups = [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups)
    lr_schedule, wd_schedule = _cosine(5e-4, 1e-6, 10), _cosine(0.04, 0.4, 10)
    scaler = torch.amp.GradScaler("cpu")
    for it in range(2):  # main_dino.train_one_epoch: schedules into the groups, then a step
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        loss = student(torch.randn(2, 3, 32, 32)).pow(2).mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert isinstance(optimizer.state_dict()["param_groups"][0]["lr"], np.float64)
    args = argparse.Namespace(
        arch="vit_tiny", patch_size=8, out_dim=65536, use_fp16=True, lr=0.0005,
        weight_decay=0.04, weight_decay_end=0.4, global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.05, 0.4), local_crops_number=8, data_path="/data/train",
        output_dir="/runs/dino", seed=0, dist_url="env://",
    )  # fmt: skip
    student_state = {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
    content = {
        "student": student_state,
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "args": args,
        "fp16_scaler": scaler.state_dict(),
    }
    if kind == "ibot":
        student_state["module.backbone.masked_embed"] = torch.zeros(1, 192)
        content["ibot_loss"] = {"center": torch.zeros(1, 8192), "center2": torch.zeros(1, 8192)}
    else:
        content["dino_loss"] = {"center": torch.zeros(1, 65536)}
    if kind == "dino-vos":
        from dino_vos.pretrain.checkpoint import save_checkpoint

        content.pop("args")
        save_checkpoint(path, content)
    else:
        torch.save(content, path)
    return student, teacher


@pytest.mark.parametrize("kind", ["dino", "ibot", "dino-vos"])
def test_training_checkpoint_with_numpy_schedules_loads(tmp_path, kind):
    path = tmp_path / "checkpoint.pth"
    student, teacher = _loop_checkpoint(path, kind)
    images = torch.randn(1, 3, 32, 32)
    for key, network in (("teacher", teacher), ("student", student)):
        loaded = load_backbone(None, weights=path, checkpoint_key=key)
        with torch.no_grad():
            expected = network.eval().forward_features(images)[:, 1:].reshape(1, 4, 4, 192)
            torch.testing.assert_close(loaded(images), expected)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_numpy_allowance_is_not_a_way_in(tmp_path):
    """A numpy global that runs code (``numpy.load`` here, or ``os.system``) is still refused."""
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, path)
    with pytest.raises(BackboneError, match="needs the Python object"):
        load_backbone(None, weights=path)
    path.write_bytes(pickle.dumps({"w": np.load}, protocol=2))
    with pytest.raises(BackboneError, match="needs the Python object numpy"):
        load_backbone(None, weights=path)
