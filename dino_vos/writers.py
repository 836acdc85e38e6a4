"""Output writers: indexed PNG masks, overlay video, soft probabilities.

Everything is first written into a hidden staging folder inside the output folder and moved
into place only when the whole run succeeded, followed by a ``dino-vos.json`` manifest; an
interrupted run therefore never leaves a set of outputs that looks finished (the output rules
are in :mod:`dino_vos.outputs`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from dino_vos.atomic import atomic_path, atomic_write_json, deferred_interrupts
from dino_vos.errors import InputError, param
from dino_vos.masks import atomic_write_bytes, davis_palette, encode_indexed_png
from dino_vos.outputs import (
    BACKUP_NAME,
    JOURNAL_NAME,
    MANIFEST_NAME,
    STAGING_NAME,
    acquire_output_lock,
    check_outputs,
    entry_problem,
    note,
    overlay_record,
    read_manifest,
    release_output_lock,
    remove_stale_staging,
    trusted_outputs,
    warn,
)

ProbsFormat = Literal["npz", "safetensors"]


class OutputSink:
    """Where every command's results go: a staged output folder plus an optional overlay video.

    The sink holds the folder's lock (:func:`dino_vos.outputs.locked_output`) from its creation
    to its commit or abort: a second run into the same folder is refused. Files are written into
    a hidden staging folder inside ``out_dir``; :meth:`commit` swaps them in and writes the
    manifest (which lists them under ``outputs``) last. The folder is always either the previous
    complete result or the new one: the previous result's files move to a backup first and come
    back if anything fails (Ctrl-C included: the rollback itself cannot be interrupted), and an
    interrupted commit is undone by the next run (:func:`dino_vos.outputs.remove_stale_staging`).
    Files that dino-vos did not write are never replaced, a manifest entry that would leave the
    folder is ignored, and a non-empty folder that is not a dino-vos result is refused unless
    ``overwrite``. The overlay video is written next to its destination's file system and
    renamed into place, never copied. Used as a context manager, an exception (or Ctrl-C) inside
    the block discards everything staged. Propagation, attention and feature export all write
    through it.
    """

    def __init__(
        self,
        out_dir: str | Path,
        overlay: str | Path | None = None,
        fps: float = 25.0,
        overwrite: bool = False,
        inputs: Sequence[str | Path] = (),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.overlay = Path(overlay) if overlay is not None else None
        self._locked = False
        self._staged_video: Path | None = None
        self._video: VideoWriter | None = None
        self.staging = self.out_dir / STAGING_NAME
        self.masks: list[str] = []
        acquire_output_lock(self.out_dir, inputs=inputs)
        self._locked = True
        try:
            remove_stale_staging(self.out_dir, note)
            check_outputs(self.out_dir, self.overlay, inputs, overwrite)
            self.staging.mkdir(parents=True)
            if self.overlay is not None:
                self._staged_video = self._overlay_stage(self.overlay)
                self._video = VideoWriter(self._staged_video, fps)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> OutputSink:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self._close_video()
        self._release()

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            release_output_lock(self.out_dir)

    def _overlay_stage(self, overlay: Path) -> Path:
        """Where the overlay is written: in the staging folder when that is on the overlay's file
        system, else a hidden temporary file beside it (so the commit is a rename either way)."""
        existing = overlay.parent
        while not existing.exists():
            existing = existing.parent
        if existing.stat().st_dev == self.staging.stat().st_dev:
            return self.path(f"overlay{overlay.suffix}")
        overlay.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{overlay.name}.dino-vos-", suffix=overlay.suffix, dir=overlay.parent
        )
        os.close(fd)
        return Path(tmp)

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

    def _staged_files(self) -> list[str]:
        return sorted(
            path.relative_to(self.staging).as_posix()
            for path in self.staging.rglob("*")
            if path.is_file() and path != self._staged_video
        )

    def _blocked(self, new_files: list[str], ours: set[str]) -> str | None:
        """The first new file that must not be written: a path through a symlink, or an
        existing file that dino-vos did not write."""
        for name in new_files:
            target = self.out_dir / name
            problem = entry_problem(self.out_dir, name)
            if problem is not None and not (problem == "a symlink" and not target.exists()):
                return f"{target} {problem} and is not written: choose an empty {param('out_dir')}"
            if (target.exists() or target.is_symlink()) and name not in ours:
                return (
                    f"{target} was not written by dino-vos and is not replaced: choose an "
                    f"empty {param('out_dir')}"
                )
        return None

    def commit(self, manifest: dict[str, Any]) -> None:
        """Swap the staged files in (the previous result's files out), write the manifest, then
        rename the overlay into place; any failure puts the previous result back."""
        self._close_video()
        new_files = self._staged_files()
        previous = read_manifest(self.out_dir)
        # A manifest of an older dino-vos without a file list: its same-named files are ours.
        listed = previous if "outputs" in previous else {"outputs": new_files}
        ours = trusted_outputs(self.out_dir, listed, warn) if previous else set()
        blocked = self._blocked(new_files, ours)
        if blocked:
            raise InputError(blocked)
        if self.overlay is not None:
            manifest = {**manifest, "overlay": overlay_record(self.overlay)}
        backup = self.out_dir / BACKUP_NAME
        moved_out: list[str] = []
        moved_in: list[str] = []
        wrote_manifest = False
        try:
            shutil.rmtree(backup, ignore_errors=True)
            backup.mkdir()
            # the journal says which files move in, and whether they have started to
            atomic_write_json(backup / JOURNAL_NAME, {"moving": "out", "new_files": new_files})
            for name in [MANIFEST_NAME, *sorted(ours)]:  # the manifest first: not finished now
                if (self.out_dir / name).is_file():
                    _move(self.out_dir / name, backup / name)
                    moved_out.append(name)
            atomic_write_json(backup / JOURNAL_NAME, {"moving": "in", "new_files": new_files})
            for name in new_files:
                _move(self.staging / name, self.out_dir / name)
                moved_in.append(name)
            atomic_write_json(self.out_dir / MANIFEST_NAME, {**manifest, "outputs": new_files})
            wrote_manifest = True
            staged, overlay = self._staged_video, self.overlay
            if staged is not None and overlay is not None and staged.is_file():
                _place_overlay(staged, overlay)
        except BaseException:
            with deferred_interrupts():  # a second Ctrl-C must not stop the rollback
                if wrote_manifest and MANIFEST_NAME not in moved_out:
                    (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
                for name in moved_in:
                    with contextlib.suppress(OSError):
                        (self.out_dir / name).unlink()
                for name in moved_out:
                    with contextlib.suppress(OSError):
                        _move(backup / name, self.out_dir / name)
                shutil.rmtree(backup, ignore_errors=True)
            raise
        with deferred_interrupts():
            shutil.rmtree(backup, ignore_errors=True)
            shutil.rmtree(self.staging, ignore_errors=True)
            _remove_empty_folders(self.out_dir, {name for name in ours if name not in new_files})
            self._release()

    def abort(self) -> None:
        """Discard everything staged; remove ``out_dir`` too if this left it empty. Ctrl-C
        cannot cut this short (it is delivered when the cleanup is done)."""
        with deferred_interrupts():
            with contextlib.suppress(Exception):  # a video that cannot be finished is dropped
                self._close_video()
            self._video = None
            shutil.rmtree(self.staging, ignore_errors=True)
            staged = self._staged_video
            if staged is not None and self.staging not in staged.parents:
                staged.unlink(missing_ok=True)  # the temporary overlay on another file system
            self._release()
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only if it stayed empty


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def _place_overlay(staged: Path, overlay: Path) -> None:
    """Rename the finished overlay over its destination (staged on its file system: never a
    copy). Should the rename still cross devices (a bind mount), the copy goes to a temporary
    file beside the destination first: the previous overlay stays if the copy fails."""
    try:
        os.replace(staged, overlay)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(overlay, suffix=overlay.suffix) as tmp:
            shutil.copyfile(staged, tmp)


def _remove_empty_folders(root: Path, removed: set[str]) -> None:
    """Remove the folders that obsolete outputs left empty (never ``root`` itself)."""
    for name in sorted(removed, key=lambda n: -n.count("/")):
        folder = (root / name).parent
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


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
            fourcc = cv2.VideoWriter.fourcc(*"mp4v")
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
