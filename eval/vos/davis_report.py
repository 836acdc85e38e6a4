"""Outputs of a DAVIS evaluation: the official CSVs, a JSON, a bar chart and terminal tables."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from dino_vos.atomic import atomic_write_json
from dino_vos.console import console
from dino_vos.eval.davis_metrics import GLOBAL_COLUMNS, ObjectScores
from dino_vos.masks import atomic_write_bytes

PER_SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")


def output_paths(out_dir: str | Path, split: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "global_csv": out_dir / f"global_results-{split}.csv",
        "per_sequence_csv": out_dir / f"per-sequence_results-{split}.csv",
        "json": out_dir / f"davis_results-{split}.json",
        "plot": out_dir / f"per-sequence_results-{split}.png",
    }


def _fmt(value: float) -> str:
    """3 decimals, empty for NaN (the official tool's pandas ``float_format='%.3f'``)."""
    return "" if math.isnan(value) else f"{value:.3f}"


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def global_csv(statistics: dict[str, float]) -> bytes:
    return _csv_bytes(GLOBAL_COLUMNS, [[_fmt(statistics[c]) for c in GLOBAL_COLUMNS]])


def per_sequence_csv(objects: Sequence[ObjectScores]) -> bytes:
    rows = []
    for obj in objects:
        stats = obj.statistics()
        rows.append([obj.name, _fmt(stats["J-Mean"]), _fmt(stats["F-Mean"])])
    return _csv_bytes(PER_SEQUENCE_COLUMNS, rows)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(path, payload)


def plot_per_object(
    path: Path, objects: Sequence[ObjectScores], statistics: dict[str, float], title: str
) -> None:
    """Bar chart of J-Mean and F-Mean per object, with the global J&F-Mean as a line."""
    from matplotlib.figure import Figure

    names = [obj.name for obj in objects]
    j = [obj.statistics()["J-Mean"] for obj in objects]
    f = [obj.statistics()["F-Mean"] for obj in objects]
    x = np.arange(len(names))
    figure = Figure(figsize=(max(6.0, 0.32 * len(names) + 2.0), 4.5))
    ax = figure.subplots()
    ax.bar(x - 0.2, j, 0.4, label="J-Mean (region)", color="#4C72B0")
    ax.bar(x + 0.2, f, 0.4, label="F-Mean (boundary)", color="#DD8452")
    ax.axhline(
        statistics["J&F-Mean"],
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"J&F-Mean {statistics['J&F-Mean']:.3f}",
    )
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def print_tables(statistics: dict[str, float], objects: Sequence[ObjectScores], split: str) -> None:
    """Per-object and global tables on the console."""
    per_object = Table(title=f"Per-object results ({split})", title_justify="left")
    for column in ("Sequence", "J-Mean", "F-Mean", "J&F"):
        per_object.add_column(column, justify="left" if column == "Sequence" else "right")
    for obj in objects:
        stats = obj.statistics()
        jf = (stats["J-Mean"] + stats["F-Mean"]) / 2
        per_object.add_row(obj.name, _fmt(stats["J-Mean"]), _fmt(stats["F-Mean"]), _fmt(jf))
    console.print(per_object)
    summary = Table(title=f"Global results ({split}, {len(objects)} objects)", title_justify="left")
    for column in GLOBAL_COLUMNS:
        summary.add_column(column, justify="right", style="bold" if column == "J&F-Mean" else None)
    summary.add_row(*[_fmt(statistics[c]) for c in GLOBAL_COLUMNS])
    console.print(summary)
