"""``dino-vos eval youtube-vos``: predictions for a YouTube-VOS split, zipped for its server."""

from __future__ import annotations

from pathlib import Path

import click

from dino_vos.cli.options import (
    cache_option,
    direction_option,
    overwrite_option,
    propagation_options,
    with_backbone_spec,
)
from dino_vos.errors import InputError
from dino_vos.spec import BackboneSpec, Direction, PropagationConfig


@click.command("youtube-vos")
@click.option(
    "--root",
    required=True,
    type=click.Path(path_type=Path),
    help="YouTube-VOS folder holding <split>/JPEGImages, Annotations and meta.json.",
)
@click.option("--split", default="valid", show_default=True, help="Split folder under --root.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: Annotations/<video>/<frame>.png and submission.zip.",
)
@click.option("--videos", default=None, help="Comma-separated videos (default: all in meta.json).")
@propagation_options
@direction_option(help="forward: the benchmark's setting (objects start on their first mask).")
@cache_option
@overwrite_option
@with_backbone_spec(seed=True, frames=True)
def youtube_vos(
    root: Path,
    split: str,
    out_dir: Path,
    videos: str | None,
    config: PropagationConfig,
    direction: Direction,
    cache_dir: Path | None,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """Propagate every video of a YouTube-VOS split from its sparse annotations (each object
    starts on the frame where it is first annotated) and write OUT/submission.zip for the
    benchmark server. Complete videos are reused, so an interrupted run resumes."""
    folder = root / split if (root / split / "JPEGImages").is_dir() else root
    for part in ("JPEGImages", "Annotations"):  # checked before torch loads
        if not (folder / part).is_dir():
            raise InputError(
                f"{folder / part} not found: --root must hold {split}/JPEGImages, "
                f"{split}/Annotations and {split}/meta.json"
            )
    from dino_vos.eval.vos.youtube_vos import YouTubeVOSJob, run_youtube_vos

    names = tuple(n.strip() for n in videos.split(",") if n.strip()) if videos else None
    job = YouTubeVOSJob(
        root=root,
        out_dir=out_dir,
        spec=spec,
        split=split,
        videos=names,
        config=config,
        direction=direction,
        cache_dir=cache_dir,
        overwrite=overwrite,
    )
    run_youtube_vos(job)
