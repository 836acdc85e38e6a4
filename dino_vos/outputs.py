"""Output paths that never clobber the user's data.

The rules every command applies before it loads a model (this module imports no torch):

- an output never is, nor lies inside, nor contains an input (frames, video, mask, annotations,
  data folders), paths compared after resolving symlinks;
- an existing non-empty output folder must be a previous dino-vos result (its ``dino-vos.json``
  manifest lists the files dino-vos wrote); any other non-empty folder is refused unless
  ``overwrite`` is given, and even then files that dino-vos did not write are never replaced;
- output locations must be writable, checked up front (not after every frame was computed);
- one run at a time per output folder: a run holds an exclusive lock on it (:func:`locked_output`,
  an ``fcntl.flock`` on ``OUT/.dino-vos-lock`` that dies with the process); a second run is
  refused with the PID of the first, and a folder another live run is staging is never cleaned;
- a manifest is untrusted input: only entries that stay inside OUT (relative, no ``..``, no
  symlink on the way or at the end) are ever replaced or removed (:func:`trusted_outputs`), and
  a manifest that cannot be read is reported at the start (:func:`check_manifest`);
- an existing ``overlay`` file is replaced only when it is the overlay the folder's manifest
  records, or with ``overwrite``.

:class:`dino_vos.writers.OutputSink` applies the same rules when it commits a result. The full
list, with what each kind of interruption leaves, is docs/safety.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dino_vos.atomic import deferred_interrupts, lock_file, lock_holder_pid, unlock_file
from dino_vos.errors import InputError, param

MANIFEST_NAME = "dino-vos.json"
STAGING_NAME = ".dino-vos-partial"
BACKUP_NAME = ".dino-vos-previous"
#: The list of files a commit is moving in, kept in the backup until the commit is done.
JOURNAL_NAME = ".new-files.json"
#: The lock file of a folder a run is writing (:func:`locked_output`).
LOCK_NAME = ".dino-vos-lock"
#: Names dino-vos keeps in an output folder besides the files its manifest lists.
OWN_NAMES = frozenset({MANIFEST_NAME, STAGING_NAME, BACKUP_NAME, LOCK_NAME})
OVERLAY_SUFFIXES = (".mp4", ".avi", ".mov")


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with every symlink followed (it need not exist)."""
    return Path(path).expanduser().resolve()


def is_within(path: Path, folder: Path) -> bool:
    """True when resolved ``path`` is ``folder`` or lies below it."""
    return path == folder or folder in path.parents


# --- one run per folder ------------------------------------------------------------------


@dataclass
class _HeldLock:
    fd: int
    pid: int
    created: list[Path] = field(default_factory=list)  # folders the lock created, outer first
    count: int = 1


#: Output folders this process has locked (resolved path -> lock): taking a lock again is free.
_HELD: dict[Path, _HeldLock] = {}


def _held(folder: Path) -> _HeldLock | None:
    held = _HELD.get(folder)
    return held if held is not None and held.pid == os.getpid() else None


def busy_message(folder: str | Path, pid: int | None, name: str = "out_dir") -> str:
    who = f"PID {pid}" if pid and pid > 0 else "PID unknown"
    return (
        f"{param(name, folder)} is in use by another dino-vos run ({who}): wait for it to "
        "finish, or choose another folder"
    )


def lock_holder(folder: str | Path) -> int | None:
    """The PID of another live process holding the lock of ``folder`` (-1 when it holds it but
    its PID cannot be read); None when the folder is free or this process holds it."""
    if _held(resolved(folder)) is not None:
        return None
    return lock_holder_pid(Path(folder) / LOCK_NAME)


def check_not_locked(folder: str | Path, name: str = "out_dir") -> None:
    """Refuse ``folder`` while another live run holds its lock (a check that writes nothing;
    the run itself takes the lock with :func:`locked_output`)."""
    pid = lock_holder(folder)
    if pid is not None:
        raise InputError(busy_message(folder, pid, name))


