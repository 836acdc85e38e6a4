"""Parameter sweeps of ``eval davis`` over one feature cache: :class:`SweepGrid` in, rows out.

Every setting of the grid is an ordinary ``eval davis`` run into ``OUT/settings/<tag>/`` (so it
resumes, and a complete setting is reused as it is); all of them read the backbone features from
one :class:`~dino_vos.eval.vos.cache.FeatureCache` (``--cache`` or ``OUT/feature-cache``), which the
first setting fills. Rank 0 writes ``sweep.csv``, ``sweep.json`` and a heat-map ``sweep.png``.

This module imports no torch at load time: the command line parses a grid before any model.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_vos.atomic import atomic_write_bytes, atomic_write_json
from dino_vos.console import console
from dino_vos.errors import DinoVosError, InputError, param
from dino_vos.outputs import listed_outputs, locked_output_on_main_rank, read_manifest
from dino_vos.result_folder import ResultFolder
from dino_vos.spec import PropagationConfig

if TYPE_CHECKING:
    from dino_vos.eval.vos.davis_job import DavisJob

#: The ``format`` of the manifest of a sweep folder.
SWEEP_FORMAT = "dino-vos-davis-sweep"
#: The PropagationConfig fields a sweep may vary, in the order of tags and columns.
SWEEP_PARAMETERS: tuple[str, ...] = ("topk", "context", "radius", "temperature", "max_references")
SETTINGS_DIR = "settings"
CACHE_DIR = "feature-cache"
SWEEP_OUTPUTS = {"csv": "sweep.csv", "json": "sweep.json", "plot": "sweep.png"}
METRICS: tuple[str, ...] = ("J&F-Mean", "J-Mean", "F-Mean")

Value = int | float | None


def split_tokens(tokens: Iterable[str]) -> dict[str, list[str]]:
    """``["topk=5,10", "radius=12,none"]`` -> ``{"topk": ["5", "10"], ...}``: the syntax only
    (names known, once each, at least one value); values are converted by the caller."""
    axes: dict[str, list[str]] = {}
    for token in tokens:
        name, sep, values = token.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise InputError(
                f"cannot read sweep {token!r}: give NAME=V1,V2 with NAME one of "
                f"{', '.join(SWEEP_PARAMETERS)}"
            )
        if name not in SWEEP_PARAMETERS:
            raise InputError(f"unknown sweep parameter {name!r}: use {', '.join(SWEEP_PARAMETERS)}")
        if name in axes:
            raise InputError(f"sweep parameter {name} is given twice: list its values once")
        parts = [part.strip() for part in values.split(",")]
        if not values.strip() or any(not part for part in parts):
            raise InputError(f"sweep {token!r} has an empty value: give NAME=V1,V2")
        axes[name] = parts
    if not axes:
        raise InputError(f"{param('sweep')} needs at least one NAME=V1,V2")
    return axes


def _tag_value(value: Value) -> str:
    return "none" if value is None else repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SweepGrid:
    """The values of each swept parameter (in :data:`SWEEP_PARAMETERS` order); the settings are
    their product, the other parameters come from a base :class:`PropagationConfig`."""

    axes: tuple[tuple[str, tuple[Value, ...]], ...]

    @classmethod
    def from_values(cls, values: Mapping[str, Sequence[Value]]) -> SweepGrid:
        """Check names and values (no repeats) and order the axes canonically."""
        for name, given in values.items():
            if name not in SWEEP_PARAMETERS:
                raise InputError(
                    f"unknown sweep parameter {name!r}: use {', '.join(SWEEP_PARAMETERS)}"
                )
            if len(set(given)) != len(given) or not given:
                raise InputError(f"sweep parameter {name} lists a value twice (or none)")
        axes = tuple((name, tuple(values[name])) for name in SWEEP_PARAMETERS if name in values)
        return cls(axes)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.axes]

    def points(self) -> list[dict[str, Value]]:
        """Every setting as ``{name: value}``, the last parameter varying fastest."""
        return [
            dict(zip(self.names, combo, strict=True))
            for combo in itertools.product(*(values for _, values in self.axes))
        ]

    def configs(self, base: PropagationConfig) -> list[PropagationConfig]:
        """The settings as configs (``base`` supplies the parameters not swept)."""
        configs = []
        for point in self.points():
            settings: dict[str, Any] = point  # each value checked by PropagationConfig
            try:
                configs.append(dataclasses.replace(base, **settings))
            except (TypeError, ValueError) as exc:
                raise InputError(f"sweep setting {tag(point)} is not valid: {exc}") from None
        return configs

    def to_dict(self) -> dict[str, list[Value]]:
        return {name: list(values) for name, values in self.axes}


def tag(point: dict[str, Value]) -> str:
    """Folder name of a setting: ``topk5-context7-radius12-temperature0.1``."""
    return "-".join(
        f"{name}{_tag_value(point[name])}" for name in SWEEP_PARAMETERS if name in point
    )


@dataclass(frozen=True)
class SweepJob:
    """A sweep: ``base`` is the ``eval davis`` job (``out_dir`` = the sweep folder; its
    ``cache_dir``, or ``OUT/feature-cache`` when None, is shared by every setting)."""

    base: DavisJob
    grid: SweepGrid

    @property
    def out_dir(self) -> Path:
        assert self.base.out_dir is not None  # a sweep propagates: check() asks for --out
        return self.base.out_dir

    @property
    def cache_dir(self) -> Path:
        return self.base.cache_dir or self.out_dir / CACHE_DIR

    def setting_job(self, point: dict[str, Value]) -> DavisJob:
        """The ordinary ``eval davis`` job of one setting."""
        (config,) = SweepGrid.from_values({k: [v] for k, v in point.items()}).configs(
            self.base.config
        )
        return dataclasses.replace(
            self.base,
            out_dir=self.out_dir / SETTINGS_DIR / tag(point),
            config=config,
            cache_dir=self.cache_dir,
        )

    def result_folder(self) -> ResultFolder:
        reports = tuple(SWEEP_OUTPUTS.values())
        return ResultFolder(self.out_dir, SWEEP_FORMAT, self.sweep_key(), reports, "sweep")

    def sweep_key(self) -> dict[str, Any]:
        key = self.base.run_key()
        key["propagation"] = self.base.config.to_dict()
        return {"run": key, "grid": self.grid.to_dict(), "cache": str(self.cache_dir)}


@dataclass
class SweepRow:
    """One setting's outcome: its parameters, global scores, time and how it was obtained."""

    tag: str
    parameters: dict[str, Value]
    scores: dict[str, float]  # J&F-Mean, J-Mean, F-Mean
    seconds: float  # the setting's run time (status reused: as recorded by the run that made it)
    # "propagated" (run now), "rescored" (run now, every sequence's masks found finished: only
    # scored, so its seconds are not a propagation time) or "reused" (complete reports found)
    status: str
    cache_hits: int = 0
    cache_misses: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            **self.parameters,
            **{metric: self.scores[metric] for metric in METRICS},
            "seconds": round(self.seconds, 3),
            "status": self.status,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
        }


