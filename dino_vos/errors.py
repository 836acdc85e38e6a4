"""User-facing errors: one clear line naming the problem and the fix.

A message names the parameter it is about with :func:`param`, never a command-line flag: the
library shows it as the Python API spells it (``short_side=60``, ``weights=``), and the CLI, inside
:func:`naming`, as its flag (``--short-side 60``). The text is rendered when it is shown, so an
error raised in a worker thread or process reads right wherever it is printed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: Marks a parameter in a message: MARK name [VALUE_SEP value] MARK (control characters, which
#: no message text contains).
_MARK, _VALUE_SEP = "\x1f", "\x1e"
_PARAM = re.compile(f"{_MARK}([^{_MARK}{_VALUE_SEP}]+)(?:{_VALUE_SEP}([^{_MARK}]*))?{_MARK}")

#: How a parameter (name, value or None) is spelled: the API's way unless the CLI set its own.
ParamNamer = Callable[[str, "str | None"], str]


def api_name(name: str, value: str | None) -> str:
    """``name=`` or ``name=value``: the keyword argument of the Python API."""
    return f"{name}={'' if value is None else value}"


_namer: ContextVar[ParamNamer] = ContextVar("dino_vos_param_namer", default=api_name)


def param(name: str, value: object = None) -> str:
    """The API parameter ``name`` (optionally with ``value``) inside a message."""
    return f"{_MARK}{name}{'' if value is None else _VALUE_SEP + str(value)}{_MARK}"


def render(text: str) -> str:
    """``text`` with its parameters spelled for whoever shows it (the API or the CLI)."""
    namer = _namer.get()
    return _PARAM.sub(lambda found: namer(found[1], found[2]), text)


@contextmanager
def naming(namer: ParamNamer) -> Iterator[None]:
    """Spell the parameters of messages rendered inside this block with ``namer``."""
    token = _namer.set(namer)
    try:
        yield
    finally:
        _namer.reset(token)


class _Rendered(Exception):
    """An exception or warning whose text names parameters with :func:`param`."""

    def __str__(self) -> str:
        return render(super().__str__())


class DinoVosError(_Rendered):
    """A problem with the user's input or environment (the CLI prints it and exits with 2)."""


class InputError(DinoVosError):
    """A file, folder or argument given by the user is missing, unreadable or inconsistent."""


class BackboneError(DinoVosError):
    """A backbone name, weights file or checkpoint cannot be used."""


class PartialWeightsWarning(_Rendered, UserWarning):
    """Weights loaded with ``allow_partial``: some keys were ignored or left random."""


class ArchitectureGuessWarning(_Rendered, UserWarning):
    """An inferred architecture took a value the weights do not store (the head count)."""
