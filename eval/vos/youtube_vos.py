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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dino_vos import __version__
from dino_vos.atomic import atomic_path
from dino_vos.backbones import weights_fingerprint
from dino_vos.console import console, progress_bar
from dino_vos.errors import InputError, param
from dino_vos.eval.vos.cache import FeatureCache
from dino_vos.eval.vos.dataset import frame_count
from dino_vos.features import BatchExtractor
from dino_vos.result_folder import ResultFolder
from dino_vos.runner import RunnerSettings, SequenceRunner, VideoTask
from dino_vos.sources import natural_key
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

    def task(self, keyframes: Sequence[int] | None = None) -> VideoTask:
        """Propagation from the sparse annotations (or the annotations of ``keyframes``)."""
        given = self.keyframes()
        if keyframes is not None:
            given = {index: given[index] for index in keyframes}
        return VideoTask(self.name, self.frames_dir, self.frame_names, given)


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


class YouTubeVOSDataset:
    """The videos of ``ROOT/<split>`` (or of ``ROOT`` itself when it is the split folder)."""

    def __init__(
        self, root: str | Path, split: str = "valid", videos: Sequence[str] | None = None
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.sequences = read_youtube_vos(self.root, split, videos)

    @property
    def names(self) -> list[str]:
        return [video.name for video in self.sequences]

    @property
    def inputs(self) -> list[Path]:
        return [self.root]


def read_youtube_vos(
    root: str | Path, split: str = "valid", videos: Sequence[str] | None = None
) -> list[YouTubeVOSVideo]:
    """The videos of ``ROOT/<split>`` (or of ``ROOT`` itself when it is the split folder)."""
    root = Path(root)
    folder = root / split if (root / split / "JPEGImages").is_dir() else root
    for part in ("JPEGImages", "Annotations"):
        if not (folder / part).is_dir():
            raise InputError(
                f"{folder / part} not found: {param('root')} must hold {split}/JPEGImages, "
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

    def result_folder(self) -> ResultFolder:
        return ResultFolder(self.out_dir, RUN_FORMAT, self.run_key(), (SUBMISSION_NAME,))

    def runner(self, features: BatchExtractor) -> SequenceRunner:
        """Each video forward from its sparse annotations, every frame written (the server
        expects a mask for each), features from the cache when one is given."""
        fingerprint = weights_fingerprint(features.backbone)
        cache = FeatureCache(features, self.cache_dir, fingerprint) if self.cache_dir else None
        settings = RunnerSettings(self.config, self.direction, self.overwrite, every_frame=True)
        return SequenceRunner(
            features, settings, fingerprint, cache.for_sequence if cache else None
        )


def write_submission(out_dir: Path, videos: Sequence[YouTubeVOSVideo]) -> Path:
    """``OUT/submission.zip``: ``Annotations/<video>/<frame>.png`` of every video (atomic)."""
    target = out_dir / SUBMISSION_NAME
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for video in videos:
            for name in video.frame_names:
                path = out_dir / "Annotations" / video.name / f"{name}.png"
                archive.write(path, f"Annotations/{video.name}/{name}.png")
    return target


def run_youtube_vos(job: YouTubeVOSJob) -> dict[str, Any] | None:
    """Propagate every video of the split and write the submission zip; returns the summary.

    Under torchrun every rank propagates a share of the videos balanced by frame count; rank 0
    gathers their statuses (the gather waits for every rank's masks), writes the zip and
    returns the summary (None on the other ranks).
    """
    dataset = YouTubeVOSDataset(job.root, job.split, job.videos)
    folder = job.result_folder()
    with folder.locked(dataset.inputs, job.overwrite):  # one run per folder
        return _run_locked(job, dataset, folder)


def _run_locked(
    job: YouTubeVOSJob, dataset: YouTubeVOSDataset, folder: ResultFolder
) -> dict[str, Any] | None:
    from dino_vos.distributed import gather_to_main, launch_env, shard_balanced

    videos = dataset.sequences
    rank, world = launch_env()
    if rank == 0:
        folder.claim(dataset.inputs, job.overwrite, job.cache_dir)  # a stale zip is removed
    else:
        console.quiet = True
        folder.wait_for_claim()
    mine = [videos[i] for i in shard_balanced([len(v.frame_names) for v in videos], rank, world)]
    console.print(
        f"YouTube-VOS {job.split}: {len(videos)} videos, {frame_count(dataset)} frames"
        + (f"; rank {rank} of {world}: {len(mine)} videos" if world > 1 else "")
    )
    start = time.perf_counter()
    local = _propagate_videos(job, mine)
    shards = gather_to_main(local)
    if shards is None:
        return None
    statuses = {name: status for shard in shards for name, status in shard.items()}
    statuses = {video.name: statuses[video.name] for video in videos}  # dataset order
    submission = write_submission(job.out_dir, videos)
    summary = {
        "dino_vos": __version__,
        "split": job.split,
        "videos": statuses,
        "propagated": sum(s == "propagated" for s in statuses.values()),
        "skipped": sum(s == "skipped" for s in statuses.values()),
        "seconds": round(time.perf_counter() - start, 3),
        "world_size": world,
        "submission": str(submission),
    }
    folder.complete([SUBMISSION_NAME], summary=summary)
    console.print(
        f"{summary['propagated']} videos propagated, {summary['skipped']} reused; wrote "
        f"{submission} (upload it to the YouTube-VOS server: the ground truth of "
        f"{job.split} is not public)"
    )
    return summary


def _propagate_videos(job: YouTubeVOSJob, videos: Sequence[YouTubeVOSVideo]) -> dict[str, str]:
    """Propagate (or reuse) ``videos`` here; their statuses by name."""
    runner = job.runner(job.spec.build(announce=True))
    statuses: dict[str, str] = {}
    with progress_bar("frames") as progress:
        task = progress.add_task("Propagating", total=sum(len(v.frame_names) for v in videos))
        for video in videos:
            done = progress.tasks[task].completed
            outcome = runner.run(
                video.task(),
                job.out_dir / "Annotations" / video.name,
                lambda: progress.advance(task),
                {"video": video.name},
            )
            statuses[video.name] = outcome.status
            progress.update(task, completed=done + len(video.frame_names))
    return statuses
