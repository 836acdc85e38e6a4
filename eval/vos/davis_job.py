"""``eval davis`` as a library call: :class:`DavisJob` in, reports on disk (rank 0); the
sequences themselves run in :mod:`.davis_sequences`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dino_vos import __version__
from dino_vos.console import console, progress_bar
from dino_vos.distributed import launch_env
from dino_vos.errors import InputError, param, render
from dino_vos.eval.davis_metrics import BOUNDARY_THRESHOLD, global_statistics
from dino_vos.eval.vos.davis_data import DavisDataset
from dino_vos.eval.vos.davis_report import (
    global_csv,
    output_paths,
    per_sequence_csv,
    plot_per_object,
    print_tables,
    write_json,
)
from dino_vos.eval.vos.davis_sequences import DavisRun, evaluate_davis, shard_sequences
from dino_vos.features import BatchExtractor
from dino_vos.masks import atomic_write_bytes
from dino_vos.result_folder import ResultFolder
from dino_vos.runner import RunnerSettings
from dino_vos.spec import BackboneSpec, Direction, KeyframeSchedule, PropagationConfig

#: The ``format`` of the manifest ``eval davis`` keeps in its report folder.
RUN_FORMAT = "dino-vos-davis"


@dataclass(frozen=True)
class DavisJob:
    """One ``eval davis`` run: which split, which model (``spec``; None to only score existing
    masks in ``results_dir``), the propagation settings and where to write."""

    davis_root: Path
    split: str = "val"
    year: str | None = None
    resolution: str = "480p"
    sequences: tuple[str, ...] | None = None
    results_dir: Path | None = None
    out_dir: Path | None = None
    spec: BackboneSpec | None = None
    config: PropagationConfig = field(default_factory=PropagationConfig)
    cache_dir: Path | None = None
    workers: int = 1
    max_frames: int | None = None
    ignore_void: bool = False
    overwrite: bool = False
    keyframes: KeyframeSchedule | None = None
    direction: Direction = "forward"

    @property
    def scoring_only(self) -> bool:
        return self.results_dir is not None

    @property
    def is_standard(self) -> bool:
        """The benchmark's protocol: first-frame ground truth only, forward."""
        return self.keyframes is None and self.direction == "forward"

    @property
    def report_label(self) -> str:
        """The split, or for simulated corrections the split and the schedule: the reports of
        another protocol never take the standard reports' names."""
        if self.is_standard:
            return self.split
        label = f"{self.split}-keyframes-{self.keyframes.tag() if self.keyframes else 'first'}"
        return label if self.direction == "forward" else f"{label}-{self.direction}"

    @property
    def report_dir(self) -> Path:
        folder = self.out_dir or self.results_dir
        assert folder is not None  # check() asks for one of them
        return folder

    @property
    def masks_dir(self) -> Path:
        """Where the sequences' masks are (written, when propagating) and scored from."""
        folder = self.results_dir or self.out_dir
        assert folder is not None  # check() asks for one of them
        return folder

    def keyframe_indices(self, frames: int) -> list[int]:
        """Frames of a sequence whose ground truth is given: 0, plus the schedule's."""
        return self.keyframes.indices(frames) if self.keyframes else [0]

    def runner_settings(self) -> RunnerSettings:
        """How each sequence is propagated: from ground truth that shows every object."""
        return RunnerSettings(self.config, self.direction, self.overwrite, complete_keyframes=True)

    def dataset(self) -> DavisDataset:
        """The split's sequences, checked (frames too when propagating)."""
        return DavisDataset(
            self.davis_root,
            self.split,
            self.resolution,
            self.year,
            list(self.sequences) if self.sequences else None,
            require_frames=not self.scoring_only,
            max_frames=self.max_frames,
        )

    def result_folder(self) -> ResultFolder:
        """The report folder's transaction (with --results, beside the masks)."""
        reports = tuple(path.name for path in output_paths(Path(), self.report_label).values())
        return ResultFolder(self.report_dir, RUN_FORMAT, self.run_key(), reports)

    def check(self, given: Sequence[str] = (), sweep: bool = False) -> None:
        """Refuse contradictory modes (the one place they are checked); ``given`` names model
        options the user passed explicitly, ``sweep`` says a grid is asked for."""
        if self.results_dir is not None:  # scoring only
            if sweep:
                raise InputError(
                    f"{param('sweep')} propagates: drop {param('results_dir')} (or "
                    f"{param('sweep')})"
                )
            if self.keyframes is not None or self.direction != "forward":
                raise InputError(
                    f"{param('keyframes')} and {param('direction')} apply to propagation, not "
                    f"to {param('results_dir')}"
                )
            if given:
                raise InputError(
                    f"{param('results_dir')} only scores existing masks: drop "
                    f"{', '.join(given)} (or drop {param('results_dir')} to propagate)"
                )
            if not self.results_dir.is_dir():
                raise InputError(f"results folder not found: {self.results_dir}")
        elif self.out_dir is None:
            raise InputError(
                f"give {param('out_dir', 'DIR')} to propagate and score, or "
                f"{param('results_dir', 'DIR')} to only score"
            )
        elif self.spec is None:
            raise InputError("propagation needs a backbone spec")

    def run_key(self) -> dict[str, Any]:
        """What determines the reports: a re-run with another key replaces them."""
        return {
            "split": self.split,
            "year": self.year,
            "resolution": self.resolution,
            "sequences": list(self.sequences) if self.sequences else None,
            "results_dir": str(self.results_dir) if self.results_dir else None,
            "spec": asdict(self.spec) if self.spec else None,
            "propagation": None if self.scoring_only else self.config.to_dict(),
            "max_frames": self.max_frames,
            "ignore_void": self.ignore_void,
            "keyframes": str(self.keyframes) if self.keyframes else None,
            "direction": self.direction,
        }


