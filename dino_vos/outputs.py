"""Output paths that never clobber the user's data.

The rules every command applies before it loads a model (this module imports no torch):

- an output never is, nor lies inside, nor contains an input (frames, video, mask, annotations,
  data folders), paths compared after resolving symlinks;
- an existing non-empty output folder must be a previous dino-vos result (its ``dino-vos.json``
  manifest lists the files dino-vos wrote); any other non-empty folder is refused unless
  ``--overwrite`` is given, and even then files that dino-vos did not write are never replaced;
- output locations must be writable, checked up front (not after every frame was computed).

:class:`dino_vos.writers.OutputSink` applies the same rules when it commits a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dino_vos.errors import InputError

MANIFEST_NAME = "dino-vos.json"
STAGING_NAME = ".dino-vos-partial"
BACKUP_NAME = ".dino-vos-previous"
#: The list of files a commit is moving in, kept in the backup until the commit is done.
JOURNAL_NAME = ".new-files.json"
#: Names dino-vos keeps in an output folder besides the files its manifest lists.
OWN_NAMES = frozenset({MANIFEST_NAME, STAGING_NAME, BACKUP_NAME})
OVERLAY_SUFFIXES = (".mp4", ".avi", ".mov")


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with every symlink followed (it need not exist)."""
    return Path(path).expanduser().resolve()


def is_within(path: Path, folder: Path) -> bool:
    """True when resolved ``path`` is ``folder`` or lies below it."""
    return path == folder or folder in path.parents


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a dino-vos result folder ({} when there is none or it is unreadable)."""
    try:
        content = json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def is_result_folder(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds the manifest of a finished dino-vos run."""
    return (Path(out_dir) / MANIFEST_NAME).is_file()


def is_reusable_result(out_dir: str | Path, expected: dict[str, Any], names: Iterable[str]) -> bool:
    """A finished result whose manifest holds the ``expected`` entries and that has a
    ``<name>.png`` for every name: a benchmark run may reuse it instead of propagating again."""
    out = Path(out_dir)
    if not is_result_folder(out):
        return False
    manifest = read_manifest(out)
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    return all((out / f"{name}.png").is_file() for name in names)


def listed_outputs(manifest: dict[str, Any]) -> set[str]:
    """Relative paths of the files a manifest says dino-vos wrote."""
    return {str(name) for name in manifest.get("outputs", [])}


def foreign_entries(out_dir: Path) -> list[str]:
    """Names in ``out_dir`` that are not dino-vos bookkeeping (its manifest, staging, backup)."""
    if not out_dir.is_dir():
        return []
    return sorted(entry.name for entry in out_dir.iterdir() if entry.name not in OWN_NAMES)


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output location whose nearest existing folder cannot be written."""
    target = Path(path).expanduser()
    folder = target if target.is_dir() else target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dino-vos-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"cannot write {flag} {path}: {folder} is not writable ({reason}); choose a "
            "writable location"
        ) from exc


def check_not_an_input(path: str | Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Refuse an output that is, lies inside, or contains one of ``inputs`` (those that exist:
    frames held in memory have a made-up path)."""
    target = resolved(path)
    for given in inputs:
        if not Path(given).exists():
            continue
        source = resolved(given)
        if target == source:
            raise InputError(f"{flag} {path} is the input {given}: outputs never overwrite inputs")
        if source.is_dir() and is_within(target, source):
            raise InputError(
                f"{flag} {path} is inside the input folder {given}: choose a folder outside it"
            )
        if is_within(source, target):
            raise InputError(
                f"{flag} {path} contains the input {given}: choose a folder that holds no input"
            )


def check_out_dir(
    out_dir: str | Path,
    inputs: Sequence[str | Path] = (),
    overwrite: bool = False,
    flag: str = "--out",
    is_previous_result: Callable[[Path], bool] = is_result_folder,
) -> None:
    """All the output-folder rules of this module, for one command's ``--out``.

    ``is_previous_result(folder)`` recognises the command's own earlier output (default: a
    folder with a dino-vos manifest), which may be replaced without ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {out_dir} is a file: give a folder")
    check_not_an_input(out, inputs, flag)
    foreign = foreign_entries(out)
    if foreign and not is_previous_result(out) and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(
            f"{flag} {out_dir} is not empty and is not a dino-vos result (it holds {shown}): "
            "choose an empty folder, or pass --overwrite to write beside those files (they are "
            "never replaced)"
        )
    check_writable(out, flag)


def check_out_file(
    path: str | Path, inputs: Sequence[str | Path] = (), flag: str = "--overlay"
) -> None:
    """The rules for a single output file (overlay video, plot): not an input, writable."""
    check_not_an_input(path, inputs, flag)
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a folder: give a file name")
    check_writable(path, flag)


def check_outputs(
    out_dir: str | Path,
    overlay: str | Path | None,
    inputs: Sequence[str | Path],
    overwrite: bool = False,
) -> None:
    """The output rules (:mod:`dino_vos.outputs`) for a folder and an optional overlay video."""
    check_out_dir(out_dir, inputs, overwrite)
    if overlay is not None:
        if Path(overlay).suffix.lower() not in OVERLAY_SUFFIXES:
            raise InputError(f"overlay {overlay} must end in {', '.join(OVERLAY_SUFFIXES)}")
        check_out_file(overlay, inputs, "--overlay")


def remove_stale_staging(out_dir: Path, announce: Any = None) -> None:
    """Clean what an interrupted run (even one killed with SIGKILL) left in ``out_dir``.

    A commit interrupted before its manifest was written is undone: the new files it had moved
    in (listed in its journal) leave and the previous result's files come back from the backup.
    ``announce(text)`` is told what was cleaned.
    """
    backup = out_dir / BACKUP_NAME
    if backup.is_dir():
        try:
            new_files = json.loads((backup / JOURNAL_NAME).read_text())
        except (OSError, ValueError):
            new_files = []
        if not is_result_folder(out_dir):  # the commit stopped before its manifest
            for name in new_files:
                with contextlib.suppress(OSError):
                    (out_dir / name).unlink()
            for source in sorted(backup.rglob("*")):
                if source.is_file() and source.name != JOURNAL_NAME:
                    target = out_dir / source.relative_to(backup)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
            if announce is not None:
                announce(f"Restored the previous result in {out_dir} (a commit was interrupted)")
        shutil.rmtree(backup, ignore_errors=True)
    staging = out_dir / STAGING_NAME
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        if announce is not None:
            announce(f"Removed {staging} left by an interrupted run")
