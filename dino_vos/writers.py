"""Output writers: indexed PNG masks, overlay video, soft probabilities.

Everything is first written into a hidden staging folder inside the output folder and moved
into place only when the whole run succeeded, followed by a ``dino-vos.json`` manifest; an
interrupted run therefore never leaves a set of outputs that looks finished.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from dino_vos.atomic import atomic_write_json
from dino_vos.errors import InputError
from dino_vos.masks import atomic_write_bytes, davis_palette, encode_indexed_png

MANIFEST_NAME = "dino-vos.json"
STAGING_NAME = ".dino-vos-partial"
ProbsFormat = Literal["npz", "safetensors"]


def is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds the manifest of a finished run."""
    return (Path(out_dir) / MANIFEST_NAME).is_file()


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())


OVERLAY_SUFFIXES = (".mp4", ".avi", ".mov")


class OutputSink:
    """Where every command's results go: a staged output folder plus an optional overlay video.

    Files are written into a hidden staging folder inside ``out_dir`` and moved into place by
    :meth:`commit`, which writes the manifest last; used as a context manager, an exception (or
    Ctrl-C) inside the block discards everything, overlay included. Propagation, attention and
    feature export all write through it.
    """

    def __init__(
        self, out_dir: str | Path, overlay: str | Path | None = None, fps: float = 25.0
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"output path {self.out_dir} is a file: give a folder for --out")
        self.overlay = Path(overlay) if overlay is not None else None
        if self.overlay is not None and self.overlay.suffix.lower() not in OVERLAY_SUFFIXES:
            raise InputError(f"overlay {self.overlay} must end in {', '.join(OVERLAY_SUFFIXES)}")
        self.staging = self.out_dir / STAGING_NAME
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.masks: list[str] = []
        self._staged_video = self.path(f"overlay{self.overlay.suffix}") if self.overlay else None
        self._video = VideoWriter(self._staged_video, fps) if self._staged_video else None

    def __enter__(self) -> OutputSink:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._close_video()
        if exc_type is not None:
            self.abort()

    def path(self, relative: str | Path) -> Path:
        """The staged location of ``relative`` (its folder is created)."""
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, relative: str | Path, data: bytes) -> None:
        atomic_write_bytes(self.path(relative), data)

    def write_mask(self, name: str, labels: np.ndarray) -> None:
        """``<name>.png``: an indexed mask with the DAVIS palette."""
        self.write_bytes(f"{name}.png", encode_indexed_png(labels))
        self.masks.append(name)

    def write_overlay(self, rgb: np.ndarray) -> None:
        """Append one RGB frame to the overlay video (if one was asked for)."""
        if self._video is not None:
            self._video.write(rgb)

    def _close_video(self) -> None:
        if self._video is not None:
            self._video.close()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Move the overlay and the staged files into place, then write the manifest (last)."""
        self._close_video()
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        if self._staged_video is not None and self.overlay is not None:
            self.overlay.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self._staged_video), str(self.overlay))
        for source in sorted(self.staging.rglob("*")):
            if source.is_file():
                target = self.out_dir / source.relative_to(self.staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
        shutil.rmtree(self.staging, ignore_errors=True)
        atomic_write_json(self.out_dir / MANIFEST_NAME, manifest)

    def abort(self) -> None:
        """Discard everything staged; remove ``out_dir`` too if this left it empty."""
        self._close_video()
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.out_dir.rmdir()  # only if it stayed empty


def blend_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB frame with object pixels blended with their palette colour and outlined."""
    colours = davis_palette()[labels]
    objects = (labels > 0) & (labels < 255)
    blended = image.astype(np.float32)
    blended[objects] = (1 - alpha) * blended[objects] + alpha * colours[objects]
    out = blended.clip(0, 255).astype(np.uint8)
    edges = cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges & objects] = colours[edges & objects]
    return out


class VideoWriter:
    """An mp4 (``mp4v``) written frame by frame to a temporary path."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps
        self._writer: cv2.VideoWriter | None = None

    def write(self, rgb: np.ndarray) -> None:
        if self._writer is None:
            height, width = rgb.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
            if not self._writer.isOpened():
                raise InputError(f"cannot write video {self.path}: check the folder and extension")
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def encode_probabilities(
    soft: torch.Tensor, object_ids: tuple[int, ...], fmt: ProbsFormat = "npz"
) -> bytes:
    """Serialise a (C, h, w) soft label map as float16 with its object ids."""
    probs = soft.detach().cpu().to(torch.float16).contiguous()
    ids = torch.tensor(object_ids, dtype=torch.int32)
    if fmt == "safetensors":
        return save_safetensors({"probs": probs, "object_ids": ids})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probs=probs.numpy(), object_ids=ids.numpy())
    return buffer.getvalue()
