"""DAVIS dataset layout: sequence lists, frames, annotations and result masks.

``ROOT/JPEGImages/<resolution>/<seq>/*.jpg``, ``ROOT/Annotations/<resolution>/<seq>/*.png``
(DAVIS 2017 indexed PNGs or DAVIS 2016 grayscale 0/255 masks, read with
:func:`dino_vos.masks.read_mask`), ``ROOT/ImageSets/<year>/<split>.txt``. Without any split file
the sequences are the folders of ``Annotations/<resolution>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dino_vos.errors import InputError, param
from dino_vos.eval.davis_metrics import num_objects_of
from dino_vos.masks import read_mask
from dino_vos.runner import VideoTask
from dino_vos.sources import IMAGE_SUFFIXES, natural_key

MIN_FRAMES = 3  # the first and the last frame are not scored


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    return sorted(files, key=lambda p: natural_key(p.name))


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except OSError as exc:
        raise InputError(f"cannot read {path}: the file is corrupt or not an image") from exc


@dataclass(frozen=True)
class DavisSequence:
    """One sequence: its frame files (may be empty in scoring-only mode) and annotations."""

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path, ...]

    @property
    def stems(self) -> list[str]:
        """Frame names (annotation file stems)."""
        return [p.stem for p in self.annotations]

    @property
    def frame_names(self) -> tuple[str, ...]:
        return tuple(self.stems)

    def task(self, keyframes: Sequence[int] | None = None) -> VideoTask:
        """Propagation from the ground truth of the first frame (or of ``keyframes``)."""
        given = keyframes if keyframes is not None else (0,)
        return VideoTask(
            self.name,
            self.frames_dir,
            self.frame_names,
            {index: self.annotations[index] for index in given},
            limit=len(self.frames),
        )

    @property
    def scored_stems(self) -> list[str]:
        """All frames but the first and the last, as the official evaluation scores them."""
        return self.stems[1:-1]

    @property
    def frames_dir(self) -> Path:
        return self.frames[0].parent

    def first_mask(self) -> np.ndarray:
        return read_mask(self.annotations[0])

    def num_objects(self) -> int:
        return num_objects_of(self.first_mask())

    def read_annotations(self, stems: Sequence[str] | None = None) -> np.ndarray:
        """(T, H, W) uint8 ground-truth ids of ``stems`` (default: the scored frames)."""
        by_stem = {p.stem: p for p in self.annotations}
        paths = [by_stem[s] for s in (self.scored_stems if stems is None else stems)]
        return _read_stack(paths, f"annotations of {self.name}")


def _read_stack(paths: Sequence[Path], what: str) -> np.ndarray:
    masks = [read_mask(p) for p in paths]
    shape = masks[0].shape
    for path, mask in zip(paths, masks, strict=True):
        if mask.shape != shape:
            raise InputError(
                f"{path} is {mask.shape[1]}x{mask.shape[0]} but the other {what} are "
                f"{shape[1]}x{shape[0]}: all masks of a sequence must share one size"
            )
    return np.stack(masks)


def read_results(
    results_dir: str | Path,
    sequence: DavisSequence,
    num_objects: int,
    shape: tuple[int, int],
    stems: Sequence[str] | None = None,
) -> np.ndarray:
    """(T, H, W) predicted ids of ``stems`` (default: the scored frames) from
    ``results_dir/<seq>/<stem>.png``.

    Ids above ``num_objects`` (including 255) are errors; missing objects are simply absent.
    """
    folder = Path(results_dir) / sequence.name
    paths = [folder / f"{stem}.png" for stem in (sequence.scored_stems if stems is None else stems)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(
            f"results for {sequence.name} are incomplete: {len(missing)} of {len(paths)} masks "
            f"missing in {folder} (first: {missing[0]}); write one PNG per annotated frame"
        )
    stack = _read_stack(paths, f"result masks of {sequence.name}")
    if stack.shape[1:] != tuple(shape):
        raise InputError(
            f"result masks of {sequence.name} are {stack.shape[2]}x{stack.shape[1]} but its "
            f"annotations are {shape[1]}x{shape[0]}: write masks at the annotation size"
        )
    if int(stack.max(initial=0)) > num_objects:
        present = np.unique(stack)
        extra = [int(v) for v in present if v > num_objects]
        bad = next(p for p, m in zip(paths, stack, strict=True) if m.max() > num_objects)
        raise InputError(
            f"result {bad} has object id(s) {', '.join(map(str, extra))} that are not in the "
            f"ground truth of {sequence.name} (ids 1..{num_objects}): keep the first "
            "annotation's ids"
        )
    return stack


class DavisDataset:
    """The sequences of one DAVIS split at one resolution.

    ``sequences`` overrides the split file. ``require_frames`` (propagation) checks that every
    annotated frame has an image in ``JPEGImages``; scoring alone only needs ``Annotations``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        resolution: str = "480p",
        year: str | None = None,
        sequences: Sequence[str] | None = None,
        require_frames: bool = True,
        max_frames: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.resolution = resolution
        self.require_frames = require_frames
        self.max_frames = max_frames
        if not self.root.is_dir():
            raise InputError(
                f"DAVIS root not found: {self.root} (give the folder holding "
                "JPEGImages/, Annotations/ and ImageSets/)"
            )
        self.frames_root = self.root / "JPEGImages" / resolution
        self.annotations_root = self.root / "Annotations" / resolution
        self._check_folders()
        if sequences:
            self.split_file: Path | None = None
            names = self._check_names(list(dict.fromkeys(sequences)))
        else:
            self.split_file = find_split_file(self.root, split, year)
            names = (
                read_split_file(self.split_file)
                if self.split_file is not None
                else [p.name for p in sorted(self.annotations_root.iterdir()) if p.is_dir()]
            )
            names = self._check_names(names)
        if not names:
            raise InputError(f"no sequences to evaluate in {self.annotations_root}")
        self.sequences = [self._sequence(name) for name in names]

    def __len__(self) -> int:
        return len(self.sequences)

    def __iter__(self):
        return iter(self.sequences)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sequences]

    @property
    def inputs(self) -> list[Path]:
        """The benchmark's folders (every resolution): outputs never touch them."""
        return [self.root / "Annotations", self.root / "JPEGImages"]

    def _check_folders(self) -> None:
        for folder, needed in (
            (self.annotations_root, True),
            (self.frames_root, self.require_frames),
        ):
            if needed and not folder.is_dir():
                available = sorted(p.name for p in folder.parent.glob("*") if p.is_dir())
                hint = (
                    f"resolutions found: {', '.join(available)} (use {param('resolution')})"
                    if available
                    else f"{folder.parent.name}/ is missing from {self.root}"
                )
                raise InputError(f"folder {folder} not found: {hint}")

    def _check_names(self, names: list[str]) -> list[str]:
        unknown = [n for n in names if not (self.annotations_root / n).is_dir()]
        if unknown:
            raise InputError(
                f"{len(unknown)} sequence(s) have no annotation folder in {self.annotations_root}: "
                f"{', '.join(unknown[:5])}; check {param('sequences')} / the split file and "
                f"{param('resolution')}"
            )
        return names

    def _sequence(self, name: str) -> DavisSequence:
        annotations = _files(self.annotations_root / name, (".png",))
        if not annotations:
            raise InputError(f"no annotation PNGs in {self.annotations_root / name}")
        frames = _files(self.frames_root / name, IMAGE_SUFFIXES) if self.require_frames else []
        if self.require_frames:
            _check_frames_match(name, self.frames_root / name, frames, annotations)
        if self.max_frames is not None:
            frames, annotations = frames[: self.max_frames], annotations[: self.max_frames]
        if len(annotations) < MIN_FRAMES:
            raise InputError(
                f"sequence {name} has {len(annotations)} annotated frame(s); J&F needs at least "
                f"{MIN_FRAMES} (the first and the last frame are not scored)"
            )
        sequence = DavisSequence(name, tuple(frames), tuple(annotations))
        self._check_first_annotation(sequence)
        return sequence

    def _check_first_annotation(self, sequence: DavisSequence) -> None:
        first = sequence.first_mask()
        if num_objects_of(first) == 0:
            raise InputError(
                f"the first annotation of {sequence.name} ({sequence.annotations[0]}) has no "
                "object: nothing to propagate or score"
            )
        size = first.shape
        if sequence.frames and _image_size(sequence.frames[0]) != size:
            frame_h, frame_w = _image_size(sequence.frames[0])
            raise InputError(
                f"annotation {sequence.annotations[0]} is {size[1]}x{size[0]} but frame "
                f"{sequence.frames[0]} is {frame_w}x{frame_h}: use the same {param('resolution')} "
                "for both"
            )


