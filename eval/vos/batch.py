"""``dino-vos propagate-batch JOBS --out DIR``: many videos, each into ``DIR/<id>/``.

``JOBS`` (a CSV, JSON-lines or YouTube-VOS-layout list, read by :mod:`.jobs`) is one more
dataset reader for the runner of :mod:`dino_vos.runner`.

Every video goes through :class:`~dino_vos.runner.SequenceRunner` (its own manifest; a finished
video with the same settings is reused, so a killed batch resumes). A video that fails
(corrupt, missing mask ...) is recorded with its one-line error in ``DIR/failures.jsonl`` and
the batch goes on. ``DIR/batch.json`` holds the summary (done, reused, failed, frames/s).

Shards, balanced by frame count (:func:`dino_vos.distributed.shard_balanced`): a SLURM job array
(``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``: each task writes ``batch-<k>-of-<n>.json``
and ``failures-<k>-of-<n>.jsonl``), then torchrun ranks (rank 0 gathers and writes the
reports), then ``workers`` processes on one machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_vos.atomic import atomic_write_bytes, atomic_write_json
from dino_vos.console import console, progress_bar
from dino_vos.errors import DinoVosError, InputError
from dino_vos.eval.vos.jobs import BatchEntry, frame_cost, read_jobs
from dino_vos.outputs import listed_outputs
from dino_vos.result_folder import ResultFolder
from dino_vos.runner import RunnerSettings, map_in_processes, report_frame
from dino_vos.spec import BackboneSpec, Direction, PropagationConfig

if TYPE_CHECKING:
    from dino_vos.features import BatchExtractor
    from dino_vos.runner import SequenceRunner

BATCH_FORMAT = "dino-vos-batch"


@dataclass
class VideoOutcome:
    """What happened to one video."""

    id: str
    status: str  # "propagated", "reused" or "failed"
    frames: int = 0  # frames propagated now
    seconds: float = 0.0
    error: str | None = None
    shard: str = ""

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["seconds"] = round(self.seconds, 3)
        return {key: value for key, value in values.items() if value is not None}


# --- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchJob:
    """One ``propagate-batch`` run (picklable: worker processes receive it)."""

    jobs: Path
    out_dir: Path
    spec: BackboneSpec
    config: PropagationConfig = field(default_factory=PropagationConfig)
    direction: Direction = "forward"
    workers: int = 1
    overwrite: bool = False

    def base_settings(self) -> RunnerSettings:
        return RunnerSettings(self.config, self.direction, self.overwrite)

    def run_key(self) -> dict[str, Any]:
        return {
            "jobs": str(self.jobs),
            "spec": dataclasses.asdict(self.spec),
            "propagation": self.config.to_dict(),
            "direction": self.direction,
        }


class BatchWorker:
    """Runs entries in this process: one :class:`SequenceRunner` per distinct setting."""

    def __init__(self, job: BatchJob, features: BatchExtractor, shard: str) -> None:
        self.job = job
        self.features = features
        self.shard = shard
        self.runners: dict[RunnerSettings, SequenceRunner] = {}

    def runner(self, settings: RunnerSettings) -> SequenceRunner:
        from dino_vos.runner import SequenceRunner

        if settings not in self.runners:
            fingerprint = next(iter(self.runners.values())).fingerprint if self.runners else None
            self.runners[settings] = SequenceRunner(self.features, settings, fingerprint)
        return self.runners[settings]

    def run(self, entry: BatchEntry, on_frame: Callable[[], None]) -> VideoOutcome:
        """Propagate (or reuse) one video; any error of this video becomes its outcome."""
        try:
            task = entry.task()
            runner = self.runner(entry.settings(self.job.base_settings()))
            outcome = runner.run(task, self.job.out_dir / entry.id, on_frame, {"id": entry.id})
        except Exception as exc:  # this video's failure, whatever it is: the batch goes on
            error = exc if isinstance(exc, DinoVosError) else f"{type(exc).__name__}: {exc}"
            return VideoOutcome(entry.id, "failed", error=_one_line(error), shard=self.shard)
        status = "reused" if outcome.status == "skipped" else outcome.status
        return VideoOutcome(entry.id, status, outcome.frames, outcome.seconds, shard=self.shard)


def _one_line(error: object) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


_worker: BatchWorker | None = None


def _init_worker(job: BatchJob, shard: str) -> None:
    global _worker
    _worker = BatchWorker(job, job.spec.build(), shard)


def _run_in_worker(entry: BatchEntry) -> VideoOutcome:
    assert _worker is not None
    return _worker.run(entry, report_frame)


def array_shard() -> tuple[int, int]:
    """(index, count) of this SLURM array task; (0, 1) outside an array."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(
        os.environ.get("SLURM_ARRAY_TASK_MIN", "0")
    )
    if not 0 <= index < count:
        raise InputError(
            f"SLURM array task {index} of {count}: submit with --array=0-{count - 1} (or set "
            "SLURM_ARRAY_TASK_MIN)"
        )
    return index, count


