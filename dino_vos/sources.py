"""Frame sources: a folder of images or a video file, streamed one frame at a time."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# Decoders report problems through our one-line errors, not through their own log lines.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
import cv2  # noqa: E402

from dino_vos.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DEFAULT_FOLDER_FPS = 24.0


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its position, output file stem and RGB pixels (H, W, 3) uint8."""

    index: int
    name: str
    image: np.ndarray


class FrameSource(Protocol):
    """A finite, re-iterable sequence of frames with a known count, size and rate."""

    path: Path
    fps: float

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Frame]: ...

    def frame_names(self) -> list[str]: ...

    @property
    def frame_size(self) -> tuple[int, int]: ...


class MemorySource:
    """Frames already in memory (RGB arrays or :class:`Frame` objects) as a frame source."""

    def __init__(
        self,
        frames: Sequence[np.ndarray] | Sequence[Frame],
        fps: float = DEFAULT_FOLDER_FPS,
        name: str = "<memory>",
    ) -> None:
        self.frames = [
            item if isinstance(item, Frame) else Frame(i, f"{i:05d}", np.asarray(item))
            for i, item in enumerate(frames)
        ]
        if not self.frames:
            raise InputError("no frames given")
        self.path = Path(name)
        self.fps = fps

    def __len__(self) -> int:
        return len(self.frames)

    def frame_names(self) -> list[str]:
        return [frame.name for frame in self.frames]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def read_frames(self, start: int, stop: int) -> list[np.ndarray]:
        """Frames ``start .. stop - 1`` (random access)."""
        return [frame.image for frame in self.frames[start:stop]]

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.frames[0].image.shape[:2])


def natural_key(text: str) -> list[object]:
    """Sort key that orders ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def read_image(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); a clear error if it cannot be decoded."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise InputError(f"image not found: {path}")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"cannot decode image {path}: the file is corrupt or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FolderSource:
    """Frames stored as image files in one folder, in natural order."""

    def __init__(self, path: str | Path, fps: float | None = None, limit: int | None = None):
        self.path = Path(path)
        files = [
            p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise InputError(
                f"no image frames (jpg/png) in folder {self.path}: point INPUT at a folder of "
                "frames or a video file"
            )
        files.sort(key=lambda p: natural_key(p.name))
        by_stem: dict[str, Path] = {}
        for file in files:
            if file.stem in by_stem:
                raise InputError(
                    f"two frames named {file.stem} in {self.path}: {by_stem[file.stem].name} and "
                    f"{file.name} (outputs are named by the frame's stem): keep one of them"
                )
            by_stem[file.stem] = file
        self.files = files[:limit] if limit else files
        self.fps = float(fps or DEFAULT_FOLDER_FPS)
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def frame_names(self) -> list[str]:
        """The output stem of every frame, without decoding it."""
        return [file.stem for file in self.files]

    @property
    def frame_size(self) -> tuple[int, int]:
        if self._size is None:
            self._size = read_image(self.files[0]).shape[:2]
        return self._size

    def __iter__(self) -> Iterator[Frame]:
        for index, file in enumerate(self.files):
            yield Frame(index, file.stem, self._read(file))

    def read_frames(self, start: int, stop: int) -> list[np.ndarray]:
        """Frames ``start .. stop - 1`` (random access)."""
        return [self._read(file) for file in self.files[start:stop]]

    def _read(self, file: Path) -> np.ndarray:
        image = read_image(file)
        if image.shape[:2] != self.frame_size:
            raise InputError(
                f"frame {file.name} is {image.shape[1]}x{image.shape[0]} but the first frame "
                f"is {self.frame_size[1]}x{self.frame_size[0]}: all frames must share one size"
            )
        return image


class _VideoFile:
    """Shared parts of the video sources: a path, a frame count, a frame size, a rate and the
    stream of frames in order (decoded by OpenCV whichever decoder reads at random)."""

    path: Path
    fps: float
    _count: int
    _size: tuple[int, int]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Frame]:
        """The frames in order, decoded by OpenCV one at a time as they are read. Not decord: read
        in sequence, it decodes about a thousand frames ahead in the background and keeps them
        (1.3 GB at 854 x 480, 6 GB at 1080p, docs/protocol.md#keyframes). Both decode with
        FFmpeg into the same pixels; the backward pass checks every re-read frame anyway."""
        capture = cv2.VideoCapture(str(self.path))
        try:
            for index in range(self._count):
                ok, image = capture.read()
                if not ok:
                    raise InputError(f"video {self.path} stops decoding at frame {index}")
                yield Frame(index, f"{index:05d}", cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        finally:
            capture.release()

    def frame_names(self) -> list[str]:
        return [f"{index:05d}" for index in range(self._count)]

    @property
    def frame_size(self) -> tuple[int, int]:
        return self._size


class DecordUnsupported(RuntimeError):
    """decord opened the video but cannot decode it correctly (OpenCV is used instead)."""


class DecordVideoSource(_VideoFile):
    """A video file read at random by decord (streamed in order by OpenCV, see
    :meth:`_VideoFile.__iter__`)."""

    def __init__(self, path: str | Path, fps: float | None = None, limit: int | None = None):
        import decord

        self.path = Path(path)
        with captured_stderr() as log:  # decord prints its reason instead of raising it
            try:
                reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
            except Exception as exc:  # noqa: BLE001 - decord raises its own DECORDError
                reader, error = None, exc
        if reader is None:
            reason = _first_line(RuntimeError("\n".join([*log, str(error)])))
            raise InputError(f"cannot decode video {self.path}: {reason}") from None
        self._reader = reader
        count = len(self._reader)
        if count == 0:
            raise InputError(f"video {self.path} has no frames")
        self._count = min(count, limit) if limit else count
        self.fps = float(fps or self._reader.get_avg_fps() or DEFAULT_FOLDER_FPS)
        first = self.read_frame(0)
        if first.ndim != 3 or first.shape[2] != 3:
            # decord mis-decodes some frame widths (for example 72 px) into 4 channels
            raise DecordUnsupported(f"decord gave frames of shape {first.shape}")
        self._size = first.shape[:2]

    def read_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as RGB uint8 (H, W, 3), decoded on its own (random access)."""
        try:
            return self._reader[index].asnumpy()
        finally:
            self._reader.seek(0)  # see read_frames

    def read_frames(self, start: int, stop: int) -> list[np.ndarray]:
        """Frames ``start .. stop - 1``: one seek, then sequential decoding.

        After a random access decord goes on decoding ahead in the background while the caller
        works, and keeps those frames: resident memory grew by about one decoded frame per frame
        read while the backbone ran between reads (backward propagation, tools/bench_scale.py).
        Seeking back to frame 0 stops it (the workaround of dmlc/decord#208 and #197)."""
        try:
            batch = self._reader.get_batch(list(range(start, stop))).asnumpy()
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                f"video {self.path} cannot decode frames {start}..{stop - 1}: {_first_line(exc)}"
            ) from exc
        finally:
            self._reader.seek(0)
        return list(batch)


