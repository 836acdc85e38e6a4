"""Shared fixtures and test doubles: tiny ViT checkpoints, a colour-feature backbone stand-in,
generated clips and DAVIS folders, the real-data location."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.masks import write_indexed_png
from dino_vos.sources import Frame
from dino_vos.spec import BackboneSpec, ResizeSpec
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


@pytest.fixture
def one_thread():
    """One intra-op thread: faster on a shared 2-core machine, and reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(weights: Path, **options: Any) -> BackboneSpec:
    """The spec of a tiny checkpoint on the CPU at a 64 px short side (``options`` on top)."""
    return BackboneSpec(**{"weights": str(weights), "resize": ResizeSpec(64), "device": "cpu",
                           **options})  # fmt: skip


class ColourFeatures:
    """A backbone stand-in: per-patch mean colour, centred (known, discriminative features)."""

    patch_size = 2

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return height - height % 2, width - width % 2

    def __call__(self, frame: Frame) -> torch.Tensor:
        h, w = self.input_size(*frame.image.shape[:2])
        image = torch.from_numpy(frame.image[:h, :w]).float().permute(2, 0, 1) / 255 - 0.45
        return F.avg_pool2d(image[None], 2)[0].permute(1, 2, 0)


#: DAVIS sequences of :func:`write_davis`: name -> (annotation style, objects, frames, (H, W))
DAVIS_SEQUENCES = {
    "alpha": (2017, 2, 8, (48, 80)),
    "beta": (2016, 1, 7, (48, 80)),
    "gamma": (2017, 3, 40, (72, 120)),  # long enough to be killed mid-sequence
}


def write_davis(root: Path, sequences: dict = DAVIS_SEQUENCES, split: str | None = "val") -> Path:
    """A DAVIS layout: JPEG frames, 2016 grayscale or 2017 indexed annotations, a split file."""
    for index, (name, (style, objects, frames, size)) in enumerate(sequences.items()):
        clip = make_clip(frames, size, num_objects=objects, seed=index + 1)
        frame_dir = root / "JPEGImages" / "480p" / name
        mask_dir = root / "Annotations" / "480p" / name
        frame_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for t, (frame, mask) in enumerate(zip(clip.frames, clip.masks, strict=True)):
            cv2.imwrite(str(frame_dir / f"{t:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            if style == 2016:
                gray = np.where(mask > 0, 255, 0).astype(np.uint8)
                Image.fromarray(gray, mode="L").save(mask_dir / f"{t:05d}.png")
            else:
                write_indexed_png(mask_dir / f"{t:05d}.png", mask)
    if split is not None:
        (root / "ImageSets" / "2017").mkdir(parents=True)
        (root / "ImageSets" / "2017" / f"{split}.txt").write_text("\n".join(sequences) + "\n")
    return root


def davis_args(root: Path, weights: Path, out: Path, *extra: object) -> list[object]:
    """``dino-vos eval davis`` arguments for a tiny checkpoint on :func:`write_davis` data."""
    return [
        "--davis-root", root, "--weights", weights, "--short-side", 64, "--device", "cpu",
        "--out", out, *extra,
    ]  # fmt: skip