def report_names(task: int, tasks: int) -> tuple[str, str]:
    """(batch report, failures file) of array task ``task`` of ``tasks``."""
    if tasks <= 1:
        return "batch.json", "failures.jsonl"
    return f"batch-{task}-of-{tasks}.json", f"failures-{task}-of-{tasks}.jsonl"


def run_batch(job: BatchJob) -> dict[str, Any] | None:
    """Run this process's shard of the batch; the process that writes the reports returns the
    summary (None on the other torchrun ranks)."""
    from dino_vos.distributed import gather_to_main, launch_env, shard_balanced

    entries = read_jobs(job.jobs)
    task, tasks = array_shard()
    rank, world = launch_env()
    reports = report_names(task, tasks)
    folder = ResultFolder(job.out_dir, BATCH_FORMAT, job.run_key(), reports)
    if rank == 0:
        inputs = [job.jobs, *(p for e in entries for p in (e.input, e.mask, e.masks) if p)]
        folder.claim(inputs, job.overwrite)
    else:
        folder.wait_for_claim()
    costs = [frame_cost(entry) for entry in entries]
    mine = shard_balanced(costs, task, tasks)
    mine = [mine[i] for i in shard_balanced([costs[i] for i in mine], rank, world)]
    shard = f"task {task} of {tasks}, rank {rank} of {world}"
    console.print(
        f"Batch: {len(entries)} videos; this shard ({shard}): {len(mine)} videos, "
        f"{sum(costs[i] for i in mine)} frames"
    )
    start = time.perf_counter()
    outcomes = _run_entries(job, [entries[i] for i in mine], [costs[i] for i in mine], shard)
    gathered = gather_to_main(outcomes)
    if gathered is None:
        return None
    merged = [outcome for part in gathered for outcome in part]
    summary = _summary(job, merged, time.perf_counter() - start, (task, tasks), world)
    _write_reports(folder, reports, merged, summary)
    return summary


def _run_entries(
    job: BatchJob, entries: Sequence[BatchEntry], costs: Sequence[int], shard: str
) -> list[VideoOutcome]:
    with progress_bar("frames") as progress:
        bar = progress.add_task("Propagating", total=sum(costs))

        def finished(index: int, outcome: VideoOutcome) -> None:
            progress.advance(bar, costs[index] - outcome.frames)
            if outcome.error:
                console.print(f"[red]Failed[/] {outcome.id}: {outcome.error}")

        if job.workers > 1 and len(entries) > 1:
            return map_in_processes(
                _run_in_worker,
                entries,
                costs,
                job.workers,
                _init_worker,
                (job, shard),
                lambda n: progress.advance(bar, n),
                finished,
                lambda index, error: VideoOutcome(
                    entries[index].id, "failed", error=error, shard=shard
                ),
            )
        worker = BatchWorker(job, job.spec.build(announce=True), shard)
        outcomes = []
        for index, entry in enumerate(entries):
            outcomes.append(worker.run(entry, lambda: progress.advance(bar)))
            finished(index, outcomes[-1])
        return outcomes


def _summary(
    job: BatchJob,
    outcomes: Sequence[VideoOutcome],
    seconds: float,
    array: tuple[int, int],
    world: int,
) -> dict[str, Any]:
    from dino_vos import __version__

    frames = sum(outcome.frames for outcome in outcomes)
    busy = sum(outcome.seconds for outcome in outcomes)
    counts = {
        status: sum(outcome.status == status for outcome in outcomes)
        for status in ("propagated", "reused", "failed")
    }
    return {
        "format": BATCH_FORMAT,
        "dino_vos": __version__,
        "run": job.run_key(),
        "array_task": {"index": array[0], "count": array[1]},
        "world_size": world,
        "workers": job.workers,
        **counts,
        "propagated_frames": frames,
        "seconds": round(seconds, 3),  # wall clock, backbone loading included
        "frames_per_second": round(frames / seconds, 3) if frames and seconds > 0 else None,
        # per process, propagation only (the sum over videos of their own time)
        "propagation_frames_per_second": round(frames / busy, 3) if frames and busy else None,
        "videos": [outcome.to_dict() for outcome in outcomes],
    }


def _write_reports(
    folder: ResultFolder,
    reports: tuple[str, str],
    outcomes: Sequence[VideoOutcome],
    summary: dict[str, Any],
) -> None:
    report, failures = reports
    lines = [
        json.dumps({"id": o.id, "error": o.error, "shard": o.shard})
        for o in outcomes
        if o.status == "failed"
    ]
    atomic_write_bytes(folder.path / failures, "".join(f"{line}\n" for line in lines).encode())
    atomic_write_json(folder.path / report, summary)
    others = listed_outputs(folder.manifest())  # other array tasks' reports stay listed
    folder.complete(sorted(others | set(reports)))
    rate = summary["frames_per_second"]
    console.print(
        f"Batch: {summary['propagated']} done, {summary['reused']} reused, "
        f"{summary['failed']} failed; {summary['propagated_frames']} frames in "
        f"{summary['seconds']:.1f} s"
        + (f" ({rate:.2f} frames/s)" if rate else "")
        + f"; wrote {folder.path / report}"
        + (f" and {folder.path / failures}" if lines else "")
    )
