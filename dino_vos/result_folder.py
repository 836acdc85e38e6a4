"""The report folder of a multi-video job as one transaction: claim, running, complete.

DAVIS runs, YouTube-VOS runs, sweeps and batches keep per-video results and a few reports in
one folder whose ``dino-vos.json`` says which command made it (``format``), with which
settings (``key``), whether it finished (``status``) and which reports it wrote (``outputs``):

1. :meth:`ResultFolder.claim` applies the output rules of :mod:`dino_vos.outputs` before
   anything is written: the folder (not an input, empty or our own earlier result, writable),
   the report names (a file of that name that we did not write is never replaced), the feature
   cache (not an input, writable);
2. it then marks the folder ``running`` at once, so an interrupted run is known as dino-vos's
   own when it is resumed, and removes the reports of a run with another key (they would lie
   beside new results);
3. :meth:`ResultFolder.complete` writes the manifest ``complete`` with the reports' names last.

Under torchrun, rank 0 claims and the other ranks :meth:`ResultFolder.wait_for_claim`. The whole
job runs inside :meth:`ResultFolder.locked` (the folder's lock,
:func:`dino_vos.outputs.locked_output`), so a second run into the same folder is refused
instead of undoing the first's work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_vos.atomic import atomic_write_json
from dino_vos.errors import InputError, param
from dino_vos.outputs import (
    MANIFEST_NAME,
    check_manifest,
    check_not_an_input,
    check_out_dir,
    check_writable,
    listed_outputs,
    locked_output_on_main_rank,
    read_manifest,
    trusted_outputs,
    warn,
)


@dataclass(frozen=True)
class ResultFolder:
    """``path`` holds the results of one job of kind ``kind`` (the manifest's ``format``),
    identified by ``key`` (stored under ``key_name``); ``reports`` are the file names the job
    writes there besides per-video results."""

    path: Path
    kind: str
    key: dict[str, Any]
    reports: tuple[str, ...] = ()
    key_name: str = "run"

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    def is_ours(self, folder: Path | None = None) -> bool:
        """A folder an earlier job of this kind wrote (its manifest says so)."""
        return read_manifest(folder or self.path).get("format") == self.kind

    def is_complete(self) -> bool:
        """Complete reports of exactly this job are there."""
        manifest = self.manifest()
        return (
            manifest.get("format") == self.kind
            and manifest.get("status") == "complete"
            and manifest.get(self.key_name) == self.key
            and all((self.path / name).is_file() for name in self.reports)
        )

    @contextmanager
    def locked(
        self, inputs: Sequence[str | Path], overwrite: bool = False, shared: bool = False
    ) -> Iterator[Path]:
        """Hold the folder's lock for the block (on the main rank; other torchrun ranks write
        into the folder rank 0 holds). The folder rules are checked first, so no lock file is
        put into a folder that is refused."""
        if os.environ.get("RANK", "0") == "0":
            self._check_folder(inputs, overwrite, shared)
        with locked_output_on_main_rank(self.path, inputs=inputs):
            yield self.path

    def claim(
        self,
        inputs: Sequence[str | Path],
        overwrite: bool = False,
        cache_dir: Path | None = None,
        shared: bool = False,
        fix: str = f"choose another {param('out_dir')}",
    ) -> None:
        """Check the output rules for the folder, its report names and the feature cache, then
        mark the folder ``running`` for this job.

        ``shared``: the folder holds results another tool wrote (scoring existing masks in
        place): it need not be empty, only our reports are ours, and nothing is written before
        the reports (a failed scoring run leaves the folder as it was). ``fix`` ends the message
        about a report name taken by a file we did not write.
        """
        self._check_folder(inputs, overwrite, shared)  # again: now under the lock
        ours = listed_outputs(self.manifest()) if self.is_ours() else set()
        clashes = [n for n in self.reports if (self.path / n).exists() and n not in ours]
        if clashes:
            raise InputError(
                f"{self.path / clashes[0]} was not written by dino-vos and is not replaced: {fix}"
            )
        if cache_dir is not None:
            check_not_an_input(cache_dir, inputs, "cache_dir")
            check_writable(cache_dir, "cache_dir")
        if shared:
            return
        previous = self.manifest() if self.is_ours() else {}
        kept: list[str] = []
        if previous.get(self.key_name) == self.key:
            kept = sorted(listed_outputs(previous))
        else:
            self.drop_other_reports()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write("running", kept)

    def _check_folder(self, inputs: Sequence[str | Path], overwrite: bool, shared: bool) -> None:
        """The folder rules (:mod:`dino_vos.outputs`): a readable manifest, not an input, and
        writable and ours or empty (``shared``: only writable)."""
        check_manifest(self.path)
        if shared:
            check_not_an_input(self.path, inputs, "out_dir")
            check_writable(self.path, "out_dir")
        else:
            check_out_dir(self.path, inputs, overwrite, is_previous_result=self.is_ours)

    def drop_other_reports(self) -> None:
        """Remove the reports of an earlier job with another key: they would lie beside the new
        results. Only names the manifest lists that stay inside the folder are touched
        (:func:`dino_vos.outputs.trusted_outputs`)."""
        previous = self.manifest() if self.is_ours() else {}
        if previous and previous.get(self.key_name) != self.key:
            for name in trusted_outputs(self.path, previous, warn):
                (self.path / name).unlink(missing_ok=True)

    def complete(self, outputs: Iterable[str], **extra: Any) -> None:
        """Mark the job finished; ``outputs`` are the reports it wrote."""
        self._write("complete", list(outputs), **extra)

    def wait_for_claim(self, timeout: float = 600.0) -> None:
        """Block until another process (torchrun rank 0) has claimed the folder for this job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            manifest = self.manifest()
            if manifest.get("format") == self.kind and manifest.get(self.key_name) == self.key:
                return
            time.sleep(0.2)
        raise InputError(
            f"rank 0 did not accept {param('out_dir', self.path)} within {timeout:.0f} s"
        )

    def _write(self, status: str, outputs: list[str], **extra: Any) -> None:
        manifest = {
            "format": self.kind,
            "status": status,
            self.key_name: self.key,
            "outputs": outputs,
            **extra,
        }
        atomic_write_json(self.path / MANIFEST_NAME, manifest)
