"""``eval youtube-vos``: predictions for a YouTube-VOS split in the layout its server accepts.

The split folder holds ``JPEGImages/<video>/<frame>.jpg``, sparse
``Annotations/<video>/<frame>.png`` (each object's mask on the frame where it first appears,
used as keyframes) and ``meta.json`` (``videos/<video>/objects/<id>: {category, frames}``).
Every video is propagated forward (objects start on their first annotated frame, see
docs/protocol.md#keyframes) into ``OUT/Annotations/<video>/``: one PNG per frame of
``JPEGImages`` (empty masks before the first object), in the DAVIS palette that YouTube-VOS
annotations use, with a per-video manifest. A video whose manifest matches the run is reused,
so an interrupted run resumes. Last, ``OUT/submission.zip`` holds
``Annotations/<video>/<frame>.png`` of every video, ready to upload. The ground truth of
``valid`` is hidden: scoring happens on the server.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dino_vos import __version__
from dino_vos.api import propagate_to_folder
from dino_vos.atomic import atomic_path, atomic_write_json
from dino_vos.backbones import weights_fingerprint
from dino_vos.console import console, progress_bar
from dino_vos.errors import InputError
from dino_vos.eval.cache import FeatureCache, feature_settings
from dino_vos.features import BackboneFeatures
from dino_vos.outputs import (
    MANIFEST_NAME,
    check_not_an_input,
    check_out_dir,
    check_writable,
    is_reusable_result,
    locked_output,
    read_manifest,
)
from dino_vos.sources import FolderSource, natural_key
from dino_vos.spec import BackboneSpec, Direction, PropagationConfig

RUN_FORMAT = "dino-vos-youtube-vos"
SUBMISSION_NAME = "submission.zip"


@dataclass(frozen=True)
class YouTubeVOSVideo:
    """One video: its frame folder, frame names, sparse annotations and objects' frames."""

    name: str
    frames_dir: Path
    frame_names: tuple[str, ...]
    annotations: tuple[Path, ...]  # sparse keyframes, in frame order
    objects: dict[int, tuple[str, ...]] = field(default_factory=dict)  # meta.json frames

    def keyframes(self) -> dict[int, Path]:
        """Frame index -> annotation file."""
        index = {name: i for i, name in enumerate(self.frame_names)}
        return {index[path.stem]: path for path in self.annotations}


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        return dict(meta["videos"])
    except FileNotFoundError:
        raise InputError(f"{path} not found: give the split folder that holds meta.json") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{path} is not a YouTube-VOS meta.json ({exc.__class__.__name__}: {exc}): expected "
            '{"videos": {"<video>": {"objects": {...}}}}'
        ) from None


def read_youtube_vos(
    root: str | Path, split: str = "valid", videos: Sequence[str] | None = None
) -> list[YouTubeVOSVideo]:
    """The videos of ``ROOT/<split>`` (or of ``ROOT`` itself when it is the split folder)."""
    root = Path(root)
    folder = root / split if (root / split / "JPEGImages").is_dir() else root
    for part in ("JPEGImages", "Annotations"):
        if not (folder / part).is_dir():
            raise InputError(
                f"{folder / part} not found: --root must hold {split}/JPEGImages, "
                f"{split}/Annotations and {split}/meta.json"
            )
    meta = _read_meta(folder / "meta.json")
    names = list(videos) if videos else sorted(meta, key=natural_key)
    unknown = [name for name in names if name not in meta]
    if unknown:
        raise InputError(f"video {unknown[0]} is not in {folder / 'meta.json'}")
    result = []
    for name in names:
        frames_dir = folder / "JPEGImages" / name
        frame_names = tuple(
            sorted((p.stem for p in frames_dir.glob("*.jpg")), key=natural_key)
            if frames_dir.is_dir()
            else ()
        )
        if not frame_names:
            raise InputError(f"{frames_dir} has no .jpg frames: is the split complete?")
        annotations = tuple(
            sorted((folder / "Annotations" / name).glob("*.png"), key=lambda p: natural_key(p.stem))
        )
        if not annotations:
            raise InputError(f"{folder / 'Annotations' / name} has no annotation PNG")
        stray = [p.name for p in annotations if p.stem not in frame_names]
        if stray:
            raise InputError(f"annotation {name}/{stray[0]} names no frame of {frames_dir}")
        objects = {
            int(object_id): tuple(entry.get("frames", ()))
            for object_id, entry in meta[name].get("objects", {}).items()
        }
        result.append(YouTubeVOSVideo(name, frames_dir, frame_names, annotations, objects))
    return result


@dataclass(frozen=True)
class YouTubeVOSJob:
    """One ``eval youtube-vos`` run."""

    root: Path
    out_dir: Path
    spec: BackboneSpec
    split: str = "valid"
    videos: tuple[str, ...] | None = None
    config: PropagationConfig = field(default_factory=PropagationConfig)
    direction: Direction = "forward"
    cache_dir: Path | None = None
    overwrite: bool = False

    def run_key(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "videos": list(self.videos) if self.videos else None,
            "spec": asdict(self.spec),
            "propagation": self.config.to_dict(),
            "direction": self.direction,
        }


