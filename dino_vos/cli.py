"""The ``dino-vos`` command line: a thin layer over the Python API."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dino_vos import __version__
from dino_vos.backbones import DEFAULT_BACKBONE, SHIPPED_BACKBONE, Backbone, load_backbone
from dino_vos.console import console, progress_bar
from dino_vos.demo import DEMO_SIZE
from dino_vos.errors import DinoVosError
from dino_vos.features import BackboneFeatures, ResizeSpec
from dino_vos.transforms import RESIZE_RULES


class DinoVosGroup(click.Group):
    """A click group that turns :class:`DinoVosError` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DinoVosError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted: partial outputs were discarded.", err=True)
            ctx.exit(130)


def backbone_options(func: Callable) -> Callable:
    """--backbone/--weights/--checkpoint-key/--random-init/--pos-embed/--device."""
    options = [
        click.option(
            "--backbone",
            default=None,
            help=f"Model name: dino_vits8, dino_vits16, dino_vitb8, dino_vitb16, a timm ViT name "
            f"or a weights file [default: {DEFAULT_BACKBONE} when its weights are cached or "
            f"online, else the shipped {SHIPPED_BACKBONE}; inferred from --weights if given].",
        ),
        click.option(
            "--weights",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Local weights: official DINO .pth, training checkpoint, or .safetensors.",
        ),
        click.option(
            "--checkpoint-key",
            type=click.Choice(["teacher", "student"]),
            default="teacher",
            show_default=True,
            help="Which network of a training checkpoint to load.",
        ),
        click.option(
            "--random-init", is_flag=True, help="Use the architecture with random weights."
        ),
        click.option(
            "--pos-embed",
            type=click.Choice(["reference", "timm"]),
            default="reference",
            show_default=True,
            help="Position-embedding resize: DINO reference formula or timm's dynamic resize.",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda[:N]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_backbone_from_options(
    backbone: str | None,
    weights: Path | None,
    checkpoint_key: str,
    random_init: bool,
    pos_embed: str,
    device: str,
) -> Backbone:
    """Build the backbone the common options describe and say which one is used."""
    with console.status(f"Loading backbone {backbone or weights or 'default'} ..."):
        model = load_backbone(
            backbone,
            weights=weights,
            checkpoint_key=checkpoint_key,
            device=device,
            pos_embed=pos_embed,  # type: ignore[arg-type]
            pretrained=not random_init,
        )
    console.print(
        f"Backbone: [bold]{model.name}[/] (patch {model.patch_size}, dim {model.embed_dim}, "
        f"weights {model.weights_id}) on {model.device}"
    )
    return model


def resize_options(func: Callable | None = None, *, short_side: int = 480) -> Callable:
    """--short-side (default ``short_side``) and --resize-rule; usable with or without arguments."""
    if func is None:
        return functools.partial(resize_options, short_side=short_side)
    func = click.option(
        "--resize-rule",
        type=click.Choice(RESIZE_RULES),
        default="reference",
        show_default=True,
        help="reference: short side N, long side floored to a multiple of 64 (DINO protocol); "
        "patch: short side N, both sides rounded to the nearest multiple of the patch size.",
    )(func)
    return click.option(
        "--short-side",
        type=click.IntRange(min=8),
        default=short_side,
        show_default=True,
        help="Short side of the network input in pixels.",
    )(func)


def propagation_options(func: Callable) -> Callable:
    """--topk/--context/--radius/--temperature, defaulting to the DINO reference protocol."""
    options = [
        click.option(
            "--topk",
            type=click.IntRange(min=1),
            default=5,
            show_default=True,
            help="Neighbours kept jointly over the context frames.",
        ),
        click.option(
            "--context",
            type=click.IntRange(min=0),
            default=7,
            show_default=True,
            help="Recent frames used besides the first one.",
        ),
        click.option(
            "--radius",
            type=int,
            default=12,
            show_default=True,
            help="Square window half-size in patches (0: whole frame).",
        ),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0, min_open=True),
            default=0.1,
            show_default=True,
            help="Softmax temperature of the affinities.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def with_backbone_features(func: Callable) -> Callable:
    """Decorate a command with backbone and resize options; it receives ``load_features=``.

    The backbone loads only when the command calls ``load_features()``, after it has checked
    its inputs, so a missing file fails at once without loading a model.
    """

    @backbone_options
    @resize_options
    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        resize = ResizeSpec(kwargs.pop("short_side"), kwargs.pop("resize_rule"))
        names = ("backbone", "weights", "checkpoint_key", "random_init", "pos_embed", "device")
        backbone_kwargs = {name: kwargs.pop(name) for name in names}

        def load_features() -> BackboneFeatures:
            return BackboneFeatures(load_backbone_from_options(**backbone_kwargs), resize)

        return func(load_features=load_features, **kwargs)

    return wrapper


@click.group(cls=DinoVosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dino-vos")
def main() -> None:
    """Video object segmentation with self-supervised DINO Vision Transformers."""


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option(
    "--mask",
    required=True,
    type=click.Path(path_type=Path),
    help="First-frame annotation PNG (indexed, or grayscale 0/255).",
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder."
)
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
@click.option(
    "--max-frames", type=click.IntRange(min=1), default=None, help="Only the first N frames."
)
@with_backbone_features
def propagate(
    input_path: Path,
    mask: Path,
    out_dir: Path,
    topk: int,
    context: int,
    radius: int,
    temperature: float,
    overlay: Path | None,
    save_probs: str | None,
    max_frames: int | None,
    load_features: Callable[[], BackboneFeatures],
) -> None:
    """Propagate the first-frame MASK through INPUT (a video file or a folder of frames)."""
    from dino_vos.api import first_frame_mask, propagate_video
    from dino_vos.propagation import PropagationConfig
    from dino_vos.sources import open_source

    source = open_source(input_path, limit=max_frames)
    first_mask = first_frame_mask(mask, source)
    features = load_features()
    config = PropagationConfig(topk=topk, context=context, radius=radius, temperature=temperature)
    with progress_bar("frames") as progress:
        task = progress.add_task("Propagating", total=len(source))
        summary = propagate_video(
            source,
            first_mask,
            out_dir,
            features,
            config,
            overlay=overlay,
            save_probs=save_probs,  # type: ignore[arg-type]
            on_frame=lambda _: progress.advance(task),
            metadata={
                "backbone": features.backbone.name,
                "weights": features.backbone.weights_id,
                "resize": features.resize.key(),
            },
        )
    objects = len(summary.object_ids) - 1
    extra = f", overlay {summary.overlay}" if summary.overlay else ""
    console.print(
        f"Wrote {summary.num_frames} masks ({objects} object{'s' * (objects != 1)}) to "
        f"{summary.out_dir} in {summary.seconds:.1f} s ({summary.frames_per_second:.2f} frames/s)"
        f"{extra}"
    )


@main.command()
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
@backbone_options
@resize_options(short_side=DEMO_SIZE[0])
def demo(
    out_dir: Path,
    video: Path | None,
    mask: Path | None,
    seed: int,
    clip_style: str,
    **options: Any,
) -> None:
    """Run the main job offline: propagate a generated clip (or --video/--mask) and score it."""
    from rich.table import Table

    from dino_vos.backbones import SHIPPED_BACKBONE, SHIPPED_WEIGHTS_DIR
    from dino_vos.demo import run_demo

    if (video is None) != (mask is None):
        raise DinoVosError("give --video and --mask together (or neither for the generated clip)")
    source, first_mask = None, None
    if video is not None and mask is not None:  # check the user's clip before loading a model
        from dino_vos.api import first_frame_mask
        from dino_vos.sources import open_source

        source = open_source(video)
        first_mask = first_frame_mask(mask, source)
    shipped = (SHIPPED_WEIGHTS_DIR / f"{SHIPPED_BACKBONE}.safetensors").is_file()
    if options["backbone"] is None and options["weights"] is None and shipped:
        options["backbone"] = SHIPPED_BACKBONE
    resize = ResizeSpec(options.pop("short_side"), options.pop("resize_rule"))
    model = load_backbone_from_options(**options)
    features = BackboneFeatures(model, resize)
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
            metadata={"backbone": model.name, "weights": model.weights_id, "resize": resize.key()},
        )
    summary = result.summary
    console.print(
        f"Wrote {summary.num_frames} masks to {summary.out_dir} and {summary.overlay} in "
        f"{summary.seconds:.1f} s ({summary.frames_per_second:.2f} frames/s)"
    )
    if result.scores is None or result.per_object is None:
        return
    table = Table(title=f"J&F on the generated clip ({model.name})")
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


def _register_subcommands() -> None:
    from dino_vos.cli_export import attention_command, features_command
    from eval.cli import eval_group
    from pretrain.cli import pretrain_command

    main.add_command(eval_group)
    main.add_command(pretrain_command)
    main.add_command(attention_command)
    main.add_command(features_command)


_register_subcommands()
