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

from dino_vos.errors import DinoVosError
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
_in_hand: Any = None  # shared bytes, one per item: 1 once a worker took it


def _on_terminate(signum: int, frame: Any) -> None:
    """SIGTERM in a worker (SLURM, ``kill`` of the process group): like Ctrl-C, the item in
    hand unwinds (its staged outputs are removed) and the worker then exits; an idle worker
    exits at once."""
    if _busy:
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _call_item(function: Callable[[Any], Any], item: Any, index: int) -> Any:
    """``function(item)`` in a worker; an interrupt ends the worker once the item unwound
    (the pool would otherwise hand it the next item). The item's flag in shared memory says
    it is in hand, so the main process knows what a worker that dies took with it."""
    import signal

    global _busy
    _busy = True
    if _in_hand is not None:
        _in_hand[index] = 1
    try:
        return function(item)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGTERM)
    finally:
        _busy = False


def _init_process(
    threads: int,
    queue: Any,
    in_hand: Any,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> None:
    import signal

    import torch

    global _progress_queue, _in_hand
    signal.signal(signal.SIGTERM, _on_terminate)
    torch.set_num_threads(threads)
    _progress_queue = queue
    _in_hand = in_hand
    initializer(*initargs)


class WorkerLostError(DinoVosError):
    """A worker process died (a signal, the out-of-memory killer) on the same item again."""


#: A worker process that dies breaks its pool: the items then in hand run again in a new pool;
#: an item in hand at this many deaths is given up (``on_lost``, else :class:`WorkerLostError`).
LOST_ATTEMPTS = 2


def _drain(queue: Any, advance: Callable[[int], None]) -> None:
    count = 0
    while not queue.empty():
        count += queue.get_nowait()
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
    on_lost: Callable[[int, str], Any] | None = None,
) -> list[Any]:
    """``function(item)`` for every item in ``workers`` spawned processes (each set up once by
    ``initializer(*initargs)``, its torch threads shared out), the costliest items first;
    results in the items' order. Frames reported by :func:`report_frame` reach ``advance``;
    ``on_result(index, result)`` is called in the main process as results arrive. SIGTERM
    to the process group (SLURM) makes every worker unwind its item like Ctrl-C and exit.

    A worker that dies (SIGKILL, out of memory) does not stop the others' finished work: the
    items then in hand run again in new processes, and an item in hand at
    :data:`LOST_ATTEMPTS` deaths gets ``on_lost(index, message)`` as its result (without
    ``on_lost``: :class:`WorkerLostError`)."""
    import torch

    workers = min(workers, len(items))
    threads = max(1, torch.get_num_threads() // workers)
    results: dict[int, Any] = {}
    deaths: dict[int, int] = {}  # per item: pools broken while a worker held it
    startup_deaths = 0  # pools broken while no worker held an item
    remaining = sorted(range(len(items)), key=lambda i: -costs[i])

    def record(index: int, result: Any) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    while remaining:
        lost = _run_pool(
            function,
            items,
            remaining,
            workers,
            (threads, initializer, initargs),
            advance or (lambda _: None),
            record,
        )
        if lost is None:
            break
        if not lost:  # died while starting (loading the backbone), holding no item
            startup_deaths += 1
            if startup_deaths >= LOST_ATTEMPTS:
                raise WorkerLostError(
                    "worker processes died before taking an item (killed, for example by the "
                    "out-of-memory killer, while loading): use fewer workers"
                )
        for index in lost:
            deaths[index] = deaths.get(index, 0) + 1
            if deaths[index] >= LOST_ATTEMPTS:
                message = (
                    f"its worker process died {deaths[index]} times (killed, for example by the "
                    "out-of-memory killer): run it with fewer workers or more memory"
                )
                if on_lost is None:
                    raise WorkerLostError(f"{_label(items[index], index)}: {message}")
                record(index, on_lost(index, message))
        remaining = [index for index in remaining if index not in results]
    return [results[index] for index in range(len(items))]


def _label(item: Any, index: int) -> str:
    """How an error names an item: its ``name`` or ``id``, a string or path as it is."""
    if isinstance(item, str | Path):
        return str(item)
    return str(getattr(item, "name", None) or getattr(item, "id", None) or f"item {index}")


def _run_pool(
    function: Callable[[Any], Any],
    items: Sequence[Any],
    order: Sequence[int],
    workers: int,
    setup: tuple[int, Callable[..., None], tuple[Any, ...]],
    advance: Callable[[int], None],
    record: Callable[[int, Any], None],
) -> set[int] | None:
    """Run ``order`` in one pool: None when done, the items in hand when a worker died."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    threads, initializer, initargs = setup
    in_hand = context.RawArray("b", len(items))  # no lock: a killed worker holds none
    with ProcessPoolExecutor(
        min(workers, len(order)),
        mp_context=context,
        initializer=_init_process,
        initargs=(threads, queue, in_hand, initializer, initargs),
    ) as pool:
        futures = {pool.submit(_call_item, function, items[i], i): i for i in order}
        pending, recorded = set(futures), set()
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(queue, advance)
                broken = False
                for future in done:
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken = True
                        continue
                    record(futures[future], future.result())
                    recorded.add(futures[future])
                if broken:
                    _drain(queue, advance)
                    return {i for i in order if in_hand[i] and i not in recorded}
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(queue, advance)
    return None