def is_youtube_vos_result(folder: Path) -> bool:
    return read_manifest(folder).get("format") == RUN_FORMAT


class VideoWriter:
    """Propagates one video into ``OUT/Annotations/<video>/`` unless it is already there."""

    def __init__(self, job: YouTubeVOSJob, features: BackboneFeatures) -> None:
        self.job = job
        self.features = features
        self.fingerprint = weights_fingerprint(features.backbone)
        self.cache = (
            FeatureCache(features, job.cache_dir, self.fingerprint) if job.cache_dir else None
        )

    def folder(self, video: YouTubeVOSVideo) -> Path:
        return self.job.out_dir / "Annotations" / video.name

    def expected_manifest(self, video: YouTubeVOSVideo) -> dict[str, Any]:
        return {
            "frames": len(video.frame_names),
            "keyframes": [p.stem for p in video.annotations],
            "direction": self.job.direction,
            "propagation": self.job.config.to_dict(),
            **feature_settings(self.features, self.fingerprint),
        }

    def is_up_to_date(self, video: YouTubeVOSVideo) -> bool:
        expected = self.expected_manifest(video)
        return is_reusable_result(self.folder(video), expected, video.frame_names)

    def write(self, video: YouTubeVOSVideo, on_frame: Callable[[], None]) -> str:
        """Propagate ``video`` (or reuse it); returns "propagated" or "skipped"."""
        if self.is_up_to_date(video):
            return "skipped"
        extractor = self.cache.for_sequence(video.name) if self.cache else self.features
        propagate_to_folder(
            FolderSource(video.frames_dir),
            video.keyframes(),
            self.folder(video),
            extractor,
            self.job.config,
            on_frame=lambda _: on_frame(),
            metadata={**self.expected_manifest(video), "video": video.name},
            overwrite=self.job.overwrite,
            direction=self.job.direction,
            every_frame=True,
        )
        return "propagated"


def write_submission(out_dir: Path, videos: Sequence[YouTubeVOSVideo]) -> Path:
    """``OUT/submission.zip``: ``Annotations/<video>/<frame>.png`` of every video (atomic)."""
    target = out_dir / SUBMISSION_NAME
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for video in videos:
            for name in video.frame_names:
                path = out_dir / "Annotations" / video.name / f"{name}.png"
                archive.write(path, f"Annotations/{video.name}/{name}.png")
    return target


def run_youtube_vos(job: YouTubeVOSJob) -> dict[str, Any]:
    """Propagate every video of the split and write the submission zip; returns the summary."""
    videos = read_youtube_vos(job.root, job.split, job.videos)
    check_out_dir(job.out_dir, [job.root], job.overwrite, is_previous_result=is_youtube_vos_result)
    with locked_output(job.out_dir, inputs=[job.root]):  # one run per folder
        return _run_locked(job, videos)


def _run_locked(job: YouTubeVOSJob, videos: Sequence[YouTubeVOSVideo]) -> dict[str, Any]:
    out = job.out_dir
    check_out_dir(out, [job.root], job.overwrite, is_previous_result=is_youtube_vos_result)
    if job.cache_dir is not None:
        check_not_an_input(job.cache_dir, [job.root], "--cache")
        check_writable(job.cache_dir, "--cache")
    previous = read_manifest(out) if is_youtube_vos_result(out) else {}
    if previous and previous.get("run") != job.run_key():
        (out / SUBMISSION_NAME).unlink(missing_ok=True)  # of other settings: never stale
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": RUN_FORMAT, "status": "running", "run": job.run_key(), "outputs": []}
    atomic_write_json(out / MANIFEST_NAME, manifest)
    frames = sum(len(v.frame_names) for v in videos)
    console.print(f"YouTube-VOS {job.split}: {len(videos)} videos, {frames} frames")
    writer = VideoWriter(job, job.spec.build(announce=True))
    statuses: dict[str, str] = {}
    start = time.perf_counter()
    with progress_bar("frames") as progress:
        task = progress.add_task("Propagating", total=frames)
        for video in videos:
            done = progress.tasks[task].completed
            statuses[video.name] = writer.write(video, lambda: progress.advance(task))
            progress.update(task, completed=done + len(video.frame_names))
    submission = write_submission(out, videos)
    summary = {
        "dino_vos": __version__,
        "split": job.split,
        "videos": statuses,
        "propagated": sum(s == "propagated" for s in statuses.values()),
        "skipped": sum(s == "skipped" for s in statuses.values()),
        "seconds": round(time.perf_counter() - start, 3),
        "submission": str(submission),
    }
    atomic_write_json(
        out / MANIFEST_NAME,
        {**manifest, "status": "complete", "outputs": [SUBMISSION_NAME], "summary": summary},
    )
    console.print(
        f"{summary['propagated']} videos propagated, {summary['skipped']} reused; wrote "
        f"{submission} (upload it to the YouTube-VOS server: the ground truth of "
        f"{job.split} is not public)"
    )
    return summary
