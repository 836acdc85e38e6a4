"""Read dino-vos result folders into what a report shows (no torch, no backbone).

A *run* is one folder given to ``dino-vos report``: an ``eval davis`` output (or one setting of
a sweep), an ``eval youtube-vos`` output, a ``propagate`` output (also the ``demo`` folder), a
sweep folder or an ``attention`` output. Its sequences name their frames (a folder of images or
a video, from the manifests), the predicted masks, the ground truth when there is one and the
keyframes. Per-frame J and F come from the run's JSON report (the numbers of its CSV); where a
run has ground truth but no report they are computed here with the DAVIS definitions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dino_vos.errors import InputError, param
from dino_vos.outputs import MANIFEST_NAME, read_manifest
from dino_vos.sources import IMAGE_SUFFIXES, natural_key

#: The statistics of one object, in the order of the official global CSV.
STATISTICS = ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
DAVIS_FORMAT = "dino-vos-davis"
SWEEP_FORMAT = "dino-vos-davis-sweep"
YOUTUBE_FORMAT = "dino-vos-youtube-vos"
ATTENTION_FORMAT = "dino-vos-attention"


@dataclass
class ObjectResult:
    """One object of one sequence in one run: its statistics and per-frame J and F (None on the
    frames that are not scored: the first, the last and keyframes)."""

    object_id: int
    stats: dict[str, float]
    j: list[float | None]
    f: list[float | None]


@dataclass
class SequenceResult:
    """What one run holds for one sequence."""

    name: str
    frames: Path  # a folder of images or a video file
    stems: list[str]  # frame names, in order
    masks: dict[str, Path]  # predicted label PNGs by frame name
    ground_truth: dict[str, Path] = field(default_factory=dict)
    keyframes: list[str] = field(default_factory=list)
    objects: list[ObjectResult] = field(default_factory=list)
    object_ids: list[int] = field(default_factory=list)  # ids the run wrote (its manifest)


@dataclass
class SweepResult:
    """A sweep folder: its rows (parameters, scores, seconds) and heat map."""

    parameters: list[str]
    rows: list[dict[str, Any]]
    heatmap: Path | None


@dataclass
class AttentionResult:
    """An ``attention`` output: per frame a mean map and one map per head."""

    name: str
    frames: Path
    stems: list[str]
    maps: list[str]  # sub-folders: mean, head0, head1 ...


@dataclass
class Run:
    """One result folder as the report shows it."""

    path: Path
    kind: str  # davis, youtube-vos, propagate, sweep, attention
    label: str
    sequences: list[SequenceResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # global statistics, settings
    sweep: SweepResult | None = None
    attention: AttentionResult | None = None

    @property
    def inputs(self) -> list[Path]:
        """Every folder or file the report reads from this run (outputs must avoid them)."""
        paths = [self.path]
        for sequence in self.sequences:
            paths.append(sequence.frames)
            paths.extend({p.parent for p in sequence.ground_truth.values()})
        if self.attention is not None:
            paths.append(self.attention.frames)
        return paths


def _png_stems(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    files = sorted(folder.glob("*.png"), key=lambda p: natural_key(p.name))
    return {p.stem: p for p in files}


def _frame_stems(frames: Path, limit: int | None = None) -> list[str]:
    """Frame names of a folder of images or a video (``00000`` ... as the sources name them)."""
    if frames.is_dir():
        files = [p for p in frames.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        stems = [p.stem for p in sorted(files, key=lambda p: natural_key(p.name))]
    else:
        from dino_vos.sources import open_source

        stems = open_source(frames, limit=limit).frame_names()
    return stems[:limit] if limit else stems


def load_run(path: str | Path, ground_truth: str | Path | None = None) -> Run:
    """Read one result folder (one line naming the problem when it is not one)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"run folder not found: {folder} (give a dino-vos result folder)")
    manifest = read_manifest(folder)
    kind = manifest.get("format")
    if kind == DAVIS_FORMAT:
        run = _davis_run(folder, manifest)
    elif kind == SWEEP_FORMAT:
        run = _sweep_run(folder)
    elif kind == YOUTUBE_FORMAT:
        run = _youtube_run(folder)
    elif kind == ATTENTION_FORMAT:
        run = _attention_run(folder, manifest)
    elif "input" in manifest:
        run = _propagate_run(folder, manifest, ground_truth)
    elif (folder / "masks" / MANIFEST_NAME).is_file():  # a demo folder
        clip = folder / "clip" / "masks"
        run = _propagate_run(
            folder / "masks",
            read_manifest(folder / "masks"),
            ground_truth or (clip if clip.is_dir() else None),
        )
        run.path, run.label = folder, folder.name
    else:
        raise InputError(
            f"{folder} is not a dino-vos result (no {MANIFEST_NAME} of eval davis, eval "
            "youtube-vos, propagate, attention or a sweep): give the folder a command wrote"
        )
    if ground_truth is not None and run.kind not in ("propagate",):
        raise InputError(
            f"{param('ground_truth')} applies to propagate outputs; {folder} is an {run.kind} "
            "result that knows its ground truth"
        )
    return run


