"""Shared fixtures and test doubles: tiny ViT checkpoints, a colour-feature backbone stand-in,
generated clips and DAVIS folders, the real-data location."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.cli import main
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


#: YouTube-VOS videos of :func:`write_youtube_vos`: name -> (frames, objects, {id: first frame})
YOUTUBE_VOS_VIDEOS = {
    "0a1b2c": (10, 3, {1: 0, 2: 0, 3: 4}),  # object 3 enters at the 5th frame ("00020")
    "7f8e9d": (8, 1, {1: 2}),  # no object on the first two frames
}


def write_youtube_vos(root: Path) -> dict[str, np.ndarray]:
    """``root/valid/{JPEGImages,Annotations,meta.json}`` with sparse annotations (each object on
    its first frame only, as YouTube-VOS valid); returns the held-back full ground truth."""
    split = root / "valid"
    meta: dict = {"videos": {}}
    truth = {}
    for seed, (video, (frames, objects, starts)) in enumerate(YOUTUBE_VOS_VIDEOS.items()):
        clip = make_clip(frames, (48, 80), num_objects=objects, seed=seed + 11)
        names = [f"{5 * t:05d}" for t in range(frames)]  # every 5th frame, as in valid
        gt = clip.masks.copy()
        for object_id, start in starts.items():
            gt[:start][gt[:start] == object_id] = 0  # not there yet
        (split / "JPEGImages" / video).mkdir(parents=True)
        (split / "Annotations" / video).mkdir(parents=True)
        for name, image in zip(names, clip.frames, strict=True):
            path = split / "JPEGImages" / video / f"{name}.jpg"
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        for start in sorted(set(starts.values())):
            new = [o for o, s in starts.items() if s == start]
            sparse = np.where(np.isin(gt[start], new), gt[start], 0).astype(np.uint8)
            write_indexed_png(split / "Annotations" / video / f"{names[start]}.png", sparse)
        meta["videos"][video] = {
            "objects": {
                str(o): {"category": "thing", "frames": names[s:]} for o, s in starts.items()
            }
        }
        truth[video] = gt
    (split / "meta.json").write_text(json.dumps(meta))
    return truth


#: Class colours of :func:`write_images`.
IMAGE_COLOURS = ((220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 30))


def write_images(folder: Path, per_class: int, seed: int, size: int = 40) -> None:
    """``folder/<class>/<i>.png``: noisy single-colour images with a random darker stripe."""
    rng = np.random.default_rng(seed)
    for label, colour in enumerate(IMAGE_COLOURS):
        class_dir = folder / f"class{label}"
        class_dir.mkdir(parents=True)
        for i in range(per_class):
            image = np.asarray(colour, np.float32) + rng.normal(0, 25, (size, size, 3))
            row = rng.integers(0, size - 8)
            image[row : row + 8] *= 0.6
            rgb = np.clip(image, 0, 255).astype(np.uint8)
            cv2.imwrite(str(class_dir / f"{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` -> a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def propagate(source: Path, mask: Path, out: Path, weights: Path, *extra: object):
    """``dino-vos propagate`` with a tiny checkpoint on the CPU at a 64 px short side."""
    args = ["propagate", source, "--mask", mask, "--out", out, "--weights", weights]
    args += ["--short-side", "64", "--device", "cpu", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, message: str) -> None:
    """One ``Error:`` line holding ``message``, exit code 2, before any model loaded."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Backbone:" not in result.output  # refused before a model was loaded
    assert "Traceback" not in result.output
