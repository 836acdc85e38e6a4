"""``dino-vos eval``: benchmark commands (subcommands register themselves here)."""

from __future__ import annotations

import click


@click.group(name="eval")
def eval_group() -> None:
    """Benchmarks: DAVIS J&F of propagation, and image baselines of backbones."""


from eval.baselines_cli import knn, linear, transfer  # noqa: E402

eval_group.add_command(knn)
eval_group.add_command(linear)
eval_group.add_command(transfer)


from eval.davis_cli import davis_command  # noqa: E402

eval_group.add_command(davis_command)
