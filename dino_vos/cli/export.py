"""``dino-vos attention`` and ``dino-vos features``: per-frame attention maps and patch features."""

from __future__ import annotations

from pathlib import Path

import click

from dino_vos.cli.options import (
    FiniteFloat,
    batch_option,
    check_frames_fit,
    input_argument,
    max_frames_option,
    out_option,
    overwrite_option,
    with_backbone_spec,
)
from dino_vos.console import console, progress_bar
from dino_vos.defaults import ATTENTION_THRESHOLD, COLORMAPS
from dino_vos.outputs import check_outputs
from dino_vos.spec import BackboneSpec


def parse_layers(values: tuple[str, ...]) -> list[int] | None:
    """``--layers 9,10 --layers -1`` -> [9, 10, -1]; None when not given."""
    layers: list[int] = []
    for value in values:
        for part in value.split(","):
            try:
                layers.append(int(part))
            except ValueError as exc:
                raise click.BadParameter(
                    f"'{part}' is not a block index: give integers such as 11 or -1,-2",
                    param_hint="'--layers'",
                ) from exc
    return layers or None


@click.command(name="attention")
@input_argument
@out_option
@click.option(
    "--threshold",
    type=FiniteFloat(min=0, max=1, min_open=True),
    is_flag=False,
    flag_value=ATTENTION_THRESHOLD,
    default=None,
    help="Also write masks keeping this fraction of each map's mass "
    f"(alone: {ATTENTION_THRESHOLD}).",
)
@click.option(
    "--overlay",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the mean map blended over the frames as a video (.mp4) at the source fps.",
)
@click.option(
    "--save-raw", is_flag=True, help="Also save raw maps (heads x h x w) as OUT/raw/*.safetensors."
)
@click.option(
    "--montage", is_flag=True, help="Also write one labelled picture per frame (OUT/montage/)."
)
@click.option("--colormap", type=click.Choice(COLORMAPS), default="inferno", show_default=True)
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "bilinear"]),
    default="nearest",
    show_default=True,
    help="Upsampling of the patch maps to the frame size.",
)
@batch_option
@max_frames_option
@overwrite_option
@with_backbone_spec(seed=True)
def attention(
    input_path: Path,
    out_dir: Path,
    threshold: float | None,
    overlay: Path | None,
    save_raw: bool,
    montage: bool,
    colormap: str,
    interpolation: str,
    batch_size: int,
    max_frames: int | None,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """Last-block CLS attention maps of INPUT (an image, a folder of frames or a video)."""
    from dino_vos.sources import open_source

    source = open_source(input_path, limit=max_frames, allow_image=True)  # fails fast
    check_frames_fit(spec, source.frame_size, batch_size)
    check_outputs(out_dir, overlay, [input_path], overwrite)
    console.print(f"Attention maps of {len(source)} frames of {input_path} into {out_dir}")

    from dino_vos.attention import export_attention

    features = spec.build(announce=True)
    with progress_bar("frames") as progress:
        task = progress.add_task("Attention", total=len(source))
        summary = export_attention(
            source,
            out_dir,
            features,
            threshold=threshold,
            save_raw=save_raw,
            save_montage=montage,
            colormap=colormap,
            interpolation=interpolation,  # type: ignore[arg-type]
            overlay=overlay,
            batch_size=batch_size,
            on_frame=lambda _: progress.advance(task),
            overwrite=overwrite,
        )
    extra = f", overlay {summary.overlay}" if summary.overlay else ""
    console.print(
        f"Wrote attention maps of {summary.num_frames} frame{'s' * (summary.num_frames != 1)} "
        f"({features.backbone.num_heads} heads + mean) to {summary.out_dir} in "
        f"{summary.seconds:.1f} s ({summary.frames_per_second:.2f} frames/s){extra}"
    )


@click.command(name="features")
@input_argument
@out_option
@click.option(
    "--layers",
    multiple=True,
    help="Block indices to export, comma-separated or repeated (negative from the end) "
    "[default: -1].",
)
@click.option("--no-norm", is_flag=True, help="Skip the final LayerNorm.")
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), default="fp32", show_default=True)
@click.option("--l2", is_flag=True, help="L2-normalise every token vector.")
@click.option(
    "--layout",
    type=click.Choice(["frames", "video"]),
    default="frames",
    show_default=True,
    help="frames: one safetensors per frame; video: one features.safetensors filled in batches.",
)
@batch_option
@max_frames_option
@overwrite_option
@with_backbone_spec(seed=True)
def features(
    input_path: Path,
    out_dir: Path,
    layers: tuple[str, ...],
    no_norm: bool,
    dtype: str,
    l2: bool,
    layout: str,
    batch_size: int,
    max_frames: int | None,
    overwrite: bool,
    spec: BackboneSpec,
) -> None:
    """Patch features (and CLS tokens) of INPUT (an image, a folder of frames or a video)."""
    from dino_vos.sources import open_source

    block_indices = parse_layers(layers)
    source = open_source(input_path, limit=max_frames, allow_image=True)  # fails fast
    check_frames_fit(spec, source.frame_size, batch_size)
    check_outputs(out_dir, None, [input_path], overwrite)
    console.print(f"Features of {len(source)} frames of {input_path} into {out_dir}")

    from dino_vos.export import FeatureExporter, export_features

    extractor = spec.build(announce=True)
    exporter = FeatureExporter(extractor, block_indices, not no_norm, dtype, l2)  # type: ignore[arg-type]
    with progress_bar("frames") as progress:
        task = progress.add_task("Features", total=len(source))
        summary = export_features(
            source,
            out_dir,
            exporter,
            layout=layout,  # type: ignore[arg-type]
            batch_size=batch_size,
            on_frame=lambda _: progress.advance(task),
            overwrite=overwrite,
        )
    grid = summary.manifest["grid"]
    console.print(
        f"Wrote features of {summary.num_frames} frame{'s' * (summary.num_frames != 1)} "
        f"(blocks {exporter.layers}, grid {grid[0]}x{grid[1]}, {dtype}) to {summary.out_dir} "
        f"in {summary.seconds:.1f} s ({summary.frames_per_second:.2f} frames/s)"
    )