def prepare_report_dir(job: DavisJob, dataset: DavisDataset) -> None:
    """Claim the report folder for ``job`` (:meth:`ResultFolder.claim`: the output rules, a
    ``running`` manifest, reports of other settings removed). Under torchrun, rank 0 claims and
    the other ranks wait for its manifest before they write anything (scoring only writes
    nothing before its reports, all written by rank 0 at the end: nothing to wait for)."""
    folder = job.result_folder()
    if launch_env()[0] != 0:
        if not job.scoring_only:
            folder.wait_for_claim()
        return
    folder.claim(
        dataset.inputs,
        job.overwrite,
        job.cache_dir,
        shared=job.scoring_only,  # the results folder holds the masks: only reports are ours
        fix=(
            f"pass {param('out_dir', 'DIR')} for the reports"
            if job.scoring_only
            else f"choose another {param('out_dir')}"
        ),
    )


def run_davis(job: DavisJob, features: BatchExtractor | None = None) -> DavisRun | None:
    """Evaluate (or only score) a DAVIS split and write the reports (rank 0; None elsewhere).

    ``features``: a backbone already built from ``job.spec`` (a sweep builds it once for all its
    settings); None builds it here.
    """
    job.check()
    rank, world = launch_env()
    if rank > 0:
        console.quiet = True
    dataset = job.dataset()
    folder = job.result_folder()
    with folder.locked(dataset.inputs, job.overwrite, shared=job.scoring_only):  # one at a time
        return _run_locked(job, dataset, features, rank, world)


def _run_locked(
    job: DavisJob,
    dataset: DavisDataset,
    features: BatchExtractor | None,
    rank: int,
    world: int,
) -> DavisRun | None:
    prepare_report_dir(job, dataset)
    out_dir = job.report_dir
    frames = sum(len(s.annotations) for s in dataset)
    if job.sequences:
        source = render(param("sequences"))
    elif dataset.split_file is not None:
        source = str(dataset.split_file)
    else:
        source = f"no split file: all folders of {dataset.annotations_root}"
    console.print(
        f"DAVIS {job.split}: {len(dataset)} sequences, {frames} frames ({source})"
        + (f", rank {rank} of {world}" if world > 1 else "")
    )
    if not job.is_standard:
        console.print(f"Protocol: {_protocol(job)}")
    if job.scoring_only:
        features = None
    elif features is None:
        assert job.spec is not None  # check() asks for a backbone when propagating
        features = job.spec.build(announce=True)
    shard_frames = sum(len(s.annotations) for s in shard_sequences(dataset.sequences, rank, world))
    with progress_bar("frames") as progress:
        task = progress.add_task(
            "Scoring" if job.scoring_only else "Propagating", total=shard_frames
        )
        run = evaluate_davis(
            dataset.sequences, job, features, advance=lambda n: progress.advance(task, n)
        )
    if run is None:
        return None
    payload = _payload(run, dataset, job, features, world)
    if job.scoring_only:
        job.result_folder().drop_other_reports()
    _write_outputs(out_dir, job.report_label, run, payload)
    folder = job.result_folder()
    folder.complete(folder.reports)
    return run


