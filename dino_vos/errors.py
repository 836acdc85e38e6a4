"""User-facing errors: one clear line naming the problem and the fix."""

from __future__ import annotations


class DinoVosError(Exception):
    """A problem with the user's input or environment (the CLI prints it and exits with 2)."""


class InputError(DinoVosError):
    """A file, folder or argument given by the user is missing, unreadable or inconsistent."""


class BackboneError(DinoVosError):
    """A backbone name, weights file or checkpoint cannot be used."""


class PartialWeightsWarning(UserWarning):
    """Weights loaded with ``allow_partial``: some keys were ignored or left random."""


class ArchitectureGuessWarning(UserWarning):
    """An inferred architecture took a value the weights do not store (the head count)."""
