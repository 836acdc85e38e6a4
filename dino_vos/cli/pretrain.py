"""``dino-vos pretrain``: DINO pretraining runs, and ``dino-vos pretrain plot`` for their curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dino_vos.cli.options import FiniteFloat, IntRange, overwrite_option
from dino_vos.console import console
from dino_vos.errors import InputError
from dino_vos.limits import MAX_IMAGE_BATCH, MAX_WORKERS
from dino_vos.outputs import check_out_dir, locked_output_on_main_rank
from dino_vos.pretrain.config import (
    PRETRAIN_PRESETS,
    TRAINING_PRECISIONS,
    is_run_folder,
    resolve_config,
)

#: CLI flag -> config key.
FLAG_KEYS = {
    "epochs": "optim.epochs",
    "batch_size": "optim.batch_size_per_gpu",
    "lr": "optim.base_lr",
    "num_workers": "train.num_workers",
    "threads": "train.num_threads",
    "device": "train.device",
    "precision": "train.precision",
    "save_every": "train.save_every",
    "seed": "train.seed",
    "max_minutes": "train.max_minutes",
    "max_steps": "train.max_steps",
}


@click.group(
    name="pretrain",
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRETRAIN_PRESETS)),
    default=None,
    help="Recipe to start from.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML/JSON file of config sections (applied over the preset).",
)
@click.option(
    "--data",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image folder (recursive), frame folders or video files; repeatable.",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Run folder.")
@click.option("--epochs", type=IntRange(min=1), default=None)
@click.option(
    "--batch-size", type=IntRange(min=1, max=MAX_IMAGE_BATCH), default=None, help="Per process."
)
@click.option(
    "--lr",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Base learning rate per 256 images (scaled by the global batch).",
)
@click.option(
    "--num-workers", type=IntRange(min=0, max=MAX_WORKERS), default=None, help="Loader workers."
)
@click.option(
    "--threads", type=IntRange(min=1, max=MAX_WORKERS), default=None, help="torch intra-op threads."
)
@click.option("--device", default=None, help="auto, cpu, cuda[:N] [default: auto].")
@click.option(
    "--precision",
    type=click.Choice(TRAINING_PRECISIONS),
    default=None,
    help="auto: fp32 on CPU; on CUDA fp16 for patch >= 16, bf16 (else fp32) below [default: auto].",
)
@click.option("--save-every", type=IntRange(min=0), default=None, help="Checkpoint every N steps.")
@click.option("--seed", type=int, default=None)
@click.option(
    "--max-minutes",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Stop (with a checkpoint) after this wall time.",
)
@click.option(
    "--max-steps", type=IntRange(min=1), default=None, help="Stop after N steps in total."
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config key, e.g. --set optim.base_lr=1e-3 --set crops.local_number=6.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@overwrite_option
@click.pass_context
def pretrain(
    ctx: click.Context,
    preset: str | None,
    config_file: Path | None,
    data: tuple[Path, ...],
    out_dir: Path | None,
    assignments: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    **flags: Any,
) -> None:
    """DINO self-distillation pretraining of a ViT (single process, torchrun or srun).

    \b
    dino-vos pretrain --preset cpu_tiny --data DIR --out RUN_DIR [--epochs N] [--resume]
    torchrun --nproc_per_node 8 -m dino_vos pretrain --preset vit_small_p8 --data DIR --out RUN
    dino-vos pretrain plot RUN_DIR/log.jsonl --out curves.png
    """
    if ctx.invoked_subcommand is not None:
        return
    if out_dir is None:
        raise click.UsageError("--out RUN_DIR is required (try --help)")
    overrides: dict[str, Any] = {FLAG_KEYS[name]: value for name, value in flags.items()}
    if data:
        overrides["data.paths"] = [str(p) for p in data]
    saved = None
    if resume:
        from dino_vos.pretrain.train import saved_config

        saved = saved_config(out_dir)
    if saved is not None:
        if preset is not None or config_file is not None:
            console.print("Resuming: the run's saved config is used (--preset/--config ignored)")
        config = resolve_config(base=saved, overrides=overrides, assignments=assignments)
    else:
        if preset is None and config_file is None:
            raise InputError(
                "choose a recipe: --preset cpu_tiny|vit_small_p8|vit_base_p8 or --config"
            )
        config = resolve_config(preset, config_file, overrides, assignments)
    if not config.data.paths:
        raise InputError("no training data: pass --data DIR")
    for path in map(Path, config.data.paths):
        if not path.exists():
            raise InputError(f"data path not found: {path}")
    check_out_dir(out_dir, config.data.paths, overwrite, is_previous_result=is_run_folder)
    from dino_vos.pretrain.train import train  # torch: after the checks

    with locked_output_on_main_rank(out_dir, inputs=config.data.paths):  # one run per folder
        train(config, out_dir, resume=resume)


@pretrain.command(name="plot")
@click.argument("log", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("curves.png"),
    show_default=True,
    help="Image to write (png, pdf, svg).",
)
def plot_command(log: Path, out_path: Path) -> None:
    """Plot loss, teacher entropy, KL, schedules and images/s from a run's LOG (log.jsonl)."""
    from dino_vos.pretrain.plot import plot_log

    if log.is_dir():
        log = log / "log.jsonl"
    console.print(f"Wrote {plot_log(log, out_path)}")
