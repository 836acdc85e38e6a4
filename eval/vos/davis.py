"""DAVIS benchmark runner: propagate every sequence with the engine, score it, merge the scores.

- One sequence = :func:`dino_vos.api.propagate_to_folder` into ``OUT/<seq>/`` (staged outputs, a
  ``dino-vos.json`` manifest written last), then J&F of its PNGs against the annotations. A
  sequence whose manifest exists and records the same backbone weights, resize rule, propagation
  parameters and frame count is not propagated again; anything else is redone.
- ``workers > 1`` runs sequences in spawned processes (each builds the same backbone from a
  :class:`BackboneSpec`); under ``torchrun`` (``RANK``/``WORLD_SIZE``) every rank takes a shard
  balanced by frame count and rank 0 gathers the scores over a gloo process group.
- Scoring only (``results_dir`` without propagation) reads ``RESULTS/<seq>/<stem>.png`` like the
  official tool.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dino_vos.api import propagate_to_folder
from dino_vos.backbones import weights_fingerprint
from dino_vos.distributed import gather_to_main, launch_env, shard_balanced
from dino_vos.errors import DinoVosError, InputError
from dino_vos.eval.davis_metrics import BOUNDARY_THRESHOLD, ObjectScores, score_frames
from dino_vos.eval.vos.cache import CacheStats, FeatureCache, feature_settings
from dino_vos.eval.vos.davis_data import DavisSequence, read_results
from dino_vos.features import BackboneFeatures
from dino_vos.masks import read_mask
from dino_vos.outputs import is_reusable_result
from dino_vos.propagation import PropagationConfig
from dino_vos.sources import FolderSource
from dino_vos.spec import BackboneSpec, Direction, KeyframeSchedule


@dataclass
class SequenceResult:
    """Scores of one sequence and how they were obtained."""

    name: str
    objects: list[ObjectScores]
    frames: int  # frames propagated in this run (0 when skipped or scoring only)
    seconds: float  # propagation time in this run
    status: str  # "propagated", "skipped" (complete outputs found) or "scored"
    cache: CacheStats = field(default_factory=CacheStats)
    rank: int = 0  # torchrun rank that handled it

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "status": self.status,
            "cache": asdict(self.cache),
            "rank": self.rank,
            "objects": [obj.name for obj in self.objects],
        }


@dataclass(frozen=True)
class RunSettings:
    """What one process needs to handle sequences (picklable)."""

    results_dir: Path  # masks are scored from here (= out_dir when propagating)
    propagate: bool
    config: PropagationConfig = field(default_factory=PropagationConfig)
    cache_dir: Path | None = None
    ignore_void: bool = False
    bound_th: float = BOUNDARY_THRESHOLD
    overwrite: bool = False  # allow sequence folders that are not dino-vos results
    keyframes: KeyframeSchedule | None = None  # simulated corrections (not the standard protocol)
    direction: Direction = "forward"

    def keyframe_indices(self, sequence: DavisSequence) -> list[int]:
        """Frames whose ground truth is given: 0, plus the schedule's."""
        return self.keyframes.indices(len(sequence.stems)) if self.keyframes else [0]


def score_sequence(
    sequence: DavisSequence,
    results_dir: str | Path,
    ignore_void: bool = False,
    bound_th: float = BOUNDARY_THRESHOLD,
    keyframes: Sequence[int] = (0,),
) -> list[ObjectScores]:
    """Per-object J and F of ``results_dir/<seq>/*.png`` on the sequence's scored frames (all
    but the first and the last, as the official tool) that are not ``keyframes``."""
    given = {sequence.stems[i] for i in keyframes}
    stems = [stem for stem in sequence.scored_stems if stem not in given]
    gt = sequence.read_annotations(stems)
    num_objects = sequence.num_objects()
    pred = read_results(results_dir, sequence, num_objects, gt.shape[1:], stems)
    j, f = score_frames(gt, pred, num_objects, ignore_void, bound_th)
    return [ObjectScores(sequence.name, k + 1, j[k], f[k]) for k in range(num_objects)]


