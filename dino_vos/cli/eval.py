"""``dino-vos eval``: DAVIS J&F of propagation, and image baselines of backbones."""

from __future__ import annotations

import click

from dino_vos.cli import LazyGroup


@click.group(
    name="eval",
    cls=LazyGroup,
    lazy_subcommands={
        "davis": "dino_vos.cli.davis:davis",
        "youtube-vos": "dino_vos.cli.youtube_vos:youtube_vos",
        "knn": "dino_vos.cli.baselines:knn",
        "linear": "dino_vos.cli.baselines:linear",
        "transfer": "dino_vos.cli.baselines:transfer",
    },
)
def eval_group() -> None:
    """Benchmarks: DAVIS J&F of propagation, and image baselines of backbones."""
