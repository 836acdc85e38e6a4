"""Options shared by the commands, and the one place where options become a model.

Nothing here imports torch: the options turn into a :class:`~dino_vos.spec.BackboneSpec`, which
builds the model only when a command calls ``spec.build(announce=True)``,
after its inputs were checked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dino_vos.console import console
from dino_vos.errors import InputError
from dino_vos.limits import (
    MAX_FRAME_BATCH,
    MAX_SHIFT_ENSEMBLE,
    MAX_SHORT_SIDE,
    MAX_WORKERS,
    check_frame_memory,
)
from dino_vos.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from dino_vos.registry import DEFAULT_BACKBONE, SHIPPED_BACKBONE, backbone_names
from dino_vos.sizes import DEFAULT_STORE_BUDGET, format_size, parse_size
from dino_vos.spec import (
    CHECKPOINT_KEYS,
    DIRECTIONS,
    INFERENCE_PRECISIONS,
    POS_EMBED_MODES,
    PROPAGATION_PRESETS,
    RESIZE_RULES,
    UPSAMPLE_MODES,
    BackboneSpec,
    PropagationConfig,
    ResizeSpec,
)

_BACKBONE_KEYS = (
    "backbone",
    "weights",
    "checkpoint_key",
    "random_init",
    "pos_embed",
    "device",
    "allow_partial",
)
_PROPAGATION_DEFAULTS = PropagationConfig()


class IntRange(click.IntRange):
    """click's IntRange, whose refusal of a non-number names the valid range too."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, int):
            try:
                int(value)
            except (TypeError, ValueError):
                self.fail(
                    f"{value!r} is not a whole number in the range {self._describe_range()}",
                    param,
                    ctx,
                )
        return super().convert(value, param, ctx)


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (``float("nan")`` passes every comparison)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        valid = f"a finite number in the range {self._describe_range()}"
        if not isinstance(value, float):
            try:
                float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not {valid}", param, ctx)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not {valid}", param, ctx)
        return number


class Radius(click.ParamType):
    """A window radius in patches (0 or more), or ``none`` for the whole frame."""

    name = "radius"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        try:
            radius = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a radius: give a whole number >= 0 or none", param, ctx)
        if radius < 0:
            self.fail(
                f"{radius} is negative: give a radius >= 0, or none for the whole frame", param, ctx
            )
        return radius


#: The value type of every propagation parameter, shared by --topk ... --max-references and the
#: ``--sweep NAME=V1,V2`` values of ``eval davis`` (one parser, one set of rules).
PROPAGATION_TYPES: dict[str, click.ParamType] = {
    "topk": IntRange(min=1),
    "context": IntRange(min=0),
    "radius": Radius(),
    "temperature": FiniteFloat(min=0, min_open=True),
    "max_references": IntRange(min=1),
}


def convert_propagation_value(name: str, text: str) -> Any:
    """``text`` as a value of propagation parameter ``name`` (click.BadParameter if invalid)."""
    return PROPAGATION_TYPES[name].convert(text, None, None)


def _apply(func: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):
        func = option(func)
    return func


def backbone_options(func: Callable) -> Callable:
    """--backbone/--weights/--checkpoint-key/--allow-partial/--random-init/--pos-embed/--device."""
    return _apply(
        func,
        [
            click.option(
                "--backbone",
                default=None,
                help=f"Model name: {', '.join(backbone_names(available_only=False))}, a timm ViT "
                f"name or a weights file [default: {DEFAULT_BACKBONE} when its weights are cached "
                f"or online, else the shipped {SHIPPED_BACKBONE}; inferred from --weights].",
            ),
            click.option(
                "--weights",
                type=click.Path(dir_okay=False, path_type=Path),
                default=None,
                help="Local weights: DINO, DINOv2, iBOT, MoCo v3, MAE or timm checkpoints, state "
                "dicts, .safetensors (docs/backbones.md).",
            ),
            click.option(
                "--checkpoint-key",
                type=click.Choice(CHECKPOINT_KEYS),
                default=None,
                help="Which network of a checkpoint holding several to load [default: teacher; "
                "base_encoder for MoCo v3].",
            ),
            click.option(
                "--allow-partial",
                is_flag=True,
                help="Load weights whose keys do not all fit the architecture, with a warning "
                "listing the keys ignored and left random (refused otherwise).",
            ),
            click.option(
                "--random-init", is_flag=True, help="Use the architecture with random weights."
            ),
            click.option(
                "--pos-embed",
                type=click.Choice(POS_EMBED_MODES),
                default="auto",
                show_default=True,
                help="Position embeddings: auto (each family's own rule: DINO formula, DINOv2's "
                "per model, DINOv3's RoPE), or force the DINO formula or timm's resize.",
            ),
            click.option(
                "--device", default="auto", show_default=True, help="auto, cpu, cuda[:N]."
            ),
        ],
    )


