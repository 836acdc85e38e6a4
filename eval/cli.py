"""``dino-vos eval``: benchmark commands (subcommands register themselves here)."""

from __future__ import annotations

import click


@click.group(name="eval")
def eval_group() -> None:
    """Benchmarks: DAVIS J&F of propagation, and image baselines of backbones."""
