"""One video at a time for every multi-video job: propagate unless the result is already there.

DAVIS, YouTube-VOS, sweeps and batches describe each video as a :class:`VideoTask` (its frames,
the result names, the keyframe masks) and hand it to one :class:`SequenceRunner`, which writes
``OUT/<video>/`` through :func:`dino_vos.api.propagate_to_folder` (staged outputs, manifest
last) unless a finished result with the same manifest entries (:meth:`expected_manifest`: frame
count, keyframes, direction, propagation parameters and the extractor's ``settings()``) and every
result PNG is there. A killed job therefore resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_vos.outputs import is_reusable_result
from dino_vos.spec import Direction, PropagationConfig

if TYPE_CHECKING:  # the dataset readers use VideoTask without loading torch
    from dino_vos.features import BatchExtractor, FeatureExtractor


@dataclass(frozen=True)
class VideoTask:
    """One video to propagate: a frame folder or video file, the names of its result PNGs (its
    frames, in order) and the keyframes (frame index -> mask file)."""

    name: str
    source: Path
    frame_names: tuple[str, ...]
    keyframes: Mapping[int, Path]
    limit: int | None = None  # only the first N frames of the source

    @property
    def keyframe_names(self) -> list[str]:
        return [self.frame_names[index] for index in sorted(self.keyframes)]


@dataclass(frozen=True)
class RunnerSettings:
    """How every video of a job is propagated (picklable: worker processes receive it)."""

    config: PropagationConfig
    direction: Direction = "forward"
    overwrite: bool = False  # allow result folders that are not dino-vos results
    complete_keyframes: bool = False  # keyframes are ground truth showing every object
    every_frame: bool = False  # frames no direction reaches get an empty mask


@dataclass(frozen=True)
class RunOutcome:
    """What :meth:`SequenceRunner.run` did: "propagated" or "skipped" (a matching result)."""

    status: str
    frames: int = 0  # frames propagated now
    seconds: float = 0.0


class SequenceRunner:
    """Propagates :class:`VideoTask` s with one backbone and one set of settings."""

    def __init__(
        self,
        features: BatchExtractor,
        settings: RunnerSettings,
        fingerprint: str | None = None,
        extractor_for: Callable[[str], FeatureExtractor] | None = None,
    ) -> None:
        from dino_vos.backbones import weights_fingerprint

        self.features = features
        self.settings = settings
        self.fingerprint = fingerprint or weights_fingerprint(features.backbone)
        # the extractor of one video (a feature cache's view of it), default the backbone's
        self.extractor_for = extractor_for or (lambda _: features)

    def expected_manifest(self, task: VideoTask) -> dict[str, Any]:
        """Manifest entries a finished, reusable propagation of ``task`` holds."""
        return {
            "frames": len(task.frame_names),
            "keyframes": task.keyframe_names,
            "direction": self.settings.direction,
            "propagation": self.settings.config.to_dict(),
            **self.features.settings(self.fingerprint),
        }

    def is_up_to_date(self, task: VideoTask, out_dir: Path) -> bool:
        return is_reusable_result(out_dir, self.expected_manifest(task), task.frame_names)

    def run(
        self,
        task: VideoTask,
        out_dir: Path,
        on_frame: Callable[[], None] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> RunOutcome:
        """Propagate ``task`` into ``out_dir`` unless an up-to-date result is there."""
        from dino_vos.api import propagate_to_folder
        from dino_vos.sources import open_source

        if self.is_up_to_date(task, out_dir):
            return RunOutcome("skipped")
        summary = propagate_to_folder(
            open_source(task.source, limit=task.limit),
            dict(task.keyframes),
            out_dir,
            self.extractor_for(task.name),
            self.settings.config,
            on_frame=(lambda _: on_frame()) if on_frame else None,
            metadata={**self.expected_manifest(task), **(metadata or {})},
            overwrite=self.settings.overwrite,
            direction=self.settings.direction,
            complete_keyframes=self.settings.complete_keyframes,
            every_frame=self.settings.every_frame,
        )
        return RunOutcome("propagated", len(task.frame_names), summary.seconds)


# --- worker processes ---------------------------------------------------------------------------

_progress_queue: Any = None


def report_frame() -> None:
    """Called in a worker process for every frame it finishes (progress of the main process)."""
    if _progress_queue is not None:
        _progress_queue.put(1)


_busy = False  # a worker process is inside an item's function


def _on_terminate(signum: int, frame: Any) -> None:
    """SIGTERM in a worker (SLURM, ``kill`` of the process group): like Ctrl-C, the item in
    hand unwinds (its staged outputs are removed) and the worker then exits; an idle worker
    exits at once."""
    if _busy:
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _call_item(function: Callable[[Any], Any], item: Any) -> Any:
    """``function(item)`` in a worker; an interrupt ends the worker once the item unwound
    (the pool would otherwise hand it the next item)."""
    import signal

    global _busy
    _busy = True
    try:
        return function(item)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGTERM)
    finally:
        _busy = False


def _init_process(
    threads: int, queue: Any, initializer: Callable[..., None], initargs: tuple[Any, ...]
) -> None:
    import signal

    import torch

    global _progress_queue
    signal.signal(signal.SIGTERM, _on_terminate)
    torch.set_num_threads(threads)
    _progress_queue = queue
    initializer(*initargs)


def _drain(queue: Any, advance: Callable[[int], None]) -> None:
    count = 0
    while not queue.empty():
        queue.get_nowait()
        count += 1
    if count:
        advance(count)


def map_in_processes(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    costs: Sequence[int],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...] = (),
    advance: Callable[[int], None] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``function(item)`` for every item in ``workers`` spawned processes (each set up once by
    ``initializer(*initargs)``, its torch threads shared out), the costliest items first;
    results in the items' order. Frames reported by :func:`report_frame` reach ``advance``;
    ``on_result(index, result)`` is called in the main process as results arrive. SIGTERM
    to the process group (SLURM) makes every worker unwind its item like Ctrl-C and exit."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    advance = advance or (lambda _: None)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = min(workers, len(items))
    threads = max(1, torch.get_num_threads() // workers)
    order = sorted(range(len(items)), key=lambda i: -costs[i])
    results: list[Any] = [None] * len(items)
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_process,
        initargs=(threads, queue, initializer, initargs),
    ) as pool:
        futures = {pool.submit(_call_item, function, items[i]): i for i in order}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(queue, advance)
                for future in done:
                    index = futures[future]
                    results[index] = future.result()
                    if on_result is not None:
                        on_result(index, results[index])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(queue, advance)
    return results
