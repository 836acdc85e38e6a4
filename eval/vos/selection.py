"""Select on one split, report on another: ``eval davis --sweep ... --select-on train``.

The DINOv3 paper (App. D.5) tunes the propagation parameters on DAVIS *train* and reports
*val*. :func:`run_selection` does both in one command, and never selects on the split it
reports:

1. the grid runs as an ordinary sweep on the selection split into ``OUT/select-on-<split>/``;
2. the setting with the best J&F-Mean there (ties: the first in grid order) is chosen;
3. that one setting runs as an ordinary ``eval davis`` on the reported split into
   ``OUT/chosen-<split>/``;
4. ``OUT/selection.json`` states the grid, the chosen setting, its score on the selection split
   (with every other setting's) and its score on the reported split.

Both runs read one feature cache (``--cache`` or ``OUT/feature-cache``), and both resume. The
two splits must be different splits with no sequence in common (so ``--sequences``, which
overrides the split, is refused).

This module imports no torch at load time: the command line checks a job before any model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dino_vos.console import console
from dino_vos.errors import InputError, param
from dino_vos.eval.vos.sweep import (
    METRICS,
    SweepGrid,
    SweepJob,
    SweepRow,
    Value,
    run_sweep,
)
from dino_vos.result_folder import ResultFolder

if TYPE_CHECKING:
    from dino_vos.eval.vos.davis_job import DavisJob

SELECTION_FORMAT = "dino-vos-davis-selection"
SELECTION_REPORT = "selection.json"


@dataclass(frozen=True)
class SelectionJob:
    """``sweep``: the grid and the ``eval davis`` job of the reported split (its ``out_dir`` is
    the selection folder, its cache the one both splits share); the grid runs on
    ``select_on``."""

    sweep: SweepJob
    select_on: str

    @property
    def base(self) -> DavisJob:
        return self.sweep.base

    @property
    def grid(self) -> SweepGrid:
        return self.sweep.grid

    @property
    def out_dir(self) -> Path:
        return self.sweep.out_dir

    @property
    def cache_dir(self) -> Path:
        return self.sweep.cache_dir

    def check(self) -> None:
        """Refuse a selection that could see the reported split."""
        self.base.check(sweep=True)
        if self.select_on == self.base.split:
            raise InputError(
                f"{param('select_on', self.select_on)} is the reported split: choose another "
                f"split to select on (e.g. {param('select_on', 'train')} {param('split', 'val')})"
            )
        if self.base.sequences:
            raise InputError(
                f"{param('sequences')} overrides both splits, so the setting would be selected on "
                f"the sequences it is scored on: drop {param('sequences')} (or "
                f"{param('select_on')})"
            )

    def sweep_job(self) -> SweepJob:
        """The grid on the selection split, as an ordinary sweep."""
        base = dataclasses.replace(
            self.base,
            split=self.select_on,
            out_dir=self.out_dir / f"select-on-{self.select_on}",
            cache_dir=self.cache_dir,
        )
        return SweepJob(base, self.grid)

    def chosen_job(self, point: dict[str, Value]) -> DavisJob:
        """The chosen setting on the reported split, as an ordinary ``eval davis`` job."""
        setting = self.sweep.setting_job(point)
        return dataclasses.replace(
            setting, out_dir=self.out_dir / f"chosen-{self.base.split}", cache_dir=self.cache_dir
        )

    def key(self) -> dict[str, Any]:
        """What determines the report: the sweep on one split, the run on the other."""
        return {"selection": self.sweep_job().sweep_key(), "reported": self.base.run_key()}

    def result_folder(self) -> ResultFolder:
        return ResultFolder(self.out_dir, SELECTION_FORMAT, self.key(), (SELECTION_REPORT,))


def best_row(rows: Sequence[SweepRow]) -> SweepRow:
    """The row of the highest J&F-Mean (ties and NaN: the first in grid order wins)."""
    scored = [row for row in rows if not math.isnan(row.scores["J&F-Mean"])]
    if not scored:
        raise InputError("no setting of the grid has a J&F score on the selection split")
    return max(scored, key=lambda row: row.scores["J&F-Mean"])  # max keeps the first of ties


def check_disjoint(job: SelectionJob) -> None:
    """The two splits share no sequence (else selection would see reported data)."""
    selection = set(job.sweep_job().base.dataset().names)
    shared = [name for name in job.base.dataset().names if name in selection]
    if shared:
        raise InputError(
            f"splits {job.select_on} and {job.base.split} share {len(shared)} sequence(s) "
            f"({', '.join(shared[:3])}): select on a split disjoint from the reported one"
        )


def run_selection(job: SelectionJob) -> dict[str, Any] | None:
    """Sweep on the selection split, run the best setting on the reported split, write the
    report; returns it on rank 0 (None on the other torchrun ranks).

    Under torchrun one gloo process group serves the whole selection (as it serves a sweep):
    rank 0 checks and claims the folder and chooses the setting, and tells the other ranks.
    """
    job.check()
    with _one_process_group():
        rank = _rank()
        error = None
        if rank == 0:
            try:
                check_disjoint(job)
                job.result_folder().claim(
                    job.base.dataset().inputs, job.base.overwrite, job.base.cache_dir
                )
            except InputError as exc:
                error = str(exc)
        error = _from_rank0(error)
        if error is not None:
            raise InputError(error)
        return _select_and_report(job)


def _select_and_report(job: SelectionJob) -> dict[str, Any] | None:
    from dino_vos.atomic import atomic_write_json
    from dino_vos.eval.vos.davis_job import run_davis

    console.print(f"[bold]Selection on {job.select_on}:[/] {len(job.grid.points())} settings")
    rows = run_sweep(job.sweep_job())
    chosen = _from_rank0(best_row(rows) if rows is not None else None)
    console.print(
        f"[bold]Chosen on {job.select_on}:[/] {chosen.tag} "
        f"(J&F-Mean {chosen.scores['J&F-Mean']:.3f}); running it on {job.base.split}"
    )
    setting = job.chosen_job(chosen.parameters)
    if run_davis(setting) is None:
        return None
    report = _report(job, rows or [], chosen, setting)
    atomic_write_json(job.out_dir / SELECTION_REPORT, report)
    job.result_folder().complete([SELECTION_REPORT])
    console.print(
        f"Selected on {job.select_on}: {chosen.tag}; J&F-Mean {job.select_on} "
        f"{report['selection_scores']['J&F-Mean']:.3f}, {job.base.split} "
        f"[bold]{report['reported_scores']['J&F-Mean']:.3f}[/]; wrote "
        f"{job.out_dir / SELECTION_REPORT}"
    )
    return report


def _report(
    job: SelectionJob, rows: Sequence[SweepRow], chosen: SweepRow, setting: DavisJob
) -> dict[str, Any]:
    from dino_vos.eval.vos.davis_report import output_paths

    reports = output_paths(setting.report_dir, setting.report_label)["json"]
    payload = json.loads(reports.read_text())
    return {
        "format": SELECTION_FORMAT,
        "rule": f"best J&F-Mean on {job.select_on} (ties: first in grid order); "
        f"{job.base.split} is only scored with the chosen setting",
        "selected_on": job.select_on,
        "reported_split": job.base.split,
        "grid": job.grid.to_dict(),
        "base_propagation": job.base.config.to_dict(),
        "chosen": {"tag": chosen.tag, **chosen.parameters},
        "chosen_propagation": setting.config.to_dict(),
        "selection_scores": {metric: chosen.scores[metric] for metric in METRICS},
        "reported_scores": {metric: float(payload["global"][metric]) for metric in METRICS},
        "selection_rows": [row.to_dict() for row in rows],
        "selection_sweep": str(job.sweep_job().out_dir),
        "reported_run": str(setting.report_dir),
        "cache": str(job.cache_dir),
    }


def _rank() -> int:
    from dino_vos.distributed import launch_env

    return launch_env()[0]


@contextmanager
def _one_process_group() -> Iterator[None]:
    """A gloo group for the whole selection under torchrun (none without): ranks that leave a
    group at different times must not meet again in a new one."""
    from dino_vos.distributed import launch_env

    if launch_env()[1] <= 1:
        yield
        return
    import torch.distributed as dist

    from dino_vos.distributed import GATHER_TIMEOUT, is_enabled

    created = not is_enabled()
    if created:
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    try:
        yield
    finally:
        if created and is_enabled():
            dist.destroy_process_group()


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every torchrun rank (``value`` itself without torchrun)."""
    from dino_vos.distributed import all_gather_objects

    return all_gather_objects(value)[0]
