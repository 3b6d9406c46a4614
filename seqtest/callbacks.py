"""Hydra callbacks: at the end of a multirun, print a comparison table of its jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from seqtest.results import SUMMARY_FILE, find_run_dirs, format_table, read_summary

TABLE_COLUMNS = ["run", "task", "model", "length", "seed", "status", "loss_ratio", "solved_at_step"]


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per run folder under `sweep_dir`; runs without a readable summary say so."""
    rows = []
    for run_dir in find_run_dirs(sweep_dir):
        row: dict[str, Any] = {"run": str(run_dir.relative_to(sweep_dir)) or "."}
        try:
            row |= read_summary(run_dir)
        except FileNotFoundError:
            row["status"] = f"failed (no {SUMMARY_FILE})"
        except ValueError:
            row["status"] = f"failed (unreadable {SUMMARY_FILE})"
        rows.append(row)
    return rows


class SweepTable(Callback):
    """Print the table of a multirun's jobs when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = sweep_rows(sweep_dir)
        if rows:
            print(f"\nseqtest sweep {sweep_dir}\n" + format_table(rows, TABLE_COLUMNS), flush=True)