def _payload(
    run: DavisRun,
    dataset: DavisDataset,
    job: DavisJob,
    features: BatchExtractor | None,
    world: int,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "dino_vos": __version__,
        "davis_root": str(dataset.root),
        "split": dataset.split,
        "split_file": str(dataset.split_file) if dataset.split_file else None,
        "resolution": dataset.resolution,
        "sequences": dataset.names,
        "max_frames": dataset.max_frames,
        "ignore_void": job.ignore_void,
        "boundary_threshold": BOUNDARY_THRESHOLD,
        "workers": job.workers,
        "world_size": world,
        "protocol": _protocol(job),
    }
    if features is None:
        settings["results_dir"] = str(job.results_dir)
    else:
        backbone = features.backbone
        settings.update(
            {
                **features.settings(run.fingerprint),
                "weights": backbone.weights_id,
                "random_init_seed": job.spec.seed if job.spec and job.spec.random_init else None,
                "device": str(backbone.device),
                "propagation": job.config.to_dict(),
                "propagation_protocol": job.config.protocol,  # docs/protocol.md#protocols
                "cache": str(job.cache_dir) if job.cache_dir else None,
            }
        )
    objects = run.objects
    frames = run.propagated_frames
    cache = run.cache
    return {
        "global": global_statistics(objects),
        "objects": [obj.to_dict() for obj in objects],
        "sequences": [r.to_dict() for r in run.results],
        "timing": {
            "seconds": round(run.seconds, 3),
            "propagated_frames": frames,
            "propagation_seconds": round(sum(r.seconds for r in run.results), 3),
            "seconds_per_frame": round(run.seconds / frames, 4) if frames else None,
            "skipped_sequences": sum(r.status == "skipped" for r in run.results),
        },
        "cache": (
            {"hits": cache.hits, "misses": cache.misses, "hit_rate": cache.hit_rate}
            if job.cache_dir
            else None
        ),
        "settings": settings,
    }


def _protocol(job: DavisJob) -> str:
    if job.is_standard:
        return "standard: first-frame ground truth, forward"
    return (
        f"simulated corrections (not the standard protocol): ground truth of frames "
        f"{job.keyframes or '0'} given, propagation {job.direction}; those frames are not scored"
    )


def _write_outputs(out_dir: Path, split: str, run: DavisRun, payload: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, split)
    statistics = payload["global"]
    objects = run.objects
    atomic_write_bytes(paths["global_csv"], global_csv(statistics))
    atomic_write_bytes(paths["per_sequence_csv"], per_sequence_csv(objects))
    write_json(paths["json"], payload)
    plot_per_object(paths["plot"], objects, statistics, f"DAVIS {split}: J and F per object")
    print_tables(statistics, objects, split)
    timing = payload["timing"]
    if timing["propagated_frames"]:
        console.print(
            f"Propagated {timing['propagated_frames']} frames in {timing['seconds']:.1f} s "
            f"({timing['seconds_per_frame']:.3f} s/frame); "
            f"{timing['skipped_sequences']} complete sequence(s) reused"
        )
    elif timing["skipped_sequences"]:
        console.print(f"All {timing['skipped_sequences']} sequences were complete: scores only")
    if payload["cache"] is not None:
        cache = payload["cache"]
        console.print(
            f"Feature cache: {cache['hits']} hits, {cache['misses']} misses "
            f"(hit rate {100 * cache['hit_rate']:.1f}%)"
        )
    console.print(
        f"J&F-Mean [bold]{statistics['J&F-Mean']:.3f}[/] (J {statistics['J-Mean']:.3f}, "
        f"F {statistics['F-Mean']:.3f}); wrote {paths['global_csv'].name}, "
        f"{paths['per_sequence_csv'].name}, {paths['json'].name}, {paths['plot'].name} to {out_dir}"
    )