def resize_options(func: Callable | None = None, *, short_side: int = 480) -> Callable:
    """--short-side (default ``short_side``) and --resize-rule; usable with or without arguments."""
    if func is None:
        return functools.partial(resize_options, short_side=short_side)
    return _apply(
        func,
        [
            click.option(
                "--short-side",
                type=IntRange(min=8, max=MAX_SHORT_SIDE),
                default=short_side,
                show_default=True,
                help="Short side of the network input in pixels (with --protocol: that "
                "protocol's unless given, 960 for dinov3).",
            ),
            click.option(
                "--resize-rule",
                type=click.Choice(RESIZE_RULES),
                default="reference",
                show_default=True,
                help="reference: short side N, long side floored to a multiple of 64 (DINO "
                "protocol); patch: short side N, both sides rounded to a multiple of the patch; "
                "ceil: both rounded up to a multiple of the patch (DINOv3 protocol) [with "
                "--protocol: that protocol's unless given].",
            ),
        ],
    )


seed_option = click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of --random-init weights (every worker and rank builds the same model).",
)


def with_backbone_spec(
    func: Callable | None = None,
    *,
    short_side: int | None = 480,
    seed: bool = False,
    frames: bool = False,
) -> Callable:
    """Add the backbone options (resize too unless ``short_side`` is None, ``--seed`` with
    ``seed``, ``--batch-size``/``--precision`` of the frame features with ``frames``); the
    command receives them as one ``spec=BackboneSpec``."""
    if func is None:
        return functools.partial(
            with_backbone_spec, short_side=short_side, seed=seed, frames=frames
        )

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        resize = ResizeSpec()
        if short_side is not None:
            side, rule = kwargs.pop("short_side"), kwargs.pop("resize_rule")
            protocol = _protocol_option()
            if protocol is None:
                resize = ResizeSpec(side, rule)
            else:  # the protocol's frames; --short-side/--resize-rule given override them
                resize = ResizeSpec.for_protocol(
                    protocol,
                    side if _given("short_side") else None,
                    rule if _given("resize_rule") else None,
                )
        values = {key: kwargs.pop(key) for key in _BACKBONE_KEYS}
        spec = BackboneSpec(
            name=values["backbone"],
            weights=str(values["weights"]) if values["weights"] is not None else None,
            checkpoint_key=values["checkpoint_key"],
            random_init=values["random_init"],
            seed=kwargs.pop("seed") if seed else 0,
            pos_embed=values["pos_embed"],
            resize=resize,
            device=values["device"],
            batch_size=kwargs.pop("batch_size") if frames else None,
            precision=kwargs.pop("precision") if frames else "fp32",
            shift_ensemble=kwargs.pop("shift_ensemble") if frames else 1,
            allow_partial=values["allow_partial"],
        )
        if short_side is not None:
            patch_size = spec.known_patch_size()
            note = spec.resize.patch_note(patch_size) if patch_size is not None else None
            if note is not None:
                console.print(f"Note: {note}")
        return func(spec=spec, **kwargs)

    decorated = backbone_options(wrapper)
    if short_side is not None:
        decorated = resize_options(decorated, short_side=short_side)
    if frames:
        decorated = frame_feature_options(decorated)
    return seed_option(decorated) if seed else decorated