def _check_frames_match(
    name: str, folder: Path, frames: list[Path], annotations: list[Path]
) -> None:
    if not frames:
        raise InputError(f"no frames for sequence {name}: {folder} is missing or holds no images")
    frame_stems = [p.stem for p in frames]
    annotation_stems = [p.stem for p in annotations]
    if frame_stems == annotation_stems:
        return
    no_frame = sorted(set(annotation_stems) - set(frame_stems), key=natural_key)
    no_mask = sorted(set(frame_stems) - set(annotation_stems), key=natural_key)
    if no_frame:
        raise InputError(
            f"sequence {name} is missing frames: {len(no_frame)} annotation(s) have no image in "
            f"{folder} (first: {no_frame[0]}); restore the frames or remove the annotations"
        )
    raise InputError(
        f"sequence {name} has {len(no_mask)} frame(s) without annotation (first: {no_mask[0]}): "
        "J&F needs the ground truth of every frame"
    )


def find_split_file(root: Path, split: str, year: str | None = None) -> Path | None:
    """``ImageSets/<year>/<split>.txt`` (the latest year when not given); None without any."""
    imagesets = root / "ImageSets"
    all_files = sorted(imagesets.glob("*/*.txt"))
    if year is not None:
        path = imagesets / year / f"{split}.txt"
        if path.is_file():
            return path
    else:
        matches = sorted(imagesets.glob(f"*/{split}.txt"), key=lambda p: natural_key(p.parent.name))
        if matches:
            return matches[-1]
        if not all_files:
            return None
    available = ", ".join(f"{p.parent.name}/{p.stem}" for p in all_files) or "none"
    wanted = f"{year}/{split}" if year else split
    raise InputError(
        f"unknown split '{wanted}': {imagesets} has {available}; use {param('split')} (and "
        f"{param('year')}) or {param('sequences')}"
    )


def read_split_file(path: Path) -> list[str]:
    """Sequence names, one a line; DAVIS 2016 style frame-path lines give their folder name."""
    names: list[str] = []
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if "/" in token:
            token = Path(token).parent.name
        if token and token not in names:
            names.append(token)
    return names


__all__ = [
    "DavisDataset",
    "DavisSequence",
    "find_split_file",
    "read_results",
    "read_split_file",
]
