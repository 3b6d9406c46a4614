"""Hydra callbacks: at the end of a multirun, print a comparison table of its jobs and write the
report (``report.md``, ``report.csv``, figures) into the sweep folder.

Hydra calls ``on_multirun_end`` only when every job returned: when a job raises, the sweeper
re-raises after its batch, and a job that exits (``sys.exit``) ends the process. The table and
the report are then written when the process exits, listing the jobs that failed, so a sweep
always leaves its report behind. Under the joblib and submitit launchers the callback runs in
the launching process, after the launcher has collected every job.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seqtest.report import RUN_COLUMNS, load_runs, run_rows, write_report
from seqtest.results import format_table

TABLE_COLUMNS = RUN_COLUMNS


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per run folder under `sweep_dir`; runs without a readable summary say why."""
    return run_rows(load_runs(Path(sweep_dir)))


def finish_sweep(sweep_dir: Path, figures: bool = True, stream=None) -> None:
    """Print the per-job table and the report of `sweep_dir`, and write the report there.
    Never raises: a sweep's results matter more than its report."""
    stream = stream or sys.stdout
    sweep_dir = Path(sweep_dir)
    try:
        report = write_report(sweep_dir, figures=figures)
    except Exception as error:  # report the problem, keep the sweep's exit status
        print(f"seqtest: could not write the report of {sweep_dir}: {error!r}", file=sys.stderr)
        return
    if not report.runs:
        return
    table = format_table(run_rows(report.runs), TABLE_COLUMNS)
    print(f"\nseqtest sweep {sweep_dir}\n{table}\n\n{report.text()}", file=stream, flush=True)


class SweepTable(Callback):
    """Print the table of a multirun's jobs and write its report when the sweep ends.

    ``report: false`` in the callback's config keeps only the table's old behaviour of
    printing; ``figures: false`` skips the PNG figures.
    """

    def __init__(self, report: bool = True, figures: bool = True) -> None:
        self.report = report
        self.figures = figures
        self._pending: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = Path(config.hydra.sweep.dir)
        atexit.register(self._at_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._pending = None
        self._finish(Path(config.hydra.sweep.dir))

    def _at_exit(self) -> None:
        """The sweep stopped before its end (a job failed): report what is there."""
        if self._pending is not None and self._pending.is_dir():
            sweep_dir, self._pending = self._pending, None
            print("\nseqtest: the sweep stopped early; reporting the runs it left.", flush=True)
            self._finish(sweep_dir)

    def _finish(self, sweep_dir: Path) -> None:
        if self.report:
            finish_sweep(sweep_dir, figures=self.figures)
            return
        rows = sweep_rows(sweep_dir)
        if rows:
            print(f"\nseqtest sweep {sweep_dir}\n" + format_table(rows, TABLE_COLUMNS), flush=True)
