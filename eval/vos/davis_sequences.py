"""DAVIS sequences: propagate every sequence with the engine, score it, merge the scores.

- One sequence = :class:`dino_vos.runner.SequenceRunner` into ``OUT/<seq>/`` (propagated
  unless a finished result of the same settings is there), then J&F of its PNGs against the
  annotations.
- ``workers > 1`` runs sequences in spawned processes (each builds the same backbone from a
  :class:`BackboneSpec`); under ``torchrun`` (``RANK``/``WORLD_SIZE``) every rank takes a shard
  balanced by frame count and rank 0 gathers the scores over a gloo process group.
- Scoring only (``results_dir`` without propagation) reads ``RESULTS/<seq>/<stem>.png`` like the
  official tool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_vos.backbones import weights_fingerprint
from dino_vos.distributed import gather_to_main, launch_env, shard_balanced
from dino_vos.errors import DinoVosError, InputError, param
from dino_vos.eval.davis_metrics import BOUNDARY_THRESHOLD, ObjectScores, score_frames
from dino_vos.eval.vos.cache import CacheStats, FeatureCache
from dino_vos.eval.vos.davis_data import DavisSequence, read_results
from dino_vos.features import BatchExtractor
from dino_vos.runner import RunOutcome, SequenceRunner, map_in_processes, report_frame

if TYPE_CHECKING:
    from dino_vos.eval.vos.davis_job import DavisJob


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
    """Propagates (unless the job only scores) and scores sequences in the current process."""

    def __init__(
        self,
        job: DavisJob,
        features: BatchExtractor | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if not job.scoring_only and features is None:
            raise ValueError("propagation needs features")
        self.job = job
        self.cache: FeatureCache | None = None
        self.runner: SequenceRunner | None = None
        if features is not None:
            fingerprint = fingerprint or weights_fingerprint(features.backbone)
            if job.cache_dir is not None:
                self.cache = FeatureCache(features, job.cache_dir, fingerprint)
            self.runner = SequenceRunner(
                features,
                job.runner_settings(),
                fingerprint,
                self.cache.for_sequence if self.cache else None,
            )

    def propagate(
        self, sequence: DavisSequence, on_frame: Callable[[], None] | None = None
    ) -> tuple[RunOutcome, CacheStats]:
        """Propagate the first annotation (and the keyframes' ground truth, when asked) into
        ``OUT/<seq>/`` unless it is there; returns what was done and the cache hits."""
        assert self.runner is not None
        before = CacheStats(**asdict(self.cache.stats)) if self.cache else CacheStats()
        task = sequence.task(self.job.keyframe_indices(len(sequence.stems)))
        metadata = {"weights": self.runner.features.backbone.weights_id, "sequence": sequence.name}
        outcome = self.runner.run(task, self.job.masks_dir / sequence.name, on_frame, metadata)
        delta = CacheStats()
        if self.cache is not None:
            delta = CacheStats(
                self.cache.stats.hits - before.hits, self.cache.stats.misses - before.misses
            )
        return outcome, delta

    def run(
        self, sequence: DavisSequence, on_frame: Callable[[], None] | None = None
    ) -> SequenceResult:
        outcome, cache = RunOutcome("scored"), CacheStats()
        if self.runner is not None:
            outcome, cache = self.propagate(sequence, on_frame)
        objects = score_sequence(
            sequence,
            self.job.masks_dir,
            self.job.ignore_void,
            keyframes=self.job.keyframe_indices(len(sequence.stems)),
        )
        return SequenceResult(
            sequence.name, objects, outcome.frames, outcome.seconds, outcome.status, cache
        )


# --- worker processes -------------------------------------------------------------------------

_worker: SequenceEvaluator | None = None


def _init_worker(job: DavisJob, fingerprint: str | None) -> None:
    global _worker
    features = job.spec.build() if (job.spec is not None and not job.scoring_only) else None
    if features is not None and fingerprint is not None:
        built = weights_fingerprint(features.backbone)
        if built != fingerprint:
            raise DinoVosError(
                "a worker process built different backbone weights than the main process: pass "
                f"{param('weights', 'FILE')} (or use {param('workers', 1)})"
            )
    _worker = SequenceEvaluator(job, features, fingerprint)


def _run_in_worker(sequence: DavisSequence) -> SequenceResult:
    assert _worker is not None
    return _worker.run(sequence, on_frame=report_frame)


def run_sequences(
    sequences: Sequence[DavisSequence],
    job: DavisJob,
    features: BatchExtractor | None = None,
    fingerprint: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[SequenceResult]:
    """Handle ``sequences`` here (``job.workers == 1``) or in worker processes; keeps their
    order. ``advance(n)`` reports progress in frames (propagated, or scored when not
    propagating)."""
    progress = advance or (lambda _: None)
    if job.workers <= 1 or len(sequences) <= 1:
        evaluator = SequenceEvaluator(job, features, fingerprint)
        results = []
        for sequence in sequences:
            result = evaluator.run(sequence, on_frame=lambda: progress(1))
            progress(len(sequence.annotations) - result.frames)
            results.append(result)
        return results
    if not job.scoring_only and job.spec is None:
        raise ValueError("worker processes need a BackboneSpec to build the backbone")
    return map_in_processes(
        _run_in_worker,
        sequences,
        [len(sequence.annotations) for sequence in sequences],
        job.workers,
        _init_worker,
        (job, fingerprint),
        progress,
        lambda index, result: progress(len(sequences[index].annotations) - result.frames),
    )


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
    job: DavisJob,
    features: BatchExtractor | None = None,
    advance: Callable[[int], None] | None = None,
) -> DavisRun | None:
    """Run this rank's shard of ``job`` and merge on rank 0; returns None on the other ranks."""
    if not job.scoring_only and features is None:
        raise InputError(
            f"propagation needs a backbone: pass {param('name')}/{param('weights')} or "
            f"{param('results_dir')}"
        )
    start = time.perf_counter()
    rank, world = launch_env()
    fingerprint = weights_fingerprint(features.backbone) if features is not None else None
    shard = shard_sequences(sequences, rank, world)
    local = run_sequences(shard, job, features, fingerprint, advance)
    for result in local:
        result.rank = rank
    shards = gather_to_main(local)
    if shards is None:
        return None
    merged = merge_results(shards, [s.name for s in sequences])
    return DavisRun(merged, time.perf_counter() - start, fingerprint)