def _davis_run(folder: Path, manifest: dict[str, Any]) -> Run:
    reports = sorted(n for n in manifest.get("outputs", []) if str(n).startswith("davis_results-"))
    if manifest.get("status") != "complete" or not reports:
        raise InputError(
            f"{folder} is an unfinished eval davis run: run it to the end (it resumes) first"
        )
    payload = json.loads((folder / reports[0]).read_text())
    settings = payload["settings"]
    root = Path(settings["davis_root"])
    resolution = settings["resolution"]
    masks_root = Path(settings.get("results_dir") or folder)
    scores: dict[str, list[dict[str, Any]]] = {}
    for obj in payload["objects"]:
        scores.setdefault(obj["sequence"], []).append(obj)
    sequences = []
    for name in settings["sequences"]:
        annotations = _png_stems(root / "Annotations" / resolution / name)
        stems = list(annotations)[: settings.get("max_frames") or None]
        sequence_manifest = read_manifest(masks_root / name)
        keyframes = sequence_manifest.get("keyframes") or stems[:1]
        sequence = SequenceResult(
            name,
            root / "JPEGImages" / resolution / name,
            stems,
            _png_stems(masks_root / name),
            {stem: annotations[stem] for stem in stems},
            list(keyframes),
            object_ids=[int(i) for i in sequence_manifest.get("object_ids", [])],
        )
        sequence.objects = [_from_report(obj, sequence) for obj in scores.get(name, [])]
        sequences.append(sequence)
    return Run(
        folder,
        "davis",
        folder.name,
        sequences,
        {"global": payload["global"], "settings": _short_settings(settings)},
    )


def _scored_stems(sequence: SequenceResult) -> list[str]:
    """The frames DAVIS scores: all but the first and the last, keyframes excluded."""
    given = set(sequence.keyframes)
    return [stem for stem in sequence.stems[1:-1] if stem not in given]


def _per_frame(values: list[float], scored: list[str], stems: list[str]) -> list[float | None]:
    by_stem = dict(zip(scored, values, strict=True))
    return [_number(by_stem[s]) if s in by_stem else None for s in stems]


def _number(value: Any) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


def _from_report(obj: dict[str, Any], sequence: SequenceResult) -> ObjectResult:
    scored = _scored_stems(sequence)
    stats = {key: float(obj[key]) for key in STATISTICS}
    if len(obj["J"]) != len(scored):  # frames of the report and of the folders disagree
        return _scored_object(sequence, int(obj["object_id"]), stats)
    return ObjectResult(
        int(obj["object_id"]),
        stats,
        _per_frame(obj["J"], scored, sequence.stems),
        _per_frame(obj["F"], scored, sequence.stems),
    )


def _scored_object(
    sequence: SequenceResult, object_id: int, stats: dict[str, float] | None = None
) -> ObjectResult:
    """J and F of one object computed from the masks and the ground truth."""
    return score_sequence(sequence, [object_id], stats)[0]


def score_sequence(
    sequence: SequenceResult, object_ids: list[int], stats: dict[str, float] | None = None
) -> list[ObjectResult]:
    """Per-frame J and F (DAVIS definitions) of ``object_ids`` on the scored frames that have a
    predicted mask and a ground truth; statistics over those frames unless given."""
    from dino_vos.eval.davis_metrics import ObjectScores, frame_scores
    from dino_vos.masks import read_mask

    scored = [s for s in _scored_stems(sequence) if s in sequence.ground_truth]
    num_objects = max(object_ids, default=0)
    j_values: dict[int, list[float]] = {k: [] for k in object_ids}
    f_values: dict[int, list[float]] = {k: [] for k in object_ids}
    kept = []
    for stem in scored:
        gt = read_mask(sequence.ground_truth[stem])
        pred = read_mask(sequence.masks[stem]) if stem in sequence.masks else np.zeros_like(gt)
        pred = np.where(pred > num_objects, 0, pred).astype(np.uint8)
        gt = np.where((gt > num_objects) & (gt != 255), 0, gt).astype(np.uint8)
        j, f = frame_scores(gt, pred, num_objects)
        kept.append(stem)
        for k in object_ids:
            j_values[k].append(float(j[k - 1]))
            f_values[k].append(float(f[k - 1]))
    results = []
    for k in object_ids:
        scores = ObjectScores(sequence.name, k, np.array(j_values[k]), np.array(f_values[k]))
        results.append(
            ObjectResult(
                k,
                stats if stats is not None else scores.statistics(),
                _per_frame(j_values[k], kept, sequence.stems),
                _per_frame(f_values[k], kept, sequence.stems),
            )
        )
    return results