class SequenceEvaluator:
    """Propagates (when asked) and scores sequences in the current process."""

    def __init__(
        self,
        settings: RunSettings,
        features: BackboneFeatures | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if settings.propagate and features is None:
            raise ValueError("propagation needs features")
        self.settings = settings
        self.features = features
        self.fingerprint = fingerprint
        if features is not None and self.fingerprint is None:
            self.fingerprint = weights_fingerprint(features.backbone)
        self.cache = (
            FeatureCache(features, settings.cache_dir, self.fingerprint)
            if features is not None and settings.cache_dir is not None
            else None
        )

    def expected_manifest(self, sequence: DavisSequence) -> dict[str, Any]:
        """Manifest entries a finished, reusable propagation of ``sequence`` must hold."""
        assert self.features is not None and self.fingerprint is not None
        return {
            "frames": len(sequence.frames),
            "propagation": self.settings.config.to_dict(),
            **feature_settings(self.features, self.fingerprint),
            "keyframes": [sequence.stems[i] for i in self.settings.keyframe_indices(sequence)],
            "direction": self.settings.direction,
        }

    def is_up_to_date(self, sequence: DavisSequence) -> bool:
        out = self.settings.results_dir / sequence.name
        return is_reusable_result(out, self.expected_manifest(sequence), sequence.stems)

    def write_masks(
        self, sequence: DavisSequence, on_frame: Callable[[], None] | None = None
    ) -> tuple[float, CacheStats]:
        """Propagate the first annotation (and the keyframes' ground truth, when asked) into
        ``RESULTS/<seq>/``; returns (seconds, cache hits)."""

        assert self.features is not None
        extractor = self.cache.for_sequence(sequence.name) if self.cache else self.features
        before = CacheStats(**asdict(self.cache.stats)) if self.cache else CacheStats()
        source = FolderSource(sequence.frames_dir, limit=len(sequence.frames))
        keyframes = {
            i: read_mask(sequence.annotations[i]) for i in self.settings.keyframe_indices(sequence)
        }
        summary = propagate_to_folder(
            source,
            keyframes,
            self.settings.results_dir / sequence.name,
            extractor,
            self.settings.config,
            on_frame=(lambda _: on_frame()) if on_frame else None,
            metadata={
                **self.expected_manifest(sequence),
                "weights": self.features.backbone.weights_id,
                "sequence": sequence.name,
            },
            overwrite=self.settings.overwrite,
            direction=self.settings.direction,
            complete_keyframes=True,
        )
        delta = CacheStats()
        if self.cache is not None:
            delta = CacheStats(
                self.cache.stats.hits - before.hits, self.cache.stats.misses - before.misses
            )
        return summary.seconds, delta

    def run(
        self, sequence: DavisSequence, on_frame: Callable[[], None] | None = None
    ) -> SequenceResult:
        seconds, frames, cache = 0.0, 0, CacheStats()
        status = "scored"
        if self.settings.propagate:
            if self.is_up_to_date(sequence):
                status = "skipped"
            else:
                seconds, cache = self.write_masks(sequence, on_frame)
                frames, status = len(sequence.frames), "propagated"
        objects = score_sequence(
            sequence,
            self.settings.results_dir,
            self.settings.ignore_void,
            self.settings.bound_th,
            self.settings.keyframe_indices(sequence),
        )
        return SequenceResult(sequence.name, objects, frames, seconds, status, cache)


# --- worker processes -------------------------------------------------------------------------

_worker: SequenceEvaluator | None = None
_progress_queue: Any = None


def _init_worker(
    settings: RunSettings,
    spec: BackboneSpec | None,
    fingerprint: str | None,
    threads: int,
    queue: Any,
) -> None:
    global _worker, _progress_queue
    torch.set_num_threads(threads)
    features = spec.build() if (spec is not None and settings.propagate) else None
    if features is not None and fingerprint is not None:
        built = weights_fingerprint(features.backbone)
        if built != fingerprint:
            raise DinoVosError(
                "a worker process built different backbone weights than the main process: pass "
                "--weights FILE (or use --workers 1)"
            )
    _worker = SequenceEvaluator(settings, features, fingerprint)
    _progress_queue = queue


def _run_in_worker(sequence: DavisSequence) -> SequenceResult:
    assert _worker is not None
    return _worker.run(sequence, on_frame=lambda: _progress_queue.put(1))


def _drain(queue: Any, advance: Callable[[int], None]) -> None:
    count = 0
    while not queue.empty():
        queue.get_nowait()
        count += 1
    if count:
        advance(count)


def run_sequences(
    sequences: Sequence[DavisSequence],
    settings: RunSettings,
    features: BackboneFeatures | None = None,
    spec: BackboneSpec | None = None,
    fingerprint: str | None = None,
    workers: int = 1,
    advance: Callable[[int], None] | None = None,
) -> list[SequenceResult]:
    """Handle ``sequences`` here (``workers == 1``) or in worker processes; keeps their order.

    ``advance(n)`` reports progress in frames (propagated, or scored when not propagating).
    """
    advance = advance or (lambda _: None)
    if workers <= 1 or len(sequences) <= 1:
        evaluator = SequenceEvaluator(settings, features, fingerprint)
        results = []
        for sequence in sequences:
            result = evaluator.run(sequence, on_frame=lambda: advance(1))
            advance(len(sequence.annotations) - result.frames)
            results.append(result)
        return results
    if settings.propagate and spec is None:
        raise ValueError("worker processes need a BackboneSpec to build the backbone")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = min(workers, len(sequences))
    threads = max(1, torch.get_num_threads() // workers)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].annotations))
    results: list[SequenceResult | None] = [None] * len(sequences)
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(settings, spec, fingerprint, threads, queue),
    ) as pool:
        futures = {pool.submit(_run_in_worker, sequences[i]): i for i in order}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(queue, advance)
                for future in done:
                    index = futures[future]
                    result = future.result()
                    results[index] = result
                    advance(len(sequences[index].annotations) - result.frames)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(queue, advance)
    return [r for r in results if r is not None]


# --- sharding over torchrun ranks -------------------------------------------------------------


def shard_sequences(
    sequences: Sequence[DavisSequence], rank: int, world: int
) -> list[DavisSequence]:
    """This rank's sequences, balanced by frame count, kept in dataset order."""
    costs = [len(sequence.annotations) for sequence in sequences]
    return [sequences[i] for i in shard_balanced(costs, rank, world)]


def merge_results(
    shards: Sequence[Sequence[SequenceResult]], names: Sequence[str]
) -> list[SequenceResult]:
    """Concatenate the ranks' results in dataset order; every sequence exactly once."""
    by_name: dict[str, SequenceResult] = {}
    for shard in shards:
        for result in shard:
            if result.name in by_name:
                raise RuntimeError(f"sequence {result.name} was evaluated by two ranks")
            by_name[result.name] = result
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RuntimeError(f"no scores for {len(missing)} sequence(s): {', '.join(missing[:5])}")
    return [by_name[n] for n in names]


@dataclass
class DavisRun:
    """Merged results of a benchmark run (rank 0)."""

    results: list[SequenceResult]
    seconds: float
    fingerprint: str | None = None  # weights hash (None when only scoring)

    @property
    def objects(self) -> list[ObjectScores]:
        return [obj for result in self.results for obj in result.objects]

    @property
    def propagated_frames(self) -> int:
        return sum(r.frames for r in self.results)

    @property
    def cache(self) -> CacheStats:
        total = CacheStats()
        for result in self.results:
            total.add(result.cache)
        return total


def evaluate_davis(
    sequences: Sequence[DavisSequence],
    settings: RunSettings,
    features: BackboneFeatures | None = None,
    spec: BackboneSpec | None = None,
    workers: int = 1,
    advance: Callable[[int], None] | None = None,
) -> DavisRun | None:
    """Run this rank's shard and merge on rank 0; returns None on the other ranks."""
    if settings.propagate and features is None:
        raise InputError("propagation needs a backbone: pass --backbone/--weights or --results")
    start = time.perf_counter()
    rank, world = launch_env()
    fingerprint = weights_fingerprint(features.backbone) if features is not None else None
    shard = shard_sequences(sequences, rank, world)
    local = run_sequences(shard, settings, features, spec, fingerprint, workers, advance)
    for result in local:
        result.rank = rank
    shards = gather_to_main(local)
    if shards is None:
        return None
    merged = merge_results(shards, [s.name for s in sequences])
    return DavisRun(merged, time.perf_counter() - start, fingerprint)
