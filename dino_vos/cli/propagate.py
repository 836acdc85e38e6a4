"""``dino-vos propagate`` and ``dino-vos demo``: the main job, on the user's video or offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dino_vos.cli.options import (
    check_frames_fit,
    direction_option,
    input_argument,
    max_frames_option,
    out_option,
    overwrite_option,
    propagation_options,
    store_budget_option,
    with_backbone_spec,
)
from dino_vos.cli.report import check_report_dir, report_option, write_run_report
from dino_vos.console import console, progress_bar
from dino_vos.defaults import DEMO_OUTPUTS, DEMO_SIZE
from dino_vos.errors import DinoVosError
from dino_vos.outputs import (
    check_out_dir,
    check_outputs,
    foreign_entries,
    is_result_folder,
    locked_output,
)
from dino_vos.spec import BackboneSpec, Direction, PropagationConfig, frames_covered

if TYPE_CHECKING:  # torch loads only once the input is checked
    from dino_vos.features import BatchExtractor


def is_previous_demo(folder: Path) -> bool:
    """A folder that an earlier ``dino-vos demo`` wrote (and may write again)."""
    return is_result_folder(folder / "masks") and set(foreign_entries(folder)) <= DEMO_OUTPUTS


def parse_mask_entry(entry: str) -> tuple[str | None, Path]:
    """A ``--mask`` value: ``FILE`` -> (None, FILE) (the first frame); ``FRAME=FILE`` -> (FRAME,
    FILE). An existing file whose name holds ``=`` is a file."""
    frame, sep, file = entry.partition("=")
    if sep and not Path(entry).exists():
        return frame, Path(file)
    return None, Path(entry)


def _run_metadata(features: BatchExtractor) -> dict[str, Any]:
    """The features' settings record, with the weights' source and the batch size."""
    return {
        **features.settings(),
        "weights": features.backbone.weights_id,
        "batch_size": features.batch_size,
    }


@click.command()
@input_argument
@click.option(
    "--mask",
    "masks",
    multiple=True,
    metavar="[FRAME=]FILE",
    help="Annotation PNG (indexed, or grayscale 0/255) of the first frame, or FRAME=FILE for the "
    "frame with that index or name (a keyframe: a correction or objects that enter); repeatable.",
)
@click.option(
    "--masks",
    "masks_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A folder of sparse annotation PNGs named like the frames (as YouTube-VOS Annotations/).",
)
@out_option
@propagation_options
@click.option(
    "--overlay",
    type=click.Path(path_type=Path),
    default=None,
    help="Write an overlay video (.mp4).",
)
@click.option(
    "--save-probs",
    type=click.Choice(["npz", "safetensors"]),
    default=None,
    help="Also save soft label maps per frame (float16) under OUT/probs/.",
)
@direction_option()
@store_budget_option
@max_frames_option
@report_option
@overwrite_option
@with_backbone_spec(frames=True)
def propagate(
    input_path: Path,
    masks: tuple[str, ...],
    masks_dir: Path | None,
    out_dir: Path,
    config: PropagationConfig,
    direction: Direction,
    store_budget: int,
    overlay: Path | None,
    save_probs: str | None,
    max_frames: int | None,
    report_dir: Path | None,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """Propagate the annotated masks through INPUT (a video file or a folder of frames).

    The first annotated frame starts the run (the last one with --direction backward); masks
    on other frames are keyframes.
    """
    from dino_vos.masks import read_keyframes
    from dino_vos.sources import open_source

    if not masks and masks_dir is None:
        raise click.UsageError("give the first frame's annotation: --mask FILE (or --masks DIR)")
    source = open_source(input_path, limit=max_frames)  # input checks first, without torch
    given = [parse_mask_entry(entry) for entry in masks]
    keyframes = read_keyframes(source, given, masks_dir, limited=max_frames is not None)
    check_frames_fit(spec, source.frame_size)
    mask_files = [file for _, file in given]
    inputs = [input_path, *mask_files, *([masks_dir] if masks_dir else [])]
    check_outputs(out_dir, overlay, inputs, overwrite)
    check_report_dir(report_dir, [*inputs, out_dir])

    from dino_vos.api import propagate_to_folder

    names = source.frame_names()
    total = frames_covered(len(source), keyframes, direction)
    console.print(
        f"Propagating {total} frames of {input_path} {direction} from keyframe"
        f"{'s' * (len(keyframes) > 1)} {', '.join(names[i] for i in sorted(keyframes))} "
        f"into {out_dir}"
    )
    features = spec.build(announce=True)
    with progress_bar("frames") as progress:
        task = progress.add_task("Propagating", total=total)
        summary = propagate_to_folder(
            source,
            keyframes,
            out_dir,
            features,
            config,
            overlay=overlay,
            save_probs=save_probs,  # type: ignore[arg-type]
            on_frame=lambda _: progress.advance(task),
            metadata=_run_metadata(features),
            overwrite=overwrite,
            direction=direction,
            store_budget=store_budget,
        )
    objects = len(summary.object_ids) - 1
    extra = f", overlay {summary.overlay}" if summary.overlay else ""
    console.print(
        f"Wrote {summary.num_frames} masks ({objects} object{'s' * (objects != 1)}) to "
        f"{summary.out_dir} in {summary.seconds:.1f} s ({summary.frames_per_second:.2f} frames/s)"
        f"{extra}"
    )
    write_run_report(out_dir, report_dir)


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("dino-vos-demo"),
    show_default=True,
    help="Output folder.",
)
@click.option(
    "--video",
    type=click.Path(path_type=Path),
    default=None,
    help="Your own clip (video file or frame folder) instead of the generated one.",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path),
    default=None,
    help="First-frame annotation of --video.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Generated clip's seed.")
@click.option(
    "--clip-style",
    type=click.Choice(["grass", "colour"]),
    default="grass",
    show_default=True,
    help="Generated clip: objects close in colour to a grainy background (grass), where trained "
    "features matter, or saturated objects on grey (colour), easy for any backbone.",
)
@overwrite_option
@with_backbone_spec(short_side=DEMO_SIZE[0])
def demo(
    out_dir: Path,
    video: Path | None,
    mask: Path | None,
    seed: int,
    clip_style: str,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """Run the main job offline: propagate a generated clip (or --video/--mask) and score it."""
    if (video is None) != (mask is None):
        raise DinoVosError("give --video and --mask together (or neither for the generated clip)")
    source, first_mask = None, None
    if video is not None and mask is not None:  # check the user's clip before loading a model
        from dino_vos.masks import read_annotation, require_objects
        from dino_vos.sources import open_source

        source = open_source(video)
        first_mask = read_annotation(mask, source)
        require_objects(first_mask, mask)
    check_frames_fit(spec, source.frame_size if source is not None else DEMO_SIZE)
    inputs = [path for path in (video, mask) if path is not None]
    check_out_dir(out_dir, inputs, overwrite, is_previous_result=is_previous_demo)
    with locked_output(out_dir, inputs=inputs):  # one run per folder
        _run_demo(out_dir, spec, source, first_mask, video, seed, clip_style, overwrite)


def _run_demo(
    out_dir: Path,
    spec: BackboneSpec,
    source: Any,
    first_mask: Any,
    video: Path | None,
    seed: int,
    clip_style: str,
    overwrite: bool,
) -> None:
    from dataclasses import replace

    from rich.table import Table

    from dino_vos.registry import SHIPPED_BACKBONE, registered_backbone

    what = f"{video}" if video is not None else f"a generated '{clip_style}' clip (seed {seed})"
    console.print(f"Demo: propagating the first mask of {what} into {out_dir}")
    shipped = registered_backbone(SHIPPED_BACKBONE).shipped_file  # type: ignore[union-attr]
    if spec.name is None and spec.weights is None and shipped is not None and shipped.is_file():
        spec = replace(spec, name=SHIPPED_BACKBONE)
    from dino_vos.eval.demo import run_demo  # torch: after the checks

    features = spec.build(announce=True)
    with progress_bar("frames") as progress:
        task = progress.add_task("Propagating", total=None)
        result = run_demo(
            out_dir,
            features,
            video=source,
            mask=first_mask,
            seed=seed,
            clip_style=clip_style,
            on_start=lambda total: progress.update(task, total=total),
            on_frame=lambda _: progress.advance(task),
            metadata=_run_metadata(features),
            overwrite=overwrite,
        )
    summary = result.summary
    console.print(
        f"Wrote {summary.num_frames} masks to {summary.out_dir} and {summary.overlay} in "
        f"{summary.seconds:.1f} s ({summary.frames_per_second:.2f} frames/s)"
    )
    if result.scores is None or result.per_object is None:
        return
    table = Table(title=f"J&F on the generated clip ({features.backbone.name})")
    for column in ("object", "J-Mean", "F-Mean", "J&F-Mean"):
        table.add_column(column, justify="right")
    for object_id, stats in result.per_object.items():
        jf = (stats["J-Mean"] + stats["F-Mean"]) / 2
        table.add_row(str(object_id), *(f"{v:.3f}" for v in (stats["J-Mean"], stats["F-Mean"], jf)))
    s = result.scores
    table.add_row(
        "all", f"{s['J-Mean']:.3f}", f"{s['F-Mean']:.3f}", f"{s['J&F-Mean']:.3f}", style="bold"
    )
    console.print(table)
