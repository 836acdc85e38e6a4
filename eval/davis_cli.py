"""``dino-vos eval davis``: J&F of label propagation on a DAVIS split (or of existing results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dino_vos.cli import backbone_options, propagation_options, resize_options


@click.command("davis")
@click.option(
    "--davis-root",
    required=True,
    type=click.Path(path_type=Path),
    help="DAVIS folder holding JPEGImages/, Annotations/ and ImageSets/.",
)
@click.option("--split", default="val", show_default=True, help="ImageSets/<year>/<split>.txt.")
@click.option(
    "--year", default=None, help="ImageSets year folder [default: latest with the split]."
)
@click.option(
    "--resolution", default="480p", show_default=True, help="Sub-folder of JPEGImages/Annotations."
)
@click.option("--sequences", default=None, help="Comma-separated sequences (overrides the split).")
@click.option(
    "--results",
    "results_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Only score existing masks RESULTS/<seq>/<frame>.png (no propagation).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder: masks per sequence, CSVs, JSON, plot [--results: default RESULTS].",
)
@propagation_options
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Feature cache folder: later runs with other propagation parameters skip the backbone.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Sequences run in parallel processes.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of --random-init weights (every worker and rank builds the same model).",
)
@click.option(
    "--max-frames",
    type=click.IntRange(min=3),
    default=None,
    help="Only the first N frames of every sequence (quick checks; not comparable numbers).",
)
@click.option(
    "--ignore-void",
    is_flag=True,
    help="Exclude ground-truth 255 pixels from J and F (the official tool counts them as "
    "background).",
)
@backbone_options
@resize_options
def davis_command(**options: Any) -> None:
    """J&F of label propagation on a DAVIS split, scored like the official DAVIS 2017 tool.

    Propagates every sequence into OUT/<seq>/ (complete sequences are reused, so an interrupted
    run resumes), then writes global_results-<split>.csv, per-sequence_results-<split>.csv,
    davis_results-<split>.json and a per-object bar chart. Under torchrun every rank takes a
    share of the sequences and rank 0 writes the results.
    """
    from eval.davis_main import run_davis_command

    run_davis_command(**options)
