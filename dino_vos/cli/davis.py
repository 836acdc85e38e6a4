"""``dino-vos eval davis``: J&F of label propagation on a DAVIS split (or of existing results)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from dino_vos.cli.options import (
    IntRange,
    cache_option,
    check_frames_fit,
    convert_propagation_value,
    direction_option,
    overwrite_option,
    process_workers_option,
    propagation_options,
    with_backbone_spec,
)
from dino_vos.cli.report import check_report_dir, report_option, write_run_report
from dino_vos.errors import InputError
from dino_vos.spec import BackboneSpec, Direction, KeyframeSchedule, PropagationConfig

if TYPE_CHECKING:
    from dino_vos.eval.vos.sweep import SweepGrid

#: (height, width) of DAVIS 480p frames, the smallest resolution DAVIS ships: the memory check
#: before the model loads is a lower bound for every resolution.
DAVIS_SMALLEST_FRAME = (480, 854)


@click.command("davis")
@click.option(
    "--davis-root",
    required=True,
    type=click.Path(path_type=Path),
    help="DAVIS folder holding JPEGImages/, Annotations/ and ImageSets/.",
)
@click.option("--split", default="val", show_default=True, help="ImageSets/<year>/<split>.txt.")
@click.option(
    "--year", default=None, help="ImageSets year folder [default: latest with the split]."
)
@click.option(
    "--resolution", default="480p", show_default=True, help="Sub-folder of JPEGImages/Annotations."
)
@click.option("--sequences", default=None, help="Comma-separated sequences (overrides the split).")
@click.option(
    "--results",
    "results_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Only score existing masks RESULTS/<seq>/<frame>.png (no propagation).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder: masks per sequence, CSVs, JSON, plot [--results: default RESULTS].",
)
@propagation_options
@cache_option
@process_workers_option("Sequences")
@click.option(
    "--max-frames",
    type=IntRange(min=3),
    default=None,
    help="Only the first N frames of every sequence (quick checks; not comparable numbers).",
)
@click.option(
    "--ignore-void",
    is_flag=True,
    help="Exclude ground-truth 255 pixels from J and F (the official tool counts them as "
    "background).",
)
@click.option(
    "--keyframes",
    default=None,
    metavar="every:N|LIST",
    help="Simulate corrections: give the ground truth of every N-th frame (or of the listed "
    "frame indices) as keyframes. Reported separately (report names get -keyframes-...); those "
    "frames are not scored. Not the standard protocol.",
)
@direction_option(
    ["forward", "both"], "both: fuse forward and backward propagation between keyframes."
)
@click.option(
    "--sweep",
    "sweep",
    multiple=True,
    metavar="NAME=V1,V2",
    help="Sweep propagation parameters (topk, context, radius, temperature, max_references) over "
    "one feature cache: every combination runs into OUT/settings/<tag>/; further NAME=V1,V2 may "
    "follow as arguments. Writes OUT/sweep.csv, sweep.json, sweep.png (docs/evaluation.md: "
    "Parameter sweeps).",
)
@click.argument("sweep_more", nargs=-1, metavar="[NAME=V1,V2]...")
@click.option(
    "--select-on",
    default=None,
    metavar="SPLIT",
    help="With --sweep: run the grid on SPLIT (e.g. train), choose the setting with the best "
    "J&F-Mean there and run only it on --split; OUT/selection.json states the grid, the choice "
    "and both scores. SPLIT must not be --split.",
)
@report_option
@overwrite_option
@with_backbone_spec(seed=True, frames=True)
def davis(
    davis_root: Path,
    split: str,
    year: str | None,
    resolution: str,
    sequences: str | None,
    results_dir: Path | None,
    out_dir: Path | None,
    config: PropagationConfig,
    cache_dir: Path | None,
    workers: int,
    max_frames: int | None,
    ignore_void: bool,
    keyframes: str | None,
    direction: Direction,
    sweep: tuple[str, ...],
    sweep_more: tuple[str, ...],
    select_on: str | None,
    report_dir: Path | None,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """J&F of label propagation on a DAVIS split, scored like the official DAVIS 2017 tool.

    Propagates every sequence into OUT/<seq>/ (complete sequences are reused, so an interrupted
    run resumes), then writes global_results-<split>.csv, per-sequence_results-<split>.csv,
    davis_results-<split>.json and a per-object bar chart. Under torchrun every rank takes a
    share of the sequences and rank 0 writes the results.

    --sweep topk=5,10 context=7,20 runs every combination over one feature cache (--cache, else
    OUT/feature-cache) and writes a table, sweep.csv, sweep.json and a heat-map to OUT.

    --sweep ... --select-on train selects on train and reports --split: the grid runs on train
    (OUT/select-on-train/), the best setting there runs on --split (OUT/chosen-<split>/), and
    OUT/selection.json states both scores.
    """
    if sweep_more and not sweep:
        raise click.UsageError(
            f"unexpected argument {sweep_more[0]!r}: NAME=V1,V2 arguments need --sweep"
        )
    grid = _sweep_grid([*sweep, *sweep_more]) if sweep else None  # checked before torch loads
    if select_on is not None and grid is None:
        raise click.UsageError("--select-on chooses among the settings of a grid: add --sweep")
    try:
        schedule = KeyframeSchedule.parse(keyframes) if keyframes is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--keyframes") from None
    _check_inputs(davis_root, results_dir, out_dir)  # before torch loads
    if results_dir is None:
        check_frames_fit(spec, DAVIS_SMALLEST_FRAME)
    from dino_vos.eval.vos.davis_job import DavisJob, run_davis

    names = tuple(n.strip() for n in sequences.split(",") if n.strip()) if sequences else None
    given = [
        flag
        for flag, value in (
            ("--backbone", spec.name),
            ("--weights", spec.weights),
            ("--random-init", spec.random_init),
            ("--cache", cache_dir),
        )
        if value
    ]
    job = DavisJob(
        davis_root=davis_root,
        split=split,
        year=year,
        resolution=resolution,
        sequences=names,
        results_dir=results_dir,
        out_dir=out_dir,
        spec=None if results_dir is not None else spec,
        config=config,
        cache_dir=cache_dir,
        workers=workers,
        max_frames=max_frames,
        ignore_void=ignore_void,
        overwrite=overwrite,
        keyframes=schedule,
        direction=direction,
    )
    job.check(given, sweep=grid is not None)
    data = [davis_root / "Annotations", davis_root / "JPEGImages"]
    check_report_dir(report_dir, [*data, job.report_dir])
    if grid is None:
        if run_davis(job) is not None:  # rank 0
            write_run_report(job.report_dir, report_dir)
        return
    from dino_vos.eval.vos.sweep import SweepJob, run_sweep

    if select_on is None:
        if run_sweep(SweepJob(job, grid)) is not None:
            write_run_report(job.report_dir, report_dir)
        return
    from dino_vos.eval.vos.selection import SelectionJob, run_selection

    if run_selection(SelectionJob(SweepJob(job, grid), select_on)) is not None:
        # the report shows the reported run: the chosen setting on --split
        write_run_report(job.report_dir / f"chosen-{job.split}", report_dir)


def _sweep_grid(tokens: list[str]) -> SweepGrid:
    """The grid of ``--sweep`` tokens, each value read by its option's own type."""
    from dino_vos.eval.vos.sweep import SweepGrid, split_tokens

    values = {}
    for name, texts in split_tokens(tokens).items():
        converted = []
        for text in texts:
            try:
                converted.append(convert_propagation_value(name, text))
            except click.BadParameter as exc:
                raise click.BadParameter(
                    f"{name}={text}: {exc.message}", param_hint="--sweep"
                ) from None
        values[name] = converted
    return SweepGrid.from_values(values)


def _check_inputs(davis_root: Path, results_dir: Path | None, out_dir: Path | None) -> None:
    """The DAVIS root exists and a mode is chosen (:meth:`DavisJob.check` checks the rest, mode
    conflicts first, then the --results folder)."""
    if not davis_root.is_dir():
        raise InputError(
            f"DAVIS root not found: {davis_root} (give the folder holding JPEGImages/, "
            "Annotations/ and ImageSets/)"
        )
    if results_dir is None and out_dir is None:
        raise InputError("give --out DIR to propagate and score, or --results DIR to only score")