def acquire_output_lock(
    folder: str | Path, name: str = "out_dir", inputs: Iterable[str | Path] = ()
) -> None:
    """Lock ``folder`` (created if missing) for this process until :func:`release_output_lock`
    (or the process's end, however it ends). Taking a lock this process holds nests. A folder
    that is or holds one of ``inputs`` is refused first: no lock file is ever put there."""
    check_not_an_input(folder, inputs, name)
    key = resolved(folder)
    held = _held(key)
    if held is not None:
        held.count += 1
        return
    if key.exists() and not key.is_dir():
        raise InputError(f"{param(name, folder)} is a file: give a folder")
    created = [parent for parent in (key, *key.parents) if not parent.exists()][::-1]
    for _ in range(10):  # a releasing run may remove the folder it created in between
        try:
            key.mkdir(parents=True, exist_ok=True)
            fd = lock_file(key / LOCK_NAME)
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise InputError(f"cannot write {param(name, folder)}: {reason}") from exc
        if fd is None:
            pid = lock_holder_pid(key / LOCK_NAME)
            _remove_empty(created)
            raise InputError(busy_message(folder, pid, name))
        _HELD[key] = _HeldLock(fd, os.getpid(), created)
        return
    raise InputError(f"cannot lock {param(name, folder)}: it keeps disappearing")


