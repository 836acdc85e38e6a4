"""Write the static report: ``index.html``, our script and style, data scripts and pictures.

Everything a page needs is a relative file of the report folder: data travels as small
JavaScript files (``data/*.js``, loaded with ``<script>``, which ``file://`` allows where
``fetch`` is refused), so the folder opens from disk with no server and no network.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dino_vos import __version__
from dino_vos.errors import InputError, param
from dino_vos.eval.report import images
from dino_vos.eval.report.runs import Run, SequenceResult
from dino_vos.masks import read_mask
from dino_vos.outputs import check_out_dir, read_manifest
from dino_vos.writers import OutputSink

if TYPE_CHECKING:
    from dino_vos.sources import Frame

REPORT_FORMAT = "dino-vos-report"
STATIC_FILES = ("index.html", "report.js", "report.css")
DEFAULT_MAX_SIDE = 480


@dataclass
class SequenceGroup:
    """One sequence name and what every run holds for it (None where a run lacks it)."""

    name: str
    slug: str
    results: list[SequenceResult | None] = field(default_factory=list)

    @property
    def reference(self) -> SequenceResult:
        """The result whose frames the page shows (the longest), ground truth preferred."""
        present = [r for r in self.results if r is not None]
        return max(present, key=lambda r: (len(r.stems), bool(r.ground_truth)))

    @property
    def ground_truth(self) -> dict[str, Path]:
        for result in self.results:
            if result is not None and result.ground_truth:
                return result.ground_truth
        return {}


def is_report(folder: Path) -> bool:
    return read_manifest(folder).get("format") == REPORT_FORMAT


def check_report_dir(out: Path, runs: list[Run], overwrite: bool = False) -> None:
    """The output rules: not an input of any run, no foreign folder, no other command's result."""
    inputs = [path for run in runs for path in run.inputs]
    check_report_target(out, inputs, overwrite, "out")


def check_report_target(
    out: Path, inputs: Sequence[Path], overwrite: bool = False, name: str = "report"
) -> None:
    """The output rules for a report folder (also of a run still to come, ``report``)."""
    manifest = read_manifest(out)
    if manifest and not is_report(out):
        raise InputError(
            f"{param(name, out)} holds a dino-vos {manifest.get('format', 'propagate')} result, "
            "not a report: choose another folder"
        )
    check_out_dir(out, inputs, overwrite, name=name, is_previous_result=is_report)


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "sequence"
    slug, number = base, 1
    while slug in taken:
        number += 1
        slug = f"{base}-{number}"
    taken.add(slug)
    return slug


def group_sequences(runs: list[Run]) -> list[SequenceGroup]:
    groups: dict[str, SequenceGroup] = {}
    taken: set[str] = set()
    for index, run in enumerate(runs):
        for sequence in run.sequences:
            if sequence.name not in groups:
                groups[sequence.name] = SequenceGroup(
                    sequence.name, _slug(sequence.name, taken), [None] * len(runs)
                )
            groups[sequence.name].results[index] = sequence
    return list(groups.values())