def _short_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a reader compares runs by."""
    keep = ("backbone", "resize", "propagation", "shift_ensemble", "max_frames", "protocol")
    return {key: settings[key] for key in keep if settings.get(key) is not None}


def _propagation_sequence(folder: Path, manifest: dict[str, Any], name: str) -> SequenceResult:
    frames = Path(manifest["input"])
    if not frames.exists():
        raise InputError(
            f"the frames of {folder} ({frames}, from its {MANIFEST_NAME}) are not found: the "
            "report needs the frames the run read"
        )
    stems = _frame_stems(frames, manifest.get("frames_limit"))
    masks = _png_stems(folder)
    stems = [s for s in stems if s in masks] if not set(masks) >= set(stems) else stems
    keyframes = list(manifest.get("keyframes", []))
    ids = [int(i) for i in manifest.get("object_ids", [])]
    return SequenceResult(name, frames, stems, masks, {}, keyframes, object_ids=ids)


def _propagate_run(folder: Path, manifest: dict[str, Any], ground_truth: str | Path | None) -> Run:
    # named after its input, so that runs of the same video are shown side by side
    sequence = _propagation_sequence(folder, manifest, Path(manifest["input"]).stem)
    if ground_truth is not None:
        gt_folder = Path(ground_truth)
        sequence.ground_truth = _png_stems(gt_folder)
        if not sequence.ground_truth:
            raise InputError(
                f"{param('ground_truth', gt_folder)} holds no PNG masks named like frames"
            )
        ids = sorted(int(i) for i in manifest.get("object_ids", []) if int(i) not in (0, 255))
        sequence.objects = score_sequence(sequence, ids)
    summary: dict[str, Any] = {"settings": {"propagation": manifest.get("propagation")}}
    if sequence.objects:
        summary["global"] = global_of(sequence.objects)
    return Run(folder, "propagate", folder.name, [sequence], summary)


def _youtube_run(folder: Path) -> Run:
    sequences = []
    root = folder / "Annotations"
    for video in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        manifest = read_manifest(video)
        if "input" in manifest:
            sequences.append(_propagation_sequence(video, manifest, video.name))
    return Run(folder, "youtube-vos", folder.name, sequences)


def _sweep_run(folder: Path) -> Run:
    payload = json.loads((folder / "sweep.json").read_text())
    names = list(payload["grid"])
    heatmap = folder / "sweep.png"
    sweep = SweepResult(names, payload["rows"], heatmap if heatmap.is_file() else None)
    scored = [row for row in payload["rows"] if not np.isnan(float(row["J&F-Mean"]))]
    note = f"{len(payload['rows'])} settings"
    if scored:
        best = max(scored, key=lambda row: float(row["J&F-Mean"]))
        note += f"; best J&F-Mean {float(best['J&F-Mean']):.3f}: {best['tag']}"
    return Run(folder, "sweep", folder.name, summary={"settings": {"note": note}}, sweep=sweep)


def _attention_run(folder: Path, manifest: dict[str, Any]) -> Run:
    frames = Path(manifest["input"])
    if not frames.exists():
        raise InputError(f"the frames of {folder} ({frames}) are not found")
    heads = int(manifest.get("heads", 0))
    maps = [m for m in ["mean", *(f"head{i}" for i in range(heads))] if (folder / m).is_dir()]
    attention = AttentionResult(folder.name, frames, list(manifest["names"]), maps)
    return Run(folder, "attention", folder.name, attention=attention)


def global_of(objects: list[ObjectResult]) -> dict[str, float]:
    """The global statistics: every statistic averaged over objects, J&F = (J + F) / 2."""
    means = {key: float(np.mean([o.stats[key] for o in objects])) for key in STATISTICS}
    return {"J&F-Mean": (means["J-Mean"] + means["F-Mean"]) / 2, **means}


def unique_labels(runs: list[Run]) -> None:
    """Give runs with the same folder name their parent's name as well."""
    for run in runs:
        if sum(other.label == run.label for other in runs) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"
