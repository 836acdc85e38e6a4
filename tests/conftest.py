"""Shared fixtures: tiny ViT checkpoints, generated clips, the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.synthetic import make_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_ARCH = {
    "model": "vit_tiny_patch16_224",
    "kwargs": {"patch_size": 8, "depth": 2, "img_size": 64, "embed_dim": 48, "num_heads": 3},
}

#: ``--set`` overrides that shrink the cpu_tiny pretraining preset for tests (1 block, 32/16 px
#: crops, a small head).
PRETRAIN_TINY_OVERRIDES = [
    "student.kwargs={patch_size: 8, depth: 1, embed_dim: 48, num_heads: 3, img_size: 32}",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.local_number=2",
    "head.out_dim=64",
    "head.hidden_dim=32",
    "head.bottleneck_dim=16",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run tests marked slow (CI runs them: it sets CI=true)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (long end-to-end checks) run in CI or with --run-slow only."""
    if config.getoption("--run-slow") or os.environ.get("CI", "").lower() in ("1", "true"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def requires_shared_data(*parts: str):
    """Skip a test (with a message) when ../shared/data (or a path inside it) is absent."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"real data not found at {path}")


def make_tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_ARCH["model"], num_classes=0, **TINY_ARCH["kwargs"])


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random-init tiny ViT (patch 8) saved as dino-vos safetensors with its architecture."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_backbone_safetensors(make_tiny_vit().state_dict(), path, TINY_ARCH)
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A generated 6-frame clip: frames/, masks/ (ids 3 and 7) and clip.mp4."""
    folder = tmp_path_factory.mktemp("clip")
    clip = make_clip(6, (72, 104), num_objects=2, seed=3, object_ids=(3, 7))
    clip.write(folder, video=folder / "clip.mp4")
    return folder
