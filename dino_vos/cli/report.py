"""``dino-vos report``: an offline HTML report of result folders (no backbone needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from dino_vos.cli.options import overwrite_option

DEFAULT_MAX_SIDE = 480

report_option = click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write an offline HTML report of this run into REPORT (see dino-vos report).",
)


def check_report_dir(report_dir: Path | None, inputs: Sequence[Path]) -> None:
    """Apply the output rules to ``--report`` before a run starts (not after hours of it)."""
    if report_dir is None:
        return
    from dino_vos.eval.report.site import check_report_target

    check_report_target(report_dir, inputs)


def write_run_report(run_dir: Path, report_dir: Path | None) -> None:
    """The ``--report`` of ``eval davis`` and ``propagate``: written at the end, path printed."""
    if report_dir is None:
        return
    from dino_vos.console import console
    from dino_vos.eval.report import write_report

    index = write_report([run_dir], report_dir, DEFAULT_MAX_SIDE)
    console.print(f"Report: open {index.resolve().as_uri()}", soft_wrap=True)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Report folder (index.html and its files); never inside a run or its frames.",
)
@click.option(
    "--max-side",
    type=click.IntRange(min=32),
    default=DEFAULT_MAX_SIDE,
    show_default=True,
    help="Longest side of the report's pictures, in pixels (frames are never enlarged).",
)
@click.option(
    "--ground-truth",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG masks named like the frames, scored against propagate outputs (a demo folder "
    "brings its own).",
)
@overwrite_option
def report(
    runs: tuple[Path, ...],
    out_dir: Path,
    max_side: int,
    ground_truth: Path | None,
    overwrite: bool,
) -> None:
    """Write an offline HTML report of result folders: RUN is an eval davis, eval youtube-vos,
    propagate, demo, sweep or attention output; several runs are compared side by side.

    The overview sorts every sequence and object by J&F, J and F (with several runs, by the
    largest change); a sequence page scrubs the frames with every run's masks, the ground
    truth, false positives / negatives and per-frame J and F curves. Opens from file://.
    """
    import time

    from dino_vos.console import console
    from dino_vos.eval.report import report_summary, write_report

    start = time.perf_counter()
    index = write_report(list(runs), out_dir, max_side, ground_truth, overwrite)
    summary = report_summary(out_dir)
    megabytes = summary.get("bytes", 0) / 1e6
    seconds = time.perf_counter() - start
    console.print(
        f"Wrote the report of {len(runs)} run{'s' * (len(runs) != 1)} to {out_dir} "
        f"({megabytes:.1f} MB, {seconds:.1f} s): open {index.resolve().as_uri()}",
        soft_wrap=True,
    )