def _reports(job: DavisJob) -> Path:
    from dino_vos.eval.vos.davis_report import output_paths

    return output_paths(job.report_dir, job.report_label)["json"]


def _row(point: dict[str, Value], job: DavisJob, status: str) -> SweepRow:
    import json

    try:
        payload = json.loads(_reports(job).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the reports of sweep setting {tag(point)}: {exc}") from None
    cache = payload.get("cache") or {}
    if status == "propagated" and not payload["timing"].get("propagated_frames"):
        status = "rescored"
    return SweepRow(
        tag=tag(point),
        parameters=point,
        scores={metric: float(payload["global"][metric]) for metric in METRICS},
        seconds=float(payload["timing"]["seconds"]),
        status=status,
        cache_hits=int(cache.get("hits", 0)),
        cache_misses=int(cache.get("misses", 0)),
    )


def run_sweep(job: SweepJob) -> list[SweepRow] | None:
    """Run (or reuse) every setting; rank 0 writes the sweep reports and returns the rows (other
    torchrun ranks run their share of each setting and return None).

    Under torchrun one gloo process group serves the whole sweep: rank 0 checks the inputs and
    the output folder, decides which settings are complete and tells the other ranks (its error,
    if any, stops every rank at once instead of leaving them waiting).
    """
    from dino_vos.distributed import launch_env

    job.base.check(sweep=True)
    points = job.grid.points()
    jobs = [job.setting_job(point) for point in points]  # validates every setting up front
    rank, world = launch_env()
    with locked_output_on_main_rank(job.out_dir):  # one sweep at a time in a folder
        return _run_sweep(job, points, jobs, rank, world)


def _run_sweep(
    job: SweepJob,
    points: Sequence[dict[str, Value]],
    jobs: Sequence[DavisJob],
    rank: int,
    world: int,
) -> list[SweepRow] | None:
    if world <= 1:
        return _run_settings(job, points, jobs, _prepare(job, jobs), rank)
    import torch.distributed as dist

    from dino_vos.distributed import GATHER_TIMEOUT, all_gather_objects, is_enabled

    created = not is_enabled()
    if created:
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    try:
        error: DinoVosError | None = None
        plan: list[bool] | None = None
        if rank == 0:
            try:
                plan = _prepare(job, jobs)
            except DinoVosError as exc:
                error = exc
        message, plan = all_gather_objects((str(error) if error else None, plan))[0]
        if error is not None:
            raise error
        if message is not None:
            raise InputError(message)
        return _run_settings(job, points, jobs, plan, rank)
    finally:
        if created and is_enabled():
            dist.destroy_process_group()


def _prepare(job: SweepJob, jobs: Sequence[DavisJob]) -> list[bool]:
    """Check the inputs and claim the sweep folder; which settings are complete."""
    base = job.base
    dataset = base.dataset()  # input errors before anything is written
    job.result_folder().claim(dataset.inputs, base.overwrite, base.cache_dir)
    return [setting.result_folder().is_complete() for setting in jobs]


def _run_settings(
    job: SweepJob,
    points: Sequence[dict[str, Value]],
    jobs: Sequence[DavisJob],
    complete: Sequence[bool],
    rank: int,
) -> list[SweepRow] | None:
    from dino_vos.eval.vos.davis_job import run_davis

    features = None
    rows: list[SweepRow] = []
    for index, (point, setting, done) in enumerate(zip(points, jobs, complete, strict=True)):
        console.print(f"[bold]Sweep setting {index + 1}/{len(points)}:[/] {tag(point)}")
        if done:
            console.print("Complete reports found: reused")
            if rank == 0:
                rows.append(_row(point, setting, "reused"))
            continue
        if features is None:  # built once (worker processes build their own per setting)
            assert job.base.spec is not None  # a sweep propagates: check() asks for a backbone
            features = job.base.spec.build(announce=True)
        run = run_davis(setting, features)
        if run is not None:
            rows.append(_row(point, setting, "propagated"))
    if rank != 0:
        return None
    job.result_folder().complete(write_sweep_reports(job, rows))
    return rows


# --- reports ----------------------------------------------------------------------------------


def influence(rows: Sequence[SweepRow], names: Sequence[str]) -> dict[str, float]:
    """Per parameter: the spread (max - min) of the mean J&F over its values, each mean taken
    over all settings with that value (the other parameters marginalised)."""
    spreads = {}
    for name in names:
        means = []
        for value in dict.fromkeys(row.parameters[name] for row in rows):
            scores = [
                row.scores["J&F-Mean"]
                for row in rows
                if row.parameters[name] == value and not math.isnan(row.scores["J&F-Mean"])
            ]
            if scores:
                means.append(sum(scores) / len(scores))
        spreads[name] = max(means) - min(means) if len(means) > 1 else 0.0
    return spreads


def heatmap_axes(grid: SweepGrid, spreads: dict[str, float]) -> list[str]:
    """The (up to) two most influential parameters that take several values (ties: grid order)."""
    varying = [name for name, values in grid.axes if len(values) > 1]
    return sorted(varying, key=lambda name: -spreads[name])[:2]


def heatmap_cells(
    rows: Sequence[SweepRow], y: str, x: str | None, grid: SweepGrid
) -> tuple[list[Value], list[Value], list[list[float]]]:
    """(y values, x values, best J&F of each cell over the other parameters; NaN if none)."""
    values = dict(grid.axes)
    ys = list(values[y])
    xs: list[Value] = list(values[x]) if x is not None else [None]
    cells = []
    for yv in ys:
        line = []
        for xv in xs:
            scores = [
                row.scores["J&F-Mean"]
                for row in rows
                if row.parameters[y] == yv
                and (x is None or row.parameters[x] == xv)
                and not math.isnan(row.scores["J&F-Mean"])
            ]
            line.append(max(scores) if scores else math.nan)
        cells.append(line)
    return ys, xs, cells


def plot_heatmap(
    path: Path, rows: Sequence[SweepRow], axes: Sequence[str], grid: SweepGrid
) -> None:
    """Heat-map of the best J&F-Mean over the two most influential parameters."""
    import numpy as np
    from matplotlib.figure import Figure

    y, x = axes[0], (axes[1] if len(axes) > 1 else None)
    ys, xs, cells = heatmap_cells(rows, y, x, grid)
    data = np.array(cells, dtype=float)
    figure = Figure(figsize=(max(4.5, 1.2 * len(xs) + 2.5), max(3.5, 0.8 * len(ys) + 2.0)))
    ax = figure.subplots()
    image = ax.imshow(data, cmap="viridis", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not math.isnan(data[i, j]):
                bright = np.asarray(image.norm(data[i, j])) > 0.6  # viridis turns yellow: dark text
                color = "black" if bright else "white"
                ax.text(j, i, f"{data[i, j]:.3f}", ha="center", va="center", color=color)
    ax.set_yticks(range(len(ys)), [_tag_value(v) for v in ys])
    ax.set_ylabel(y)
    ax.set_xticks(range(len(xs)), [_tag_value(v) for v in xs] if x else [""])
    ax.set_xlabel(x or "")
    others = [name for name in grid.names if name not in axes]
    ax.set_title("Best J&F-Mean" + (f" over {', '.join(others)}" if others else ""), fontsize=10)
    figure.colorbar(image, ax=ax, label="J&F-Mean")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def sweep_csv(rows: Sequence[SweepRow], names: Sequence[str]) -> bytes:
    columns = [*names, *METRICS, "seconds", "status", "cache_hits", "cache_misses", "tag"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = row.to_dict()
        writer.writerow(
            [
                _tag_value(values[c])
                if c in names
                else f"{values[c]:.3f}"
                if c in METRICS
                else values[c]
                for c in columns
            ]
        )
    return buffer.getvalue().encode()


def write_sweep_reports(job: SweepJob, rows: Sequence[SweepRow]) -> list[str]:
    """sweep.csv and sweep.json (rows in grid order), the heat-map and a table sorted by J&F;
    returns the names written."""
    from rich.table import Table

    names = job.grid.names
    out = job.out_dir
    spreads = influence(rows, names)
    axes = heatmap_axes(job.grid, spreads)
    atomic_write_bytes(out / SWEEP_OUTPUTS["csv"], sweep_csv(rows, names))
    plot = out / SWEEP_OUTPUTS["plot"]
    if axes:
        plot_heatmap(plot, rows, axes, job.grid)
    elif plot.name in listed_outputs(read_manifest(out)):
        plot.unlink(
            missing_ok=True
        )  # a sweep of one setting has no map: remove ours from an earlier sweep
    atomic_write_json(
        out / SWEEP_OUTPUTS["json"],
        {
            "format": SWEEP_FORMAT,
            "grid": job.grid.to_dict(),
            "base_propagation": job.base.config.to_dict(),
            "influence": {name: round(spreads[name], 4) for name in names},
            "influence_rule": "spread (max - min) over a parameter's values of the mean J&F-Mean "
            "of the settings with that value",
            "heatmap": {
                "y": axes[0] if axes else None,
                "x": axes[1] if len(axes) > 1 else None,
                "cell": "best J&F-Mean over the other parameters",
            },
            "cache": str(job.cache_dir),
            "rows": [row.to_dict() for row in rows],
        },
    )
    table = Table(title=f"Sweep ({len(rows)} settings, by J&F-Mean)", title_justify="left")
    for column in [*names, *METRICS, "seconds", "status"]:
        table.add_column(
            column,
            justify="right",
            style="bold" if column == "J&F-Mean" else None,
            min_width=len("propagated") if column == "status" else len(column),  # the longest
        )
    for row in sorted(rows, key=lambda r: -_sortable(r.scores["J&F-Mean"])):
        table.add_row(
            *[_tag_value(row.parameters[name]) for name in names],
            *[f"{row.scores[metric]:.3f}" for metric in METRICS],
            f"{row.seconds:.1f}",
            row.status,
        )
    console.print(table)
    influence_text = ", ".join(f"{name} {spreads[name]:.3f}" for name in names)
    console.print(f"Influence (spread of mean J&F): {influence_text}")
    written = [SWEEP_OUTPUTS["csv"], SWEEP_OUTPUTS["json"]] + ([plot.name] if axes else [])
    console.print(f"Wrote {', '.join(written)} to {out}")
    return written


def _sortable(value: float) -> float:
    return -math.inf if math.isnan(value) else value
