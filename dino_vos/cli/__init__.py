"""The ``dino-vos`` command line: a thin layer over the Python API that nothing else imports.

Subcommands are resolved by dotted path only when they are invoked (or listed), and their
modules import nothing heavier than click: torch, timm and OpenCV load inside a command, after
its inputs were checked, so ``--help`` and typos answer at once.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import click

from dino_vos import __version__
from dino_vos.errors import DinoVosError, naming


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by SLURM, docker, systemd): handled like Ctrl-C, exit code 143."""


def _exit_code(exc: BaseException) -> int:
    return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 128 + signal.SIGINT


def _say_interrupted(exc: BaseException) -> None:
    what = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
    click.echo(f"{what}: partial outputs were discarded.", err=True)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


class LazyGroup(click.Group):
    """A click group whose subcommands are ``"module:attribute"`` paths imported on demand."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        path = self.lazy_subcommands.get(cmd_name)
        if path is None:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = path.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{path} is not a click command")
        return command


def one_line_usage_error(exc: click.UsageError) -> click.ClickException:
    """click's three lines (``Usage:``, ``Try ... --help``, ``Error: ...``) as one ``Error:``
    line naming the option and what it accepts, with the help command for other mistakes."""
    message = " ".join(exc.format_message().split())
    hint = isinstance(exc, click.MissingParameter) or not isinstance(exc, click.BadParameter)
    if hint and exc.ctx is not None:
        message = f"{message.rstrip('.')} (see '{exc.ctx.command_path} --help')"
    return _OneLineUsageError(message)


class _OneLineUsageError(click.ClickException):
    """A usage error shown as one ``Error:`` line, with click's usage-error exit code."""

    exit_code = click.UsageError.exit_code


#: API parameters (dino_vos.errors.param) whose option is not ``--`` and the name with dashes;
#: ``name=value`` keys are switches that stand for that value.
FLAGS = {
    "name": "--backbone",
    "out_dir": "--out",
    "cache_dir": "--cache",
    "results_dir": "--results",
    "assignments": "--set",  # pretraining config: a dotted key without its own option
    "data.paths": "--data",
    "optim.base_lr": "--lr",
    "optim.batch_size_per_gpu": "--batch-size",
    "train.precision": "--precision",
    "pretrained=False": "--random-init",
}


def flag_name(name: str, value: str | None) -> str:
    """How a message names API parameter ``name`` (and ``value``) on the command line:
    ``short_side=60`` -> ``--short-side 60``, ``allow_partial=True`` -> ``--allow-partial``,
    a pretraining config key ``crops.local_number=6`` -> ``--set crops.local_number=6``."""
    switch = FLAGS.get(f"{name}={value}")
    if switch is not None:
        return switch
    flag = FLAGS.get(name)
    if flag is None and "." in name:  # a pretraining config key without an option of its own
        return f"--set {name}" + ("" if value is None else f"={value}")
    flag = flag or "--" + name.replace("_", "-")
    return flag if value is None or value == "True" else f"{flag} {value}"


class DinoVosGroup(LazyGroup):
    """The root group: :class:`DinoVosError` becomes one line on stderr and exit code 2, and
    so does every usage error of click (a bad value, a missing or unknown option). Messages
    name the API parameters they are about; while a command runs they read as its options
    (:func:`flag_name`)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise one_line_usage_error(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        with naming(flag_name):  # every message of the command names options, not parameters
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise one_line_usage_error(exc) from None
        except DinoVosError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:  # a full disk, a folder that became unwritable ...
            where = f" ({exc.filename})" if exc.filename else ""
            reason = exc.strerror or str(exc) or type(exc).__name__
            click.echo(f"Error: cannot read or write a file{where}: {reason}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            _say_interrupted(exc)
            ctx.exit(_exit_code(exc))
        finally:
            _stop_decoding_threads()


def _stop_decoding_threads() -> None:
    """End the frame decoding threads a failed run may have left (only if torch code ran): a
    thread still inside OpenCV or torch when the process exits aborts it."""
    features = sys.modules.get("dino_vos.features")
    if features is not None:
        features.stop_decoding_threads()


@click.group(
    cls=DinoVosGroup,
    lazy_subcommands={
        "propagate": "dino_vos.cli.propagate:propagate",
        "propagate-batch": "dino_vos.cli.batch:propagate_batch",
        "demo": "dino_vos.cli.propagate:demo",
        "attention": "dino_vos.cli.export:attention",
        "features": "dino_vos.cli.export:features",
        "eval": "dino_vos.cli.eval:eval_group",
        "pretrain": "dino_vos.cli.pretrain:pretrain",
        "report": "dino_vos.cli.report:report",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="dino-vos")
def main() -> None:
    """Video object segmentation with self-supervised DINO Vision Transformers."""


def run() -> None:
    """The ``dino-vos`` console script: SIGTERM is handled like Ctrl-C (staged outputs removed,
    one line, exit 143), and an interrupt outside a command (while parsing) is one line too."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(prog_name="dino-vos")
    except KeyboardInterrupt as exc:
        _say_interrupted(exc)
        sys.exit(_exit_code(exc))