def release_output_lock(folder: str | Path) -> None:
    """Release one :func:`acquire_output_lock` of ``folder``; the last one removes the lock
    file and the folders the lock created, if they stayed empty."""
    key = resolved(folder)
    held = _held(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    with deferred_interrupts():
        del _HELD[key]
        unlock_file(key / LOCK_NAME, held.fd)
        _remove_empty(held.created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def locked_output(
    folder: str | Path, name: str = "out_dir", inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Hold the exclusive lock of output folder ``folder`` for the block (yields ``folder``).

    Every command that writes into a folder holds it for its whole run: a second run is refused
    with one line naming the PID of the first (:class:`InputError`). The lock is an
    ``fcntl.flock`` on ``folder/.dino-vos-lock``: it dies with the process (SIGKILL leaves no
    stale lock; the file left behind is ignored and reused). Nested use in one process is free.
    Folders the lock created are removed again at the end if nothing was written into them.
    ``inputs``: refuse a folder that is, lies in or holds one of them before locking it.
    """
    acquire_output_lock(folder, name, inputs)
    try:
        yield Path(folder)
    finally:
        release_output_lock(folder)


def locked_output_on_main_rank(
    folder: str | Path, name: str = "out_dir", inputs: Iterable[str | Path] = ()
) -> contextlib.AbstractContextManager:
    """:func:`locked_output` on the main process of a launch (``RANK`` 0 or unset); elsewhere a
    no-op: the other ranks of one run write into the folder that rank 0 holds for them."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext(Path(folder))
    return locked_output(folder, name, inputs)


# --- manifests ------------------------------------------------------------------------------


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest of a dino-vos result folder ({} when there is none or it is unreadable)."""
    try:
        content = json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def check_manifest(out_dir: str | Path, name: str = "out_dir") -> None:
    """Refuse a folder whose ``dino-vos.json`` exists but cannot be read as a manifest (a JSON
    object whose ``outputs``, if any, is a list): reported before any work starts."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return
    problem = ""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    else:
        if not isinstance(content, dict):
            problem = "not a JSON object"
        elif not isinstance(content.get("outputs", []), list):
            problem = "its 'outputs' is not a list"
    if problem:
        raise InputError(
            f"{path} is corrupt ({problem}): dino-vos cannot tell which files in "
            f"{param(name, out_dir)} it wrote; delete or repair {path.name}, or choose another "
            "folder"
        )


def entry_problem(out_dir: Path, name: object) -> str | None:
    """Why manifest entry ``name`` must not be touched (None: a plain path inside ``out_dir``).

    Accepted: a relative path without ``..`` or empty parts, none of whose folders is a symlink
    (nor a file), that is not itself a symlink, and that resolves inside ``out_dir``.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return "not a relative path"
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("~"):
        return "an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "goes up with .."
    if any(part in (".", "") for part in parts):
        return "has an empty or '.' part"
    if pure.parts[0] in OWN_NAMES:
        return "a dino-vos bookkeeping name"
    current = out_dir
    for index, part in enumerate(pure.parts):
        current = current / part
        if current.is_symlink():
            return "goes through a symlink" if index < len(pure.parts) - 1 else "a symlink"
        if index < len(pure.parts) - 1 and current.exists() and not current.is_dir():
            return "goes through a file"
    if not is_within(resolved(out_dir / name), resolved(out_dir)):
        return "outside the folder"
    return None


def trusted_outputs(
    out_dir: str | Path, manifest: dict[str, Any], warn: Callable[[str], None] | None = None
) -> set[str]:
    """The entries of ``manifest["outputs"]`` that dino-vos may replace or remove: plain paths
    inside ``out_dir`` (:func:`entry_problem`). The rest is ignored, never moved nor deleted,
    and ``warn`` gets one line naming it."""
    out = Path(out_dir)
    trusted: set[str] = set()
    rejected: list[str] = []
    names = manifest.get("outputs", [])
    for name in names if isinstance(names, list) else []:
        problem = entry_problem(out, name)
        if problem is None:
            trusted.add(name)
        else:
            rejected.append(f"{name} ({problem})")
    if rejected and warn is not None:
        shown = ", ".join(rejected[:3]) + (
            f" and {len(rejected) - 3} more" if len(rejected) > 3 else ""
        )
        warn(
            f"Ignoring {len(rejected)} entr{'y' if len(rejected) == 1 else 'ies'} of "
            f"{out / MANIFEST_NAME} that would leave the folder: {shown}; they are never moved "
            "or deleted"
        )
    return trusted


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
    """Relative paths of the files a manifest says dino-vos wrote, without those that could
    not lie inside the folder (absolute, ``..``); :func:`trusted_outputs` checks symlinks too
    and is what anything that moves or deletes files uses."""
    names = manifest.get("outputs", [])
    if not isinstance(names, list):
        return set()
    return {
        name
        for name in names
        if isinstance(name, str)
        and name
        and not PurePosixPath(name).is_absolute()
        and ".." not in name.split("/")
    }


def note(text: str) -> None:
    """One plain line on the console (never wrapped): what a run cleaned up."""
    from rich.markup import escape

    from dino_vos.console import console

    console.print(escape(text), soft_wrap=True)


def warn(text: str) -> None:
    """One yellow warning line on the console (never wrapped)."""
    from rich.markup import escape

    from dino_vos.console import console

    console.print(f"[yellow]Warning:[/yellow] {escape(text)}", soft_wrap=True)


def has_interrupted_commit(out_dir: str | Path) -> bool:
    """True when a commit of :class:`dino_vos.writers.OutputSink` was interrupted in
    ``out_dir`` (its journal is there): the folder is dino-vos's own, the next run undoes it."""
    return (Path(out_dir) / BACKUP_NAME / JOURNAL_NAME).is_file()


def foreign_entries(out_dir: Path) -> list[str]:
    """Names in ``out_dir`` that are not dino-vos bookkeeping (its manifest, staging, backup)."""
    if not out_dir.is_dir():
        return []
    return sorted(entry.name for entry in out_dir.iterdir() if entry.name not in OWN_NAMES)


def check_writable(path: str | Path, name: str = "out_dir") -> None:
    """Refuse an output location whose nearest existing folder cannot be written."""
    target = Path(path).expanduser()
    folder = target if target.is_dir() else target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{param(name, path)}: {folder} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dino-vos-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"cannot write {param(name, path)}: {folder} is not writable ({reason}); choose a "
            "writable location"
        ) from exc


def check_not_an_input(path: str | Path, inputs: Iterable[str | Path], name: str) -> None:
    """Refuse an output that is, lies inside, or contains one of ``inputs`` (those that exist:
    frames held in memory have a made-up path)."""
    target = resolved(path)
    for given in inputs:
        if not Path(given).exists():
            continue
        source = resolved(given)
        if target == source:
            raise InputError(
                f"{param(name, path)} is the input {given}: outputs never overwrite inputs"
            )
        if source.is_dir() and is_within(target, source):
            raise InputError(
                f"{param(name, path)} is inside the input folder {given}: choose a folder "
                "outside it"
            )
        if is_within(source, target):
            raise InputError(
                f"{param(name, path)} contains the input {given}: choose a folder that holds "
                "no input"
            )


def check_out_dir(
    out_dir: str | Path,
    inputs: Sequence[str | Path] = (),
    overwrite: bool = False,
    name: str = "out_dir",
    is_previous_result: Callable[[Path], bool] = is_result_folder,
) -> None:
    """All the output-folder rules of this module, for one command's output folder.

    ``is_previous_result(folder)`` recognises the command's own earlier output (default: a
    folder with a dino-vos manifest), which may be replaced without ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{param(name, out_dir)} is a file: give a folder")
    check_not_an_input(out, inputs, name)
    check_not_locked(out, name)
    check_manifest(out, name)
    foreign = foreign_entries(out)
    ours = is_previous_result(out) or has_interrupted_commit(out)
    if foreign and not ours and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(
            f"{param(name, out_dir)} is not empty and is not a dino-vos result (it holds {shown}): "
            f"choose an empty folder, or pass {param('overwrite', True)} to write beside those "
            "files (they are never replaced)"
        )
    check_writable(out, name)


def check_out_file(
    path: str | Path, inputs: Sequence[str | Path] = (), name: str = "overlay"
) -> None:
    """The rules for a single output file (overlay video, plot): not an input, writable."""
    check_not_an_input(path, inputs, name)
    if Path(path).is_dir():
        raise InputError(f"{param(name, path)} is a folder: give a file name")
    check_writable(path, name)


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
        check_out_file(overlay, inputs, "overlay")
        check_overlay_is_ours(out_dir, overlay, overwrite)


def overlay_record(overlay: str | Path) -> str:
    """How a manifest records the overlay video a run wrote (its resolved path)."""
    return str(resolved(overlay))


def check_overlay_is_ours(out_dir: str | Path, overlay: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing ``overlay`` file unless the manifest of ``out_dir``
    records it as the overlay dino-vos wrote there, or ``overwrite``."""
    target = Path(overlay)
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    recorded = read_manifest(out_dir).get("overlay")
    if isinstance(recorded, str) and recorded == overlay_record(target):
        return
    raise InputError(
        f"{param('overlay', overlay)} exists and is not an overlay dino-vos wrote (the manifest "
        f"of {out_dir} does not list it): choose a new file name, or pass "
        f"{param('overwrite', True)} to replace it"
    )


def remove_stale_staging(out_dir: Path, announce: Any = None) -> None:
    """Clean what an interrupted run (even one killed with SIGKILL) left in ``out_dir``.

    Call it only while holding the folder's lock (:func:`locked_output`): a folder another live
    run is staging is not abandoned. A commit interrupted before its manifest was written is
    undone: the new files it had moved in (listed in its journal) leave and the previous
    result's files come back from the backup; journal entries that would leave the folder
    (:func:`entry_problem`) are ignored. ``announce(text)`` is told what was cleaned.
    """
    holder = lock_holder(out_dir)
    if holder is not None:  # never clean a folder a live run is writing
        raise InputError(busy_message(out_dir, holder))
    with deferred_interrupts():
        _undo_interrupted_commit(out_dir, announce)
        staging = out_dir / STAGING_NAME
        if staging.exists() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
            if announce is not None:
                announce(f"Removed {staging} left by an interrupted run")


def _undo_interrupted_commit(out_dir: Path, announce: Any = None) -> None:
    backup = out_dir / BACKUP_NAME
    if not backup.is_dir() or backup.is_symlink():
        return
    if not is_result_folder(out_dir):  # the commit stopped before its manifest
        removed = _remove_new_files(out_dir, _journal_new_files(backup))
        restored = _restore_backup(out_dir, backup)
        if announce is not None:
            announce(
                f"Restored the previous result in {out_dir} (a commit was interrupted: "
                f"{removed} new file(s) removed, {restored} previous file(s) put back)"
            )
    elif announce is not None:
        announce(f"Removed {backup} left by an interrupted run (its commit had completed)")
    shutil.rmtree(backup, ignore_errors=True)


def _journal_new_files(backup: Path) -> list[Any]:
    """The files an interrupted commit had moved in, by its journal ([] if unreadable)."""
    try:
        journal = json.loads((backup / JOURNAL_NAME).read_text())
    except (OSError, ValueError):
        journal = []
    if isinstance(journal, dict):  # {"moving": "out"|"in", "new_files": [...]}
        new_files = journal.get("new_files", []) if journal.get("moving") == "in" else []
    else:  # a list: the journal of an older dino-vos, written before the moves
        new_files = journal
    return new_files if isinstance(new_files, list) else []


def _remove_new_files(out_dir: Path, new_files: list[Any]) -> int:
    removed = 0
    for name in new_files:  # only once new files moved in: before, these are the old ones
        if entry_problem(out_dir, name) is None and (out_dir / name).is_file():
            with contextlib.suppress(OSError):
                (out_dir / name).unlink()
                removed += 1
    return removed


def _restore_backup(out_dir: Path, backup: Path) -> int:
    restored = 0
    for source in sorted(backup.rglob("*")):
        relative = source.relative_to(backup).as_posix()
        if source.is_symlink() or not source.is_file() or relative == JOURNAL_NAME:
            continue
        if relative != MANIFEST_NAME and entry_problem(out_dir, relative) is not None:
            continue
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        restored += 1
    return restored
