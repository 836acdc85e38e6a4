"""Pretraining configuration: nested dataclasses, presets, YAML/JSON files, ``key=value`` overrides.

Resolution order: defaults (``main_dino`` defaults, docs/protocol.md#pretraining) -> preset ->
config file -> explicit CLI flags -> ``--set section.key=value``. The resolved config is saved
with the run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from dino_vos.atomic import atomic_write_text
from dino_vos.errors import InputError, param
from dino_vos.limits import MAX_IMAGE_BATCH, MAX_IMAGE_SIZE, MAX_WORKERS

TRAINING_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: What a run folder holds.
CHECKPOINT_NAME = "checkpoint.pth"
CONFIG_NAME = "config.yaml"
LOG_NAME = "log.jsonl"
TEACHER_EXPORT_NAME = "teacher_backbone.safetensors"
INIT_EXPORT_NAME = "init_backbone.safetensors"


def is_run_folder(folder: Path) -> bool:
    """A folder that ``dino-vos pretrain`` wrote (it may be resumed or refused, not clobbered)."""
    return any((folder / name).is_file() for name in (CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME))


SCALING_RULES = ("linear_wrt_256", "none")


@dataclass
class StudentConfig:
    """The backbone: a timm ViT name plus keyword overrides (patch_size, depth, img_size ...)."""

    arch: str = "vit_small_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.1  # student only


@dataclass
class HeadConfig:
    """The DINO projection head (MLP, L2 norm, weight-normalised prototypes)."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True
    use_bn: bool = False


@dataclass
class TeacherConfig:
    """Teacher EMA momentum (cosine to ``final_momentum``) and temperature (linear warm-up)."""

    momentum: float = 0.996
    final_momentum: float = 1.0
    temp: float = 0.04
    warmup_temp: float = 0.04
    warmup_temp_epochs: int = 0


@dataclass
class LossConfig:
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class CropsConfig:
    """Multi-crop: 2 global crops and ``local_number`` local crops."""

    global_size: int = 224
    local_size: int = 96
    local_number: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])


@dataclass
class OptimConfig:
    """AdamW with cosine schedules; ``base_lr`` is per 256 images (scaled by the global batch)."""

    epochs: int = 100
    batch_size_per_gpu: int = 64
    base_lr: float = 0.0005
    scaling_rule: str = "linear_wrt_256"
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1


@dataclass
class TrainConfig:
    """Run control: seeds, loader workers, precision, checkpoint/log frequency, stop limits."""

    seed: int = 0
    num_workers: int = 8
    num_threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "auto"
    precision: str = "auto"  # auto: fp32 on CPU; CUDA: fp16 (patch >= 16), else bf16 or fp32
    save_every: int = 0  # also checkpoint every N steps (0: only at the end of each epoch)
    saveckp_freq: int = 0  # also keep checkpoint_epochNNNN.pth every N epochs (0: never)
    log_every: int = 10
    max_steps: int | None = None  # stop (and checkpoint) after this many steps in total
    max_minutes: float | None = None  # stop (and checkpoint) after this wall time


@dataclass
class DataConfig:
    """Image folders (recursive), frame folders and video files (every ``video_stride`` frame)."""

    paths: list[str] = field(default_factory=list)
    video_stride: int = 1


