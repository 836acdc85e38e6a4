"""What a run computes: :class:`BackboneSpec`, :class:`ResizeSpec`, :class:`PropagationConfig`.

Both are frozen, picklable dataclasses without torch imports, so that the command line, worker
processes and ``torchrun`` ranks describe the same model the same way and build it only when
needed (``spec.build()``). The resize rules are stated in ``docs/protocol.md#frame-preprocessing``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dino_vos.errors import param, render
from dino_vos.protocols import DEFAULT_PROTOCOL, PROTOCOLS, Protocol, get_protocol

if TYPE_CHECKING:
    from dino_vos.backbones import Backbone
    from dino_vos.features import BatchExtractor

ResizeRule = Literal["reference", "patch", "ceil"]
RESIZE_RULES: tuple[str, ...] = ("reference", "patch", "ceil")
#: Frame resampling: ``bilinear`` (OpenCV on the uint8 frame, the DINO reference) or
#: ``bicubic`` (PIL on the uint8 frame, as torchvision's resize of a PIL image: DINOv3).
Interpolation = Literal["bilinear", "bicubic"]
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")
#: Backbone precision of inference (pretraining has its own, with ``auto``).
Precision = Literal["fp32", "fp16", "bf16"]
INFERENCE_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
#: Normalisation constants of the frames: ``video`` (std 0.228 for red, the DINO video script)
#: or ``imagenet`` (0.229), see docs/protocol.md#frame-preprocessing.
Normalisation = Literal["video", "imagenet"]
NORMALISATIONS: tuple[str, ...] = ("video", "imagenet")
PosEmbedMode = Literal["auto", "reference", "timm"]
#: ``auto``: each family's own rule (DINO formula, DINOv2's per model, DINOv3's RoPE);
#: ``reference``/``timm`` force the DINO formula or timm's resize (docs/protocol.md#backbones).
POS_EMBED_MODES: tuple[str, ...] = ("auto", "reference", "timm")
#: Networks of a multi-network checkpoint: DINO/iBOT/DINOv2/dino-vos teacher and student, MoCo v3's
#: base and momentum encoders.
CHECKPOINT_KEYS: tuple[str, ...] = ("teacher", "student", "base_encoder", "momentum_encoder")


PatchRounding = Literal["down", "nearest", "up"]


def round_to_patch(size: float, patch_size: int, rounding: PatchRounding = "down") -> int:
    """``size`` pixels as a whole number of patches (at least one): rounded ``down`` (how the
    ``reference`` rule treats a side that is not a multiple of the patch), to the ``nearest``
    multiple (the ``patch`` rule) or ``up`` (no pixel of the frame is cropped)."""
    patches = size / patch_size
    if rounding == "down":
        count = math.floor(patches)
    elif rounding == "nearest":
        count = round(patches)
    elif rounding == "up":
        count = math.ceil(patches)
    else:
        raise ValueError(f"unknown rounding {rounding!r}: use down, nearest or up")
    return max(1, int(count)) * patch_size


def resized_frame_size(
    height: int,
    width: int,
    short_side: int | None = 480,
    rule: ResizeRule = "reference",
    patch_size: int = 8,
) -> tuple[int, int]:
    """Network input size (H, W) for an original frame of ``height`` x ``width``.

    ``reference``: short side -> ``short_side``, long side -> floor(long * short_side / short /
    64) * 64; square frames become short_side (H) x floor(short_side / 64) * 64 (W), as the
    reference frame reader does; a side that is then not a multiple of ``patch_size`` (a short
    side of 180 at patch 8, any 64-multiple at patch 14) is rounded down to one. ``patch``:
    scale the short side to ``short_side`` (or keep the size when None) and round each side to
    the nearest multiple of ``patch_size``. ``ceil`` (DINOv3, docs/protocol.md#dinov3-protocol):
    the short side ``short_side`` rounded up to a multiple of ``patch_size``, the long side
    scaled by the same ratio and rounded up too.
    """
    if rule == "reference":
        target = short_side or min(height, width)
        if height > width:
            out_w = target
            out_h = int((target * height / width) // 64 * 64)
        else:
            out_h = target
            out_w = int((target * width / height) // 64 * 64)
        return (
            round_to_patch(max(out_h, 64), patch_size, "down"),
            round_to_patch(max(out_w, 64), patch_size, "down"),
        )
    if rule == "patch":
        scale = 1.0 if short_side is None else short_side / min(height, width)
        out_h = round_to_patch(height * scale, patch_size, "nearest")
        out_w = round_to_patch(width * scale, patch_size, "nearest")
        return out_h, out_w
    if rule == "ceil":
        target = short_side or min(height, width)
        if width > height:
            out_h = round_to_patch(target, patch_size, "up")
            out_w = round_to_patch(width * out_h / height, patch_size, "up")
        else:
            out_w = round_to_patch(target, patch_size, "up")
            out_h = round_to_patch(height * out_w / width, patch_size, "up")
        return out_h, out_w
    raise ValueError(f"unknown resize rule '{rule}': use one of {', '.join(RESIZE_RULES)}")


@dataclass(frozen=True)
class ResizeSpec:
    """How frames are resized and normalised before the backbone
    (docs/protocol.md#frame-preprocessing)."""

    short_side: int | None = 480
    rule: ResizeRule = "reference"
    interpolation: Interpolation = "bilinear"
    normalisation: Normalisation = "video"

    def __post_init__(self) -> None:
        if self.rule not in RESIZE_RULES:
            raise ValueError(f"unknown resize rule {self.rule!r}: use {', '.join(RESIZE_RULES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}")

    @classmethod
    def for_protocol(
        cls, name: str, short_side: int | None = None, rule: ResizeRule | None = None
    ) -> ResizeSpec:
        """The frame preprocessing of protocol ``name`` (docs/protocol.md#protocols); a given
        ``short_side`` or ``rule`` overrides the protocol's."""
        protocol = get_protocol(name)
        return cls(
            protocol.short_side if short_side is None else short_side,
            protocol.resize_rule if rule is None else rule,  # type: ignore[arg-type]
            protocol.interpolation,  # type: ignore[arg-type]
            protocol.normalisation,  # type: ignore[arg-type]
        )

    def size_for(self, height: int, width: int, patch_size: int) -> tuple[int, int]:
        return resized_frame_size(height, width, self.short_side, self.rule, patch_size)

    def key(self) -> str:
        """``rule-short_side``, then the interpolation and normalisation when they are not the
        DINO reference's (so reference keys are those of earlier versions)."""
        pairs = ((self.interpolation, "bilinear"), (self.normalisation, "video"))
        extra = [value for value, reference in pairs if value != reference]
        return "-".join([self.rule, str(self.short_side), *extra])

    def patch_note(self, patch_size: int) -> str | None:
        """What happens to a short side that is not a multiple of ``patch_size`` (None when it
        is one): the ``reference`` rule rounds it down, the ``patch`` rule to the nearest; the
        parameter is named as whoever shows the note spells it (dino_vos.errors.render)."""
        if self.short_side is None or self.short_side % patch_size == 0:
            return None
        rounding: PatchRounding = "down" if self.rule == "reference" else "nearest"
        used = round_to_patch(self.short_side, patch_size, rounding)
        how = "rounded down like the long side" if rounding == "down" else "nearest multiple"
        return render(
            f"{param('short_side', self.short_side)} is not a multiple of the patch size "
            f"{patch_size}: using {used} ({how})"
        )


#: Which way propagation runs from the keyframes (docs/protocol.md#keyframes).
Direction = Literal["forward", "backward", "both"]
DIRECTIONS: tuple[str, ...] = ("forward", "backward", "both")


def frames_covered(num_frames: int, keyframes: Iterable[int], direction: Direction) -> int:
    """How many frames a run writes: from the first keyframe on (forward), up to the last one
    (backward) or all of them (both)."""
    indices = sorted(keyframes)
    if direction == "forward":
        return num_frames - indices[0]
    if direction == "backward":
        return indices[-1] + 1
    return num_frames


@dataclass(frozen=True)
class KeyframeSchedule:
    """Which frames of a benchmark sequence get their ground truth as a keyframe (simulated
    corrections): ``every:N`` (frames 0, N, 2N, ...) or a list of indices such as ``0,20,45``.
    Frame 0 is always one: it starts the run, as in the standard protocol."""

    every: int | None = None
    frames: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> KeyframeSchedule:
        text = text.strip()
        try:
            if text.startswith("every:"):
                every = int(text.removeprefix("every:"))
                if every < 1:
                    raise ValueError
                return cls(every=every)
            frames = tuple(sorted({0, *(int(part) for part in text.split(",") if part.strip())}))
            if frames[0] < 0:
                raise ValueError
            return cls(frames=frames)
        except ValueError:
            raise ValueError(
                f"cannot read keyframes {text!r}: give every:N (N >= 1) or frame indices such as "
                "0,20,45"
            ) from None

    def indices(self, num_frames: int) -> list[int]:
        """Keyframe indices within a sequence of ``num_frames`` frames."""
        if self.every is not None:
            return list(range(0, num_frames, self.every))
        return [i for i in self.frames if i < num_frames]

    def tag(self) -> str:
        """A file-name-safe name: ``every20`` or ``frames0-20-45``."""
        if self.every is not None:
            return f"every{self.every}"
        return "frames" + "-".join(map(str, self.frames))

    def __str__(self) -> str:
        if self.every is not None:
            return f"every:{self.every}"
        return ",".join(map(str, self.frames))


#: How the soft label maps are brought to pixel resolution: ``bilinear`` by the patch size (DINO,
#: docs/protocol.md#propagation), ``nearest`` to the frame size (DINOv3,
#: docs/protocol.md#dinov3-protocol), ``guided`` (docs/protocol.md#refinements).
Upsample = Literal["bilinear", "nearest", "guided"]
UPSAMPLE_MODES: tuple[str, ...] = ("bilinear", "nearest", "guided")
#: Named propagation settings (docs/protocol.md#refinements): dino is the reference protocol,
#: crw the test setting of CRW (Jabri et al. 2020), vfs that of VFS (Xu & Wang 2021).
PROPAGATION_PRESETS: dict[str, dict[str, float | int]] = {
    "dino": {"topk": 5, "context": 7, "temperature": 0.1},
    "crw": {"topk": 10, "context": 20, "temperature": 0.05},
    "vfs": {"topk": 10, "context": 20, "temperature": 0.07},
}


@dataclass(frozen=True)
class PropagationConfig:
    """Parameters of label propagation (defaults: the DINO reference protocol).

    ``protocol``: the evaluation protocol whose algorithm switches apply (``rules``,
    docs/protocol.md#protocols); its values of topk, context, radius, temperature and upsample
    come with :meth:`for_protocol` (the field alone only selects the switches).
    ``upsample``: ``bilinear`` (reference), ``nearest`` (DINOv3) or ``guided`` (edge-aware,
    guided by the frame; with ``guided_radius`` in pixels, None: the patch size, and
    ``guided_eps``), see docs/protocol.md#refinements.
    """

    topk: int = 5
    context: int = 7  # number of most recent frames besides the first one
    radius: int | None = 12  # window half-size in patches; 0: same position; None: whole frame
    temperature: float = 0.1
    max_references: int = 5  # first frame + keyframes kept as permanent references
    max_chunk_bytes: int = 32 * 2**20  # memory budget of one group of products (speed only)
    upsample: Upsample = "bilinear"
    guided_radius: int | None = None
    guided_eps: float = 1e-3
    protocol: str = DEFAULT_PROTOCOL

    @classmethod
    def for_protocol(cls, name: str, **overrides: object) -> PropagationConfig:
        """The config of protocol ``name``: its values (topk, context, radius, temperature,
        upsample) with ``overrides`` on top (docs/protocol.md#protocols)."""
        protocol = get_protocol(name)
        values = {**protocol.propagation_values(), "upsample": protocol.upsample}
        return cls(**{**values, **overrides, "protocol": name})  # type: ignore[arg-type]

    @property
    def rules(self) -> Protocol:
        """The algorithm switches of :attr:`protocol`."""
        return PROTOCOLS[self.protocol]

    @classmethod
    def preset(cls, name: str, **overrides: object) -> PropagationConfig:
        """The config of preset ``name`` (:data:`PROPAGATION_PRESETS`), ``overrides`` on top."""
        if name not in PROPAGATION_PRESETS:
            raise ValueError(
                f"unknown preset {name!r}: use one of {', '.join(PROPAGATION_PRESETS)}"
            )
        return cls(**{**PROPAGATION_PRESETS[name], **overrides})  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError("topk must be at least 1")
        if self.context < 0:
            raise ValueError("context must be 0 or more")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("temperature must be a positive, finite number")
        if self.radius is not None and self.radius < 0:
            raise ValueError("radius must be 0 or more (None: the whole frame)")
        if self.max_references < 1:
            raise ValueError("max_references must be at least 1")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample {self.upsample!r}: use {', '.join(UPSAMPLE_MODES)}")
        if self.guided_radius is not None and self.guided_radius < 1:
            raise ValueError("guided_radius must be at least 1 (None: the patch size)")
        if not (math.isfinite(self.guided_eps) and self.guided_eps > 0):
            raise ValueError("guided_eps must be a positive, finite number")
        get_protocol(self.protocol)  # ValueError naming the known protocols

    def to_dict(self) -> dict[str, float | int | str | None]:
        """The fields; the upsampling ones only when not the protocol's own upsampling, the
        protocol only when not ``dino``, so the records (and reuse checks) of reference runs
        stay those of earlier versions."""
        values = asdict(self)
        if self.upsample == self.rules.upsample:
            for key in ("upsample", "guided_radius", "guided_eps"):
                del values[key]
        if self.protocol == DEFAULT_PROTOCOL:
            del values["protocol"]
        return values


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that determines a backbone and its patch features.

    - ``name``: a registered short name (``dino_vits8`` ... ``dino_vos_tiny``), a timm ViT name
      or a weights file; None picks the default (see :func:`dino_vos.backbones.load_backbone`).
    - ``weights``: a local weights file (its architecture is inferred when ``name`` is None).
    - ``checkpoint_key``: the network of a checkpoint that holds several (``teacher`` or
      ``student``; MoCo v3: ``base_encoder`` or ``momentum_encoder``); None: teacher / base
      encoder.
    - ``random_init``: the architecture with random weights, drawn after seeding torch with
      ``seed`` (every process and rank builds the same model).
    - ``pos_embed``: position-embedding rule: ``auto`` (the family's own), or a forced
      ``reference`` (DINO formula) or ``timm`` resize.
    - ``allow_partial``: load weights whose keys do not all match the architecture, warning with
      the keys ignored and left random (otherwise refused).
    - ``resize``: the frame resize of :meth:`build`; ``device``: auto, cpu, cuda[:N].
    - ``batch_size`` (frames per forward, None: by device) and ``precision`` (fp32, fp16, bf16)
      of the features :meth:`build` gives.
    - ``shift_ensemble``: N > 1 averages the features of N x N copies of the frame shifted by
      multiples of patch/N pixels (N^2 forwards per frame, docs/protocol.md#refinements).
    """

    name: str | None = None
    weights: str | None = None
    checkpoint_key: str | None = None
    random_init: bool = False
    seed: int = 0
    pos_embed: PosEmbedMode = "auto"
    resize: ResizeSpec = field(default_factory=ResizeSpec)
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "fp32"
    allow_partial: bool = False
    shift_ensemble: int = 1

    def __post_init__(self) -> None:
        if self.shift_ensemble < 1:
            raise ValueError("shift_ensemble must be at least 1 (1: off)")
        if isinstance(self.weights, Path):  # accept paths, store a picklable, hashable str
            object.__setattr__(self, "weights", str(self.weights))

    def label(self) -> str:
        """A short description for messages before the model is built."""
        what = self.name or (Path(self.weights).name if self.weights else "default backbone")
        return f"{what} (random init)" if self.random_init else what

    def known_patch_size(self) -> int | None:
        """The patch size, when known without loading the model (names, dino-vos files)."""
        from dino_vos.limits import known_patch_size

        return known_patch_size(self.name, self.weights)

    def build_backbone(self, announce: bool = False) -> Backbone:
        """Build the backbone in eval mode; under torchrun on this rank's GPU.

        ``announce`` shows a status line while it loads, then prints which backbone is used and
        any ``allow_partial`` warning.
        """
        import torch
        from rich.markup import escape

        from dino_vos.backbones import load_backbone
        from dino_vos.console import console
        from dino_vos.distributed import rank_device
        from dino_vos.errors import ArchitectureGuessWarning, PartialWeightsWarning

        shown = (PartialWeightsWarning, ArchitectureGuessWarning)

        torch.manual_seed(self.seed)  # random-init weights: the same in every process
        with (
            console.status(f"Loading backbone {self.label()} ...") if announce else nullcontext(),
            warnings.catch_warnings(record=True) if announce else nullcontext() as caught,
        ):
            if announce:
                for category in shown:
                    warnings.simplefilter("always", category)
            backbone = load_backbone(
                self.name,
                weights=self.weights,
                checkpoint_key=self.checkpoint_key,
                device=rank_device(self.device),
                pos_embed=self.pos_embed,
                pretrained=not self.random_init,
                allow_partial=self.allow_partial,
            )
        if announce:
            console.print(f"Backbone: {backbone.describe()}")
            for warning in caught or []:
                if issubclass(warning.category, shown):
                    console.print(f"[yellow]Warning:[/yellow] {escape(str(warning.message))}")
                else:
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
        return backbone

    def build(self, announce: bool = False) -> BatchExtractor:
        """The backbone with this spec's frame resize: frames in, patch features out (shift
        ensembled when ``shift_ensemble`` > 1)."""
        from dino_vos.features import BackboneFeatures, ShiftEnsembleFeatures

        backbone = self.build_backbone(announce)
        note = self.resize.patch_note(backbone.patch_size)
        if announce and note is not None and self.known_patch_size() is None:  # else said first
            from dino_vos.console import console

            console.print(f"Note: {note}")
        features: BatchExtractor = BackboneFeatures(
            backbone,
            self.resize,
            batch_size=self.batch_size,
            precision=self.precision,  # type: ignore[arg-type]
        )
        if self.shift_ensemble > 1:
            features = ShiftEnsembleFeatures(features, self.shift_ensemble)
        return features