def frame_feature_options(func: Callable) -> Callable:
    """--batch-size/--precision/--shift-ensemble of the frame features (propagation and its
    benchmarks)."""
    return _apply(
        func,
        [
            click.option(
                "--batch-size",
                type=IntRange(min=1, max=MAX_FRAME_BATCH),
                default=None,
                help="Frames per backbone forward [default: 1 on CPU, 8 on CUDA]; frames are "
                "decoded ahead in a background thread.",
            ),
            click.option(
                "--precision",
                type=click.Choice(INFERENCE_PRECISIONS),
                default="fp32",
                show_default=True,
                help="Backbone precision (fp16/bf16: autocast, for GPUs; fp16 needs CUDA). "
                "Propagation stays fp32.",
            ),
            click.option(
                "--shift-ensemble",
                type=IntRange(min=1, max=MAX_SHIFT_ENSEMBLE),
                default=1,
                show_default=True,
                help="Average the features of N x N inputs shifted by multiples of patch/N "
                "pixels (1: off; N^2 forwards per frame; beyond the reference protocol).",
            ),
        ],
    )


def _given(name: str) -> bool:
    """Whether option ``name`` was given (command line, environment), not left at its default."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _protocol_option() -> str | None:
    """The --protocol of the running command (None: a command without that option)."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.params.get("protocol")


