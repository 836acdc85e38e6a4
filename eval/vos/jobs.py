"""The jobs of ``propagate-batch``: a reader of CSV, JSON-lines and YouTube-VOS-layout lists.

- CSV with the header ``input,mask`` (``masks``: a folder of sparse keyframe PNGs named like the
  frames, instead of or besides ``mask``; ``id``: the result folder, default the input's stem);
  paths are relative to the CSV's folder;
- JSON lines (``.jsonl``) with the same keys per line, plus per-video propagation options
  (:data:`LINE_OPTIONS`) over the command's;
- a folder laid out like YouTube-VOS: ``JPEGImages/<video>/`` and ``Annotations/<video>/``.

The list is checked up front (keys, options, unique ids that are folder names); each video's
input and masks only when it runs, so one broken video fails alone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_vos.errors import InputError
from dino_vos.outputs import MANIFEST_NAME
from dino_vos.runner import RunnerSettings, VideoTask
from dino_vos.sources import natural_key
from dino_vos.spec import DIRECTIONS, PropagationConfig

JOB_KEYS = ("input", "mask", "masks", "id")
#: Per-line options of a JSON-lines job: PropagationConfig fields and the direction.
LINE_OPTIONS = (*(f.name for f in dataclasses.fields(PropagationConfig)), "direction")
#: Names of the batch's own files in OUT: no video may take them as its id.
RESERVED_IDS = (MANIFEST_NAME, "batch.json", "failures.jsonl")


@dataclass(frozen=True)
class BatchEntry:
    """One video of the batch, as the jobs list gives it (checked when it runs)."""

    id: str
    input: Path
    mask: Path | None = None
    masks: Path | None = None
    options: tuple[tuple[str, Any], ...] = ()  # per-line options (JSON lines)
    where: str = ""  # "jobs.csv line 3", for messages

    def settings(self, base: RunnerSettings) -> RunnerSettings:
        """The command's settings with this line's options on top."""
        options = dict(self.options)
        direction = options.pop("direction", base.direction)
        return dataclasses.replace(
            base, config=dataclasses.replace(base.config, **options), direction=direction
        )

    def task(self) -> VideoTask:
        """Open the input and find the keyframes (InputError when either is unusable)."""
        from dino_vos.sources import open_source

        names = tuple(open_source(self.input).frame_names())
        keyframes: dict[int, Path] = {}
        if self.masks is not None:
            if not self.masks.is_dir():
                raise InputError(f"masks folder not found: {self.masks}")
            index = {name: i for i, name in enumerate(names)}
            keyframes = {index[p.stem]: p for p in self.masks.glob("*.png") if p.stem in index}
        if self.mask is not None:
            if not self.mask.is_file():
                raise InputError(f"mask not found: {self.mask}")
            keyframes[0] = self.mask
        if not keyframes:
            raise InputError(f"no mask for {self.input}: no PNG named like one of its frames")
        return VideoTask(self.id, self.input, names, keyframes)


def read_jobs(path: str | Path) -> list[BatchEntry]:
    """The videos of a CSV, JSON-lines or YouTube-VOS-layout ``path`` (ids checked unique)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"jobs not found: {path} (give a .csv, a .jsonl or a folder)")
    if path.is_dir():
        entries = _youtube_layout(path)
    elif path.suffix.lower() == ".csv":
        entries = _csv_jobs(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        entries = _jsonl_jobs(path)
    else:
        raise InputError(f"cannot read jobs {path}: give a .csv, a .jsonl or a YouTube-VOS folder")
    if not entries:
        raise InputError(f"{path} lists no video")
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.id in seen:
            raise InputError(
                f"id {entry.id!r} of {entry.where} is also the id of {seen[entry.id]}: give "
                "each video its own id"
            )
        seen[entry.id] = entry.where
    return entries


def _entry(values: dict[str, Any], base: Path, where: str) -> BatchEntry:
    unknown = [key for key in values if key not in JOB_KEYS and key not in LINE_OPTIONS]
    if unknown:
        raise InputError(
            f"{where}: unknown key {unknown[0]!r}: use {', '.join(JOB_KEYS)} or an option "
            f"({', '.join(LINE_OPTIONS)})"
        )
    text = {key: str(values.get(key) or "").strip() for key in JOB_KEYS}
    if not text["input"] or not (text["mask"] or text["masks"]):
        raise InputError(f"{where}: give input and mask (or masks)")
    source = base / text["input"]
    name = text["id"] or source.stem
    if name in RESERVED_IDS or not _is_folder_name(name):
        raise InputError(f"{where}: id {name!r} is not a folder name: give a plain name as id")
    options = tuple((key, values[key]) for key in LINE_OPTIONS if key in values)
    entry = BatchEntry(
        name,
        source,
        base / text["mask"] if text["mask"] else None,
        base / text["masks"] if text["masks"] else None,
        options,
        where,
    )
    try:  # the options make a valid setting over the defaults (and so over any command's)
        settings = entry.settings(RunnerSettings(PropagationConfig()))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: bad option ({exc})") from None
    if settings.direction not in DIRECTIONS:
        raise InputError(f"{where}: direction must be one of {', '.join(DIRECTIONS)}")
    return entry


def _is_folder_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def _csv_jobs(path: Path) -> list[BatchEntry]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [key for key in ("input",) if key not in header]
        if missing or not {"mask", "masks"} & set(header):
            raise InputError(
                f"{path}: the header must name input and mask (or masks), optionally id; "
                f"found {', '.join(header) or 'nothing'}"
            )
        rows = [{k.strip(): v for k, v in row.items() if k} for row in reader]
    return [_entry(row, path.parent, f"{path.name} line {i + 2}") for i, row in enumerate(rows)]


def _jsonl_jobs(path: Path) -> list[BatchEntry]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            values = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where} is not JSON ({exc})") from None
        if not isinstance(values, dict):
            raise InputError(f'{where}: give an object such as {{"input": ..., "mask": ...}}')
        entries.append(_entry(values, path.parent, where))
    return entries


def _youtube_layout(root: Path) -> list[BatchEntry]:
    frames, annotations = root / "JPEGImages", root / "Annotations"
    if not frames.is_dir():
        raise InputError(
            f"{root} is not laid out like YouTube-VOS: it needs JPEGImages/<video>/ and "
            "Annotations/<video>/"
        )
    videos = sorted((p.name for p in frames.iterdir() if p.is_dir()), key=natural_key)
    return [
        BatchEntry(name, frames / name, masks=annotations / name, where=f"{root.name}/{name}")
        for name in videos
    ]


def frame_cost(entry: BatchEntry) -> int:
    """Frames of the input (1 when it cannot be opened: its failure costs little)."""
    from dino_vos.sources import open_source

    try:
        return len(open_source(entry.input))
    except Exception:  # a broken input is reported when it runs, not here
        return 1