class OpenCVVideoSource(_VideoFile):
    """A video file decoded with OpenCV (fallback where decord is not installed)."""

    def __init__(self, path: str | Path, fps: float | None = None, limit: int | None = None):
        self.path = Path(path)
        capture = cv2.VideoCapture(str(self.path))
        ok, first = capture.read() if capture.isOpened() else (False, None)
        if not ok or first is None:
            capture.release()
            raise InputError(f"cannot decode video {self.path}: no readable frames")
        count = 1
        while capture.grab():
            count += 1
        self.fps = float(fps or capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FOLDER_FPS)
        capture.release()
        self._count = min(count, limit) if limit else count
        self._size = first.shape[:2]

    def read_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as RGB uint8 (H, W, 3), decoded on its own (random access)."""
        capture = cv2.VideoCapture(str(self.path))
        try:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, image = capture.read()
        finally:
            capture.release()
        if not ok:
            raise InputError(f"video {self.path} cannot decode frame {index}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def read_frames(self, start: int, stop: int) -> list[np.ndarray]:
        """Frames ``start .. stop - 1``: one seek, then sequential decoding (a seek may land
        on another frame in some files: callers check what they get)."""
        capture = cv2.VideoCapture(str(self.path))
        images = []
        try:
            capture.set(cv2.CAP_PROP_POS_FRAMES, start)
            for _ in range(start, stop):
                ok, image = capture.read()
                if not ok:
                    break
                images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        finally:
            capture.release()
        return images


class ImageSource(FolderSource):
    """A single image treated as a one-frame source."""

    def __init__(self, path: str | Path, fps: float | None = None, limit: int | None = None):
        self.path = Path(path)
        self.files = [self.path]
        self.fps = float(fps or DEFAULT_FOLDER_FPS)
        self._size = None


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 (it bypasses ``sys.stderr``)."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _first_line(exc: BaseException) -> str:
    """The decoder's reason, without its log prefixes (``[time] file.cc:83: ERROR opening: ..``)."""
    text = str(exc).strip()
    cause = re.search(r"ERROR [^:]*: [^,]*, (.+)", text)
    if cause:
        return cause.group(1).splitlines()[0][:200]
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", text)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def video_backend() -> str:
    """``decord`` when it is importable, else ``opencv``."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return "opencv"
    return "decord"


def open_video(
    path: str | Path,
    fps: float | None = None,
    limit: int | None = None,
    backend: str | None = None,
) -> DecordVideoSource | OpenCVVideoSource:
    """A video file, streamed or read at random (``read_frame``): decord where it decodes the
    file correctly, else OpenCV. The one decoding path of propagation and pretraining."""
    if (backend or video_backend()) == "decord":
        try:
            return DecordVideoSource(path, fps=fps, limit=limit)
        except DecordUnsupported:
            pass
    return OpenCVVideoSource(path, fps=fps, limit=limit)


def open_source(
    path: str | Path,
    fps: float | None = None,
    limit: int | None = None,
    allow_image: bool = False,
    backend: str | None = None,
) -> FrameSource:
    """Open a folder of frames, a video file (or, with ``allow_image``, a single image)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path} (give a folder of frames or a video file)")
    if path.is_dir():
        return FolderSource(path, fps=fps, limit=limit)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return open_video(path, fps, limit, backend)
    if allow_image and suffix in IMAGE_SUFFIXES:
        read_image(path)
        return ImageSource(path, fps=fps)
    accepted = ", ".join(VIDEO_SUFFIXES + (IMAGE_SUFFIXES if allow_image else ()))
    raise InputError(f"unsupported input {path}: expected a frame folder or one of {accepted}")