def propagation_options(func: Callable) -> Callable:
    """--protocol/--preset/--topk/--context/--radius/--temperature/--upsample (defaults: the
    DINO reference protocol); the command receives them as one ``config=PropagationConfig``.
    The protocol gives every value (docs/protocol.md#protocols); a preset given explicitly sets
    top-k, context and temperature (docs/protocol.md#refinements); options given explicitly
    override both. --protocol also sets the frame preprocessing (see with_backbone_spec)."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        protocol, preset = kwargs.pop("protocol"), kwargs.pop("preset")
        values = {key: kwargs.pop(key) for key in ("topk", "context", "radius", "temperature")}
        values["upsample"] = kwargs.pop("upsample")
        overrides = {key: value for key, value in values.items() if _given(key)}
        preset_values = PROPAGATION_PRESETS[preset] if _given("preset") else {}
        config = PropagationConfig.for_protocol(
            protocol, **{**preset_values, **overrides}, max_references=kwargs.pop("max_references")
        )
        return func(config=config, **kwargs)

    return _apply(
        wrapper,
        [
            click.option(
                "--protocol",
                type=click.Choice(tuple(PROTOCOLS)),
                default=DEFAULT_PROTOCOL,
                show_default=True,
                help="Evaluation protocol, each reproducing its paper's code: dino (480 px, "
                "square window, temperature 0.1) or dinov3 (960 px rounded up to the patch, "
                "bicubic, circular neighbourhood, temperature 0.2, nearest upsampling; "
                "docs/protocol.md#dinov3-protocol). Explicit options override its values.",
            ),
            click.option(
                "--preset",
                type=click.Choice(tuple(PROPAGATION_PRESETS)),
                default="dino",
                show_default=True,
                help="Propagation setting: dino (reference protocol: top-k 5, context 7, "
                "temperature 0.1), crw (10, 20, 0.05), vfs (10, 20, 0.07); given, it overrides "
                "the --protocol's values. --topk, --context and --temperature given explicitly "
                "override it.",
            ),
            click.option(
                "--topk",
                type=PROPAGATION_TYPES["topk"],
                default=_PROPAGATION_DEFAULTS.topk,
                help="Neighbours kept jointly over the context frames [default: from "
                "--protocol/--preset].",
            ),
            click.option(
                "--context",
                type=PROPAGATION_TYPES["context"],
                default=_PROPAGATION_DEFAULTS.context,
                help="Recent frames used besides the first one [default: from "
                "--protocol/--preset].",
            ),
            click.option(
                "--radius",
                type=PROPAGATION_TYPES["radius"],
                default=str(_PROPAGATION_DEFAULTS.radius),
                show_default=False,
                help="Window half-size (dino: square, dinov3: circle radius) in patches; none: "
                "the whole frame [default: from --protocol].",
            ),
            click.option(
                "--temperature",
                type=PROPAGATION_TYPES["temperature"],
                default=_PROPAGATION_DEFAULTS.temperature,
                help="Softmax temperature of the affinities [default: from --protocol/--preset].",
            ),
            click.option(
                "--max-references",
                type=PROPAGATION_TYPES["max_references"],
                default=_PROPAGATION_DEFAULTS.max_references,
                show_default=True,
                help="Annotated frames kept as references (the first one always; keyframes "
                "beyond this drop the oldest).",
            ),
            click.option(
                "--upsample",
                type=click.Choice(UPSAMPLE_MODES),
                default=None,
                help="Soft-map upsampling: bilinear (by the patch size, dino), nearest (to the "
                "frame size, dinov3) or guided (edge-aware guided filter with the frame as "
                "guide; beyond the reference protocols) [default: from --protocol].",
            ),
        ],
    )


input_argument = click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
out_option = click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder."
)
max_frames_option = click.option(
    "--max-frames", type=IntRange(min=1), default=None, help="Only the first N frames."
)
overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="Allow an --out folder that is not empty and not a dino-vos result; files that "
    "dino-vos did not write are still never replaced.",
)
batch_option = click.option(
    "--batch-size",
    type=IntRange(min=1, max=MAX_FRAME_BATCH),
    default=1,
    show_default=True,
    help="Frames per backbone forward.",
)


def deprecated_alias(old: str, new: str, dest: str, **option: Any) -> Callable:
    """Keep ``old`` as a hidden spelling of option ``new`` (parameter ``dest``): it still works,
    with one warning line."""
    hidden = f"deprecated_{dest}"

    def decorate(func: Callable) -> Callable:
        @click.option(old, hidden, hidden=True, default=None, **option)
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(hidden)
            if value is not None:
                console.print(f"[yellow]Warning:[/yellow] {old} is deprecated: use {new}")
                kwargs[dest] = value
            return func(*args, **kwargs)

        return wrapper

    return decorate


#: --cache: the feature cache of the benchmark commands (eval davis, eval youtube-vos).
cache_option = click.option(
    "--cache",
    "cache_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Feature cache folder: later runs with other propagation parameters skip the backbone.",
)


def direction_option(choices: Sequence[str] = DIRECTIONS, help: str = "") -> Callable:
    """--direction of propagation from the keyframes (docs/protocol.md#keyframes)."""
    return click.option(
        "--direction",
        type=click.Choice(list(choices)),
        default="forward",
        show_default=True,
        help=help
        or "forward from the first keyframe; backward from the last one towards frame 0; both: "
        "every frame, fusing the two directions between keyframes (docs/protocol.md#keyframes).",
    )


def process_workers_option(what: str) -> Callable:
    """--workers: how many ``what`` run at once in parallel processes (each with its own
    backbone), as ``eval davis`` and ``propagate-batch`` share them out."""
    return click.option(
        "--workers",
        type=IntRange(min=1, max=MAX_WORKERS),
        default=1,
        show_default=True,
        help=f"{what} run in parallel processes.",
    )


def check_frames_fit(
    spec: BackboneSpec, frame_size: tuple[int, int], batch_size: int | None = None
) -> None:
    """Refuse, before the model loads, a --short-side (and batch) whose network inputs for
    frames of ``frame_size`` cannot fit into this machine's memory (dino_vos.limits)."""
    patch_size = spec.known_patch_size() or 16  # the largest patch in use: a lower bound
    input_size = spec.resize.size_for(*frame_size, patch_size)
    check_frame_memory(frame_size, input_size, patch_size, batch_size or spec.batch_size or 1)


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


#: --store-budget of backward and bidirectional runs (docs/protocol.md#keyframes).
store_budget_option = click.option(
    "--store-budget",
    default=format_size(DEFAULT_STORE_BUDGET).replace(" ", ""),
    show_default=True,
    metavar="SIZE",
    callback=_size,
    help="Temporary disk of --direction backward/both (forward soft maps, then features); "
    "features that do not fit are computed again. Results do not depend on it "
    "(docs/protocol.md#keyframes).",
)