@dataclass
class PretrainConfig:
    preset: str = "default"
    student: StudentConfig = field(default_factory=StudentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (builtins only), as saved in checkpoints and config.yaml."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        config = cls()
        apply_dict(config, values)
        return config

    def arch(self) -> dict[str, Any]:
        """The backbone architecture as recorded in checkpoints: {"model", "kwargs"}."""
        return {"model": self.student.arch, "kwargs": copy.deepcopy(self.student.kwargs)}

    def lr(self, world_size: int) -> float:
        """Peak learning rate for this global batch (``base_lr * global_batch / 256``)."""
        if self.optim.scaling_rule == "none":
            return self.optim.base_lr
        return self.optim.base_lr * self.optim.batch_size_per_gpu * world_size / 256.0

    def validate(self) -> None:
        """Raise :class:`InputError` on values that cannot train."""
        checks = [
            (self.optim.epochs >= 1, "optim.epochs must be >= 1"),
            (
                1 <= self.optim.batch_size_per_gpu <= MAX_IMAGE_BATCH,
                f"optim.batch_size_per_gpu must be in 1..{MAX_IMAGE_BATCH}",
            ),
            (
                max(self.crops.global_size, self.crops.local_size) <= MAX_IMAGE_SIZE,
                f"crops.global_size and crops.local_size must be <= {MAX_IMAGE_SIZE} px",
            ),
            (self.train.num_workers <= MAX_WORKERS, f"train.num_workers <= {MAX_WORKERS}"),
            (self.optim.base_lr > 0, "optim.base_lr must be > 0"),
            (self.crops.local_number >= 0, "crops.local_number must be >= 0"),
            (self.crops.global_size >= 8 and self.crops.local_size >= 8, "crop sizes >= 8 px"),
            (self.head.out_dim >= 2 and self.head.nlayers >= 1, "head.out_dim >= 2, nlayers >= 1"),
            (self.teacher.temp > 0 and self.teacher.warmup_temp > 0, "teacher temps must be > 0"),
            (0 <= self.teacher.momentum <= 1, "teacher.momentum must be in [0, 1]"),
            (self.loss.student_temp > 0, "loss.student_temp must be > 0"),
            (self.train.num_workers >= 0, "train.num_workers must be >= 0"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.data.video_stride >= 1, "data.video_stride must be >= 1"),
            (
                self.train.precision in TRAINING_PRECISIONS,
                f"train.precision is one of {TRAINING_PRECISIONS}",
            ),
            (self.optim.scaling_rule in SCALING_RULES, f"optim.scaling_rule: {SCALING_RULES}"),
        ]
        for scale in (self.crops.global_scale, self.crops.local_scale):
            checks.append((len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "crop scales (a, b)"))
        for ok, message in checks:
            if not ok:
                raise InputError(
                    f"invalid pretraining config: {message} (fix it with {param('assignments')})"
                )
        for key, value in _float_values(self):
            if not math.isfinite(value):
                raise InputError(
                    f"invalid pretraining config: {key} is {value}, not a finite number "
                    f"(fix it with {param('assignments')})"
                )


def _float_values(config: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float in a nested config dataclass, with its dotted key (lists included)."""
    found: list[tuple[str, float]] = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            found += _float_values(value, f"{key}.")
        elif isinstance(value, float):
            found.append((key, value))
        elif isinstance(value, (list, tuple)):
            found += [(key, v) for v in value if isinstance(v, float)]
    return found


def _vit_kwargs(patch: int, img_size: int, **extra: Any) -> dict[str, Any]:
    return {"patch_size": patch, "img_size": img_size, **extra}


#: Presets as overrides of the defaults. ``vit_*_p8`` follow the paper's longer recipe (300
#: epochs, teacher temperature 0.04 -> 0.07 over 30 epochs, 10 local crops); the learning rate
#: scales with the global batch. ``cpu_tiny`` follows docs/protocol.md#cpu-preset (learns on 2
#: cores).
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "vit_small_p8": {
        "student": {"arch": "vit_small_patch8_224", "kwargs": {}, "drop_path_rate": 0.1},
        "head": {"norm_last_layer": False},
        "teacher": {"temp": 0.07, "warmup_temp": 0.04, "warmup_temp_epochs": 30},
        "crops": {"local_number": 10},
        "optim": {"epochs": 300, "batch_size_per_gpu": 64},
        "train": {"num_workers": 10},
    },
    "vit_base_p8": {
        "student": {"arch": "vit_base_patch8_224", "kwargs": {}, "drop_path_rate": 0.1},
        "head": {"norm_last_layer": True},
        "teacher": {"temp": 0.07, "warmup_temp": 0.04, "warmup_temp_epochs": 30},
        "crops": {"local_number": 10},
        "optim": {"epochs": 300, "batch_size_per_gpu": 32},
        "train": {"num_workers": 10},
    },
    "cpu_tiny": {
        # ViT-Ti (192-d, 3 heads) with 8x8 patches and 6 blocks; pos_embed stored for 96 px.
        "student": {
            "arch": "vit_tiny_patch16_224",
            "kwargs": _vit_kwargs(8, 96, depth=6),
            "drop_path_rate": 0.1,
        },
        "head": {"out_dim": 1024, "norm_last_layer": True},
        "teacher": {
            "momentum": 0.99,
            "final_momentum": 1.0,
            "temp": 0.04,
            "warmup_temp": 0.04,
            "warmup_temp_epochs": 0,
        },
        "crops": {"global_size": 96, "local_size": 48, "local_number": 4},
        # Peak lr 2e-4 at batch 32 (docs/protocol.md#cpu-preset): base_lr is per 256 images.
        # 12 epochs of DAVIS-2016 train (2,079 frames) = 768 steps, about an hour at ~7 images/s.
        "optim": {
            "epochs": 12,
            "batch_size_per_gpu": 32,
            "base_lr": 0.0016,
            "warmup_epochs": 1,
            "min_lr": 1e-6,
        },
        "train": {"num_workers": 1, "log_every": 5, "save_every": 100},
    },
}


def _field_types(obj: Any) -> dict[str, Any]:
    return get_type_hints(type(obj))


_MISMATCH = object()  # a converter's "this value does not fit the annotation"


def _as_bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _MISMATCH


def _as_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _MISMATCH
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _MISMATCH


def _as_float(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return _MISMATCH


def _as_str(value: Any) -> Any:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    return _MISMATCH


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
}


def _as_list(value: Any, args: tuple[Any, ...], key: str) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return [_coerce(v, args[0], key) if args else v for v in value]
    return _MISMATCH


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a parsed value against a dataclass field annotation."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = get_origin(annotation), get_args(annotation)
    if annotation in _SCALARS:
        result = _SCALARS[annotation](value)
    elif origin is list:
        result = _as_list(value, args, key)
    elif origin is dict:
        result = copy.deepcopy(value) if isinstance(value, dict) else _MISMATCH
    else:
        return value
    if result is _MISMATCH:
        raise InputError(f"config key '{key}' expects {annotation}, got {value!r}")
    return result


def apply_dict(config: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Recursively set dataclass fields from a nested dict (unknown keys are errors)."""
    if not isinstance(values, dict):
        raise InputError(f"config section '{prefix or '<root>'}' must be a mapping")
    types = _field_types(config)
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types:
            valid = ", ".join(types)
            raise InputError(f"unknown config key '{key}': valid keys here are {valid}")
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            apply_dict(current, value, prefix=f"{key}.")
        else:
            setattr(config, name, _coerce(value, types[name], key))


def set_key(config: PretrainConfig, dotted: str, value: Any) -> None:
    """Set one dotted key (``optim.base_lr``; dict fields too: ``student.kwargs.depth``)."""
    parts = dotted.split(".")
    target: Any = config
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if isinstance(target, dict):
            if last:
                target[part] = value
            else:
                target = target.setdefault(part, {})
            continue
        types = _field_types(target)
        if part not in types:
            where = ".".join(parts[:index]) or "<root>"
            raise InputError(
                f"unknown config key '{dotted}': valid keys in {where} are {', '.join(types)}"
            )
        if last:
            setattr(target, part, _coerce(value, types[part], dotted))
        else:
            target = getattr(target, part)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"override '{text}' is not KEY=VALUE (for example optim.base_lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise InputError(f"cannot parse the value of override '{text}': {exc}") from exc
    # YAML 1.1 reads 1e-3 as a string; accept plain floats.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else value
    return key.strip(), value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file as a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"config file {path} must hold a mapping of sections")
    return values


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    assignments: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> PretrainConfig:
    """Build a config: ``base`` or defaults -> preset -> file -> ``overrides`` -> ``key=value``."""
    config = PretrainConfig.from_dict(base) if base is not None else PretrainConfig()
    if preset is not None:
        if preset not in PRETRAIN_PRESETS:
            raise InputError(f"unknown preset '{preset}': use one of {', '.join(PRETRAIN_PRESETS)}")
        apply_dict(config, PRETRAIN_PRESETS[preset])
        config.preset = preset
    if config_file is not None:
        apply_dict(config, load_config_file(config_file))
    for key, value in (overrides or {}).items():
        if value is not None:
            set_key(config, key, value)
    for text in assignments:
        set_key(config, *parse_assignment(text))
    config.validate()
    return config


def save_config(config: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (or JSON by suffix), atomically."""
    path = Path(path)
    values = config.to_dict()
    if path.suffix == ".json":
        text = json.dumps(values, indent=2)
    else:
        text = yaml.safe_dump(values, sort_keys=False)
    atomic_write_text(path, text)