def _colour(object_id: int) -> str:
    red, green, blue = images.display_colour(object_id)
    return f"#{red:02x}{green:02x}{blue:02x}"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (statistics keep every digit, so the page
    rounds them to the CSV's 3 decimals exactly as the CSV does)."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _script(variable: str, payload: Any) -> bytes:
    text = json.dumps(_clean(payload), separators=(",", ":"), allow_nan=False)
    return f"window.{variable} = {text};\n".encode()


def _object_ids(group: SequenceGroup) -> list[int]:
    ids: set[int] = set()
    truth = group.ground_truth
    if truth:
        first = read_mask(next(iter(truth.values())))
        ids.update(int(v) for v in np.unique(first))
    for result in group.results:
        if result is None:
            continue
        ids.update(obj.object_id for obj in result.objects)
        ids.update(result.object_ids)
    return sorted(i for i in ids if i not in (0, 255))


class ReportWriter:
    """Writes one report into an :class:`OutputSink` (staged, committed with a manifest)."""

    def __init__(self, sink: OutputSink, runs: list[Run], max_side: int) -> None:
        self.sink, self.runs, self.max_side = sink, runs, max_side
        self.bytes_written = 0

    def write(self, name: str, data: bytes) -> None:
        self.sink.write_bytes(name, data)
        self.bytes_written += len(data)

    def _frames(
        self, frames: Path, stems: Sequence[str], base: str
    ) -> Iterator[tuple[int, Frame, tuple[int, int]]]:
        """The frames of ``frames`` named ``stems``, each written once as a JPEG of the display
        size (``base/frames/NNNNN.jpg``, the longer side at most ``max_side``); yields
        (position in ``stems``, frame, display size)."""
        from dino_vos.sources import open_source

        index_of = {stem: t for t, stem in enumerate(stems)}
        size = None
        for frame in open_source(frames, allow_image=True):
            t = index_of.get(frame.name)
            if t is None:
                continue
            if size is None:
                height, width = frame.image.shape[:2]
                size = images.display_size(height, width, self.max_side)
            picture = images.resize_image(frame.image, size)
            self.write(f"{base}/frames/{t:05d}.jpg", images.encode_jpeg(picture))
            yield t, frame, size

    def sequence(self, group: SequenceGroup, advance) -> dict[str, Any]:
        """Pictures and data of one sequence page; returns its overview entry."""
        reference = group.reference
        stems = reference.stems
        ids = _object_ids(group)
        truth = group.ground_truth
        base = f"img/{group.slug}"
        index_of = {stem: t for t, stem in enumerate(stems)}
        has_truth = [0] * len(stems)
        has_mask = [[0] * len(stems) for _ in self.runs]
        has_diff = [[0] * len(stems) for _ in self.runs]
        size = None
        for t, frame, size in self._frames(reference.frames, stems, base):
            gt = None
            if frame.name in truth:
                gt = images.resize_labels(read_mask(truth[frame.name]), size)
                if ids:
                    self.write(f"{base}/gt/{t:05d}.png", images.mask_sprite(gt, ids))
                has_truth[t] = 1
            for r, result in enumerate(group.results):
                if result is None or frame.name not in result.masks or not ids:
                    continue
                labels = images.resize_labels(read_mask(result.masks[frame.name]), size)
                self.write(f"{base}/run{r}/{t:05d}.png", images.mask_sprite(labels, ids))
                has_mask[r][t] = 1
                if gt is not None:
                    sprite = images.difference_sprite(labels, gt, ids)
                    self.write(f"{base}/diff{r}/{t:05d}.png", sprite)
                    has_diff[r][t] = 1
            advance(1)
        if size is None:
            raise InputError(f"no frame of {group.name} found in {reference.frames}")
        runs: list[dict[str, Any] | None] = []
        for r, result in enumerate(group.results):
            if result is None:
                runs.append(None)
                continue
            runs.append(
                {
                    "masks": has_mask[r],
                    "diff": has_diff[r],
                    "keyframes": [index_of[s] for s in result.keyframes if s in index_of],
                    "objects": {
                        str(obj.object_id): {"stats": obj.stats, "J": obj.j, "F": obj.f}
                        for obj in result.objects
                    },
                }
            )
        payload = {
            "name": group.name,
            "slug": group.slug,
            "height": size[0],
            "width": size[1],
            "stems": stems,
            "objects": [{"id": i, "colour": _colour(i)} for i in ids],
            "base": base,
            "gt": has_truth,
            "runs": runs,
        }
        self.write(f"data/seq/{group.slug}.js", _script("DINO_VOS_SEQUENCE", payload))
        return {
            "name": group.name,
            "slug": group.slug,
            "frames": len(stems),
            "objects": ids,
            "runs": [result is not None for result in group.results],
            "groundTruth": bool(truth),
        }

    def attention(self, run: Run, slug: str, advance) -> dict[str, Any]:
        from PIL import Image

        attention = run.attention
        assert attention is not None
        base = f"img/{slug}"
        size = tile = None
        for t, frame, shown in self._frames(attention.frames, attention.stems, base):
            size = shown
            if tile is None:
                height, width = frame.image.shape[:2]
                tile = images.display_size(height, width, max(64, self.max_side // 2))
            for name in attention.maps:
                with Image.open(run.path / name / f"{frame.name}.png") as heat:
                    rgb = np.asarray(heat.convert("RGB"))
                small = images.resize_image(rgb, tile)
                self.write(f"{base}/{name}/{t:05d}.jpg", images.encode_jpeg(small))
            advance(1)
        payload = {
            "name": attention.name,
            "slug": slug,
            "base": base,
            "stems": attention.stems,
            "maps": attention.maps,
            "height": size[0] if size else 0,
            "width": size[1] if size else 0,
        }
        self.write(f"data/seq/{slug}.js", _script("DINO_VOS_SEQUENCE", payload))
        return {"name": run.label, "slug": slug, "frames": len(attention.stems)}


def _overview_rows(runs: list[Run], groups: list[SequenceGroup]) -> list[dict[str, Any]]:
    rows = []
    for group in groups:
        ids = sorted({o.object_id for r in group.results if r is not None for o in r.objects})
        for object_id in ids:
            cells = []
            for result in group.results:
                found = None
                if result is not None:
                    found = next((o for o in result.objects if o.object_id == object_id), None)
                cells.append(found.stats if found else None)
            rows.append(
                {"sequence": group.name, "slug": group.slug, "object": object_id, "runs": cells}
            )
    return rows


def write_site(
    runs: list[Run], out: Path, max_side: int = DEFAULT_MAX_SIDE, overwrite: bool = False
) -> dict[str, Any]:
    """Write the report of ``runs`` into ``out``; returns its manifest."""
    from dino_vos.console import progress_bar

    start = time.perf_counter()
    check_report_dir(out, runs, overwrite)
    groups = group_sequences([run for run in runs])
    attention_runs = [run for run in runs if run.attention is not None]
    taken = {group.slug for group in groups}
    total = sum(len(g.reference.stems) for g in groups)
    total += sum(len(r.attention.stems) for r in attention_runs if r.attention is not None)
    inputs = [path for run in runs for path in run.inputs]
    with OutputSink(out, None, 25.0, overwrite, inputs) as sink:
        writer = ReportWriter(sink, runs, max_side)
        with progress_bar("frames") as progress:
            task = progress.add_task("Report", total=total)

            def advance(n: int) -> None:
                progress.advance(task, n)

            sequences = [writer.sequence(group, advance) for group in groups]
            attention = [
                writer.attention(run, _slug(f"attention-{run.label}", taken), advance)
                for run in attention_runs
            ]
        sweeps = []
        for index, run in enumerate(runs):
            if run.sweep is None:
                continue
            heatmap = None
            if run.sweep.heatmap is not None:
                heatmap = f"img/sweep-{index}.png"
                writer.write(heatmap, run.sweep.heatmap.read_bytes())
            sweeps.append(
                {
                    "label": run.label,
                    "parameters": run.sweep.parameters,
                    "rows": run.sweep.rows,
                    "heatmap": heatmap,
                }
            )
        overview = {
            "version": __version__,
            "runs": [
                {
                    "label": run.label,
                    "kind": run.kind,
                    "path": str(run.path),
                    "global": run.summary.get("global"),
                    "settings": run.summary.get("settings"),
                }
                for run in runs
            ],
            "rows": _overview_rows(runs, groups),
            "sequences": sequences,
            "attention": attention,
            "sweeps": sweeps,
        }
        writer.write("data/index.js", _script("DINO_VOS_REPORT", overview))
        static = resources.files("dino_vos.eval.report") / "static"
        for name in STATIC_FILES:
            writer.write(name, (static / name).read_bytes())
        manifest = {
            "format": REPORT_FORMAT,
            "dino_vos": __version__,
            "runs": [str(run.path) for run in runs],
            "max_side": max_side,
            "bytes": writer.bytes_written,
            "seconds": round(time.perf_counter() - start, 3),
        }
        sink.commit(manifest)
    return manifest
