"""Generated clips with known masks: objects moving (and occluding) over a background.

Used by the tests, the benchmarks and ``dino-vos demo``; nothing here is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dino_vos.masks import write_indexed_png

#: Distinct, saturated object colours (RGB) of the ``colour`` style.
OBJECT_COLOURS = (
    (220, 40, 40),
    (40, 200, 60),
    (40, 80, 230),
    (230, 200, 30),
    (200, 40, 200),
    (30, 210, 210),
)


@dataclass(frozen=True)
class ClipStyle:
    """Colours and textures of a generated clip.

    Textures are smooth Gaussian noise: ``*_grain`` is the noise cell size in pixels (small is
    fine-grained) and ``*_amplitude`` its standard deviation in grey levels.
    """

    background_colour: tuple[int, int, int]
    background_grain: int
    background_amplitude: float
    object_colours: tuple[tuple[int, int, int], ...]
    object_grain: int
    object_amplitude: float


#: ``colour``: saturated objects over a grey background; easy even for random features.
#: ``grass``: smooth objects in colours close to a fine-grained tan background (a dog on dry
#: grass): telling them apart takes texture, which trained features see and raw pixels do not.
CLIP_STYLES: dict[str, ClipStyle] = {
    "colour": ClipStyle((110, 110, 100), 8, 30.0, OBJECT_COLOURS, 8, 25.0),
    "grass": ClipStyle(
        (170, 150, 120),
        2,
        40.0,
        ((200, 180, 150), (150, 130, 100), (185, 160, 120), (160, 150, 130)),
        16,
        15.0,
    ),
}


@dataclass
class SyntheticClip:
    """Frames (T, H, W, 3) uint8 RGB and masks (T, H, W) uint8 object ids."""

    frames: np.ndarray
    masks: np.ndarray

    def write(self, folder: str | Path, video: str | Path | None = None, fps: float = 12.0):
        """Write ``JPEG frames + indexed PNG masks`` into DAVIS-like subfolders of ``folder``.

        Returns (frames folder, masks folder). ``video`` also writes an mp4 of the frames.
        """
        folder = Path(folder)
        frame_dir, mask_dir = folder / "frames", folder / "masks"
        frame_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for index, (frame, mask) in enumerate(zip(self.frames, self.masks, strict=False)):
            cv2.imwrite(
                str(frame_dir / f"{index:05d}.jpg"),
                cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )
            write_indexed_png(mask_dir / f"{index:05d}.png", mask)
        if video is not None:
            height, width = self.frames.shape[1:3]
            writer = cv2.VideoWriter(
                str(video), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height)
            )
            for frame in self.frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            writer.release()
        return frame_dir, mask_dir


def _texture(
    rng: np.random.Generator, height: int, width: int, base, amplitude: float, grain: int = 8
):
    """A smooth random luminance texture around colour ``base`` (H, W, 3) float32."""
    coarse = rng.normal(0, 1, (height // grain + 2, width // grain + 2)).astype(np.float32)
    noise = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]
    return np.clip(np.asarray(base, np.float32) + amplitude * noise, 0, 255)


def make_clip(
    num_frames: int = 12,
    size: tuple[int, int] = (128, 192),
    num_objects: int = 2,
    seed: int = 0,
    textured: bool = True,
    speed: float = 3.0,
    object_ids: tuple[int, ...] | None = None,
    style: str = "colour",
) -> SyntheticClip:
    """Textured objects (ellipses and rectangles) moving over a textured background.

    Later objects are drawn over earlier ones, so they occlude each other when they meet.
    ``object_ids`` sets the label of each object (default 1..num_objects); ``style`` names a
    :data:`CLIP_STYLES` entry; ``textured=False`` draws flat colours.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    ids = object_ids or tuple(range(1, num_objects + 1))
    if len(ids) != num_objects:
        raise ValueError("object_ids must name every object")
    if style not in CLIP_STYLES:
        raise ValueError(f"unknown clip style {style!r}; choose one of {sorted(CLIP_STYLES)}")
    look = CLIP_STYLES[style]
    scale = 1.0 if textured else 0.0
    background = _texture(
        rng,
        height,
        width,
        look.background_colour,
        scale * look.background_amplitude,
        look.background_grain,
    )
    colours = look.object_colours
    objects = []
    for index in range(num_objects):
        radius = rng.uniform(0.12, 0.2) * min(height, width)
        objects.append(
            {
                "centre": rng.uniform([radius, radius], [width - radius, height - radius]),
                "velocity": rng.uniform(-1, 1, 2) * speed,
                "axes": (radius, radius * rng.uniform(0.6, 1.0)),
                "box": index % 2 == 1,
                "texture": _texture(
                    rng,
                    height,
                    width,
                    colours[index % len(colours)],
                    scale * look.object_amplitude,
                    look.object_grain,
                ),
            }
        )
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    masks = np.zeros((num_frames, height, width), np.uint8)
    for t in range(num_frames):
        image = background.copy()
        mask = np.zeros((height, width), np.uint8)
        for obj, obj_id in zip(objects, ids, strict=False):
            shape = np.zeros((height, width), np.uint8)
            cx, cy = obj["centre"]
            ax, ay = obj["axes"]
            if obj["box"]:
                cv2.rectangle(
                    shape, (int(cx - ax), int(cy - ay)), (int(cx + ax), int(cy + ay)), 1, -1
                )
            else:
                cv2.ellipse(shape, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 1, -1)
            inside = shape > 0
            image[inside] = obj["texture"][inside]
            mask[inside] = obj_id
            # move, bouncing off the borders
            centre, velocity = obj["centre"] + obj["velocity"], obj["velocity"]
            for axis, (limit, half) in enumerate(((width, ax), (height, ay))):
                if not half <= centre[axis] <= limit - half:
                    velocity[axis] = -velocity[axis]
                    centre[axis] = np.clip(centre[axis], half, limit - half)
            obj["centre"] = centre
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
        masks[t] = mask
    return SyntheticClip(frames, masks)
