"""What a video benchmark reader gives the runner: sequences, their frames, keyframes, names.

A reader (:class:`~dino_vos.eval.vos.davis_data.DavisDataset`,
:class:`~dino_vos.eval.vos.youtube_vos.YouTubeVOSDataset`; MOSE or LVOS would be one more)
checks its layout up front and exposes every sequence as a :class:`VOSSequence`, which turns
into the :class:`~dino_vos.runner.VideoTask` that :class:`~dino_vos.runner.SequenceRunner`
propagates. ``inputs`` are the folders no output may touch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from dino_vos.runner import VideoTask


class VOSSequence(Protocol):
    """One video of a benchmark."""

    @property
    def name(self) -> str: ...

    @property
    def frame_names(self) -> tuple[str, ...]:
        """Its frames in order: the names of the result PNGs."""
        ...

    def task(self, keyframes: Sequence[int] | None = None) -> VideoTask:
        """The video to propagate from the benchmark's keyframes (or those frame indices)."""
        ...


class VOSDataset(Protocol):
    """The sequences of one split of a benchmark."""

    @property
    def sequences(self) -> Sequence[VOSSequence]: ...

    @property
    def names(self) -> list[str]: ...

    @property
    def inputs(self) -> list[Path]:
        """Folders of the benchmark that outputs never are, lie in, or contain."""
        ...


def frame_count(dataset: VOSDataset) -> int:
    """Frames of every sequence of ``dataset``."""
    return sum(len(sequence.frame_names) for sequence in dataset.sequences)
