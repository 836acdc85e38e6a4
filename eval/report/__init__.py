"""``dino-vos report``: an offline HTML report to scrub, compare and diagnose runs.

:func:`write_report` reads result folders (:mod:`dino_vos.eval.report.runs`), draws
bounded-size pictures (:mod:`dino_vos.eval.report.images`) and writes a static site
(:mod:`dino_vos.eval.report.site`) that opens from ``file://``. It needs no backbone: only the
result folders and their frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_MAX_SIDE = 480


def write_report(
    runs: Sequence[str | Path],
    out: str | Path,
    max_side: int = DEFAULT_MAX_SIDE,
    ground_truth: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the report of the result folders ``runs`` into ``out``; returns its index.html.

    ``ground_truth``: a folder of PNG masks named like the frames, scored against ``propagate``
    outputs (a ``demo`` folder brings its own).
    """
    from dino_vos.errors import InputError, param
    from dino_vos.eval.report.runs import load_run, unique_labels
    from dino_vos.eval.report.site import write_site

    if not runs:
        raise InputError("give at least one result folder to report on")
    if max_side < 32:
        raise InputError(f"{param('max_side', max_side)} is too small: use 32 pixels or more")
    loaded = [load_run(run, ground_truth) for run in runs]
    unique_labels(loaded)
    write_site(loaded, Path(out), max_side, overwrite)
    return Path(out) / "index.html"


def report_summary(out: str | Path) -> dict[str, Any]:
    """The manifest of a written report (size in bytes, seconds, runs)."""
    from dino_vos.outputs import read_manifest

    return read_manifest(out)
