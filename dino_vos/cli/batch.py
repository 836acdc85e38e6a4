"""``dino-vos propagate-batch``: many videos from a CSV, JSON-lines or YouTube-VOS folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dino_vos.cli.options import (
    direction_option,
    overwrite_option,
    process_workers_option,
    propagation_options,
    with_backbone_spec,
)
from dino_vos.spec import BackboneSpec, Direction, PropagationConfig


@click.command("propagate-batch")
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: OUT/<id>/ per video, batch.json, failures.jsonl.",
)
@propagation_options
@direction_option()
@process_workers_option("Videos")
@overwrite_option
@with_backbone_spec(seed=True, frames=True)
def propagate_batch(
    jobs: Path,
    out_dir: Path,
    config: PropagationConfig,
    direction: Direction,
    workers: int,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """Propagate every video of JOBS into OUT/<id>/.

    JOBS: a CSV with the header input,mask (optional masks: a folder of keyframe PNGs named
    like the frames; optional id, default the input's stem), a JSON-lines file with the same
    keys and per-video options (topk, context, radius, temperature, direction, ...), or a
    folder laid out like YouTube-VOS (JPEGImages/<video>/, Annotations/<video>/).

    Finished videos are reused, so a killed batch resumes; a video that fails is recorded in
    OUT/failures.jsonl and the batch goes on (exit code 1 at the end). Shards balanced by frame
    count: --workers N processes, torchrun ranks, and SLURM job arrays (each task takes
    SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT; see tools/slurm_propagate_batch.sh).
    """
    from dino_vos.eval.vos.batch import BatchJob, run_batch

    job = BatchJob(jobs, out_dir, spec, config, direction, workers, overwrite)
    summary = run_batch(job)
    if summary is not None and summary["failed"]:
        sys.exit(1)
