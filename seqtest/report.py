"""Reports over folders of runs: one row per configuration, a CSV, a Markdown page and figures.

    seqtest-report multirun/2026-11-29/10-00-00        # a sweep folder
    seqtest-report outputs/2026-11-29/10-05-00         # one run
    seqtest-report results/                            # any folder holding run folders, nested
    seqtest-report sweep_a sweep_b --out combined/     # several folders, one report

Every run folder under PATH is read: ``.hydra/overrides.yaml`` (what the command line set),
``summary.json``, ``metrics.jsonl`` and ``gradients.npz`` (all optional but the folder itself).
Runs are grouped into *configurations* by their overrides minus ``seed`` and minus the
keys that change how a run executes but not what it computes (``RUNTIME_KEYS``: threads,
resume, progress bar, checkpoint cadence), so that the seeds of one configuration run by
different sweeps, or resumed, land in one row. A run without ``.hydra/overrides.yaml`` is
grouped by the task, model and length of its summary.

A run without a readable summary is listed as **failed**, with the reason (no summary, a
corrupted one, where its metrics stop, the last error in its log); it still counts in its
configuration's number of runs. Statuses written by the training code (``solved``,
``unsolved``, ``diverged``, ``interrupted``, or any other) are counted as they are.

Per configuration (``report.csv``, ``report.md`` and the terminal):

* ``runs``: run folders; ``failed``: those without a readable summary; ``statuses``: counts.
* ``solved``: fraction of *finished* runs that solved the task, where finished means a
  summary whose status is not ``interrupted`` (an interrupted run did not use its budget).
  A run counts as solved when its status is ``solved`` or it has a ``solved_at_step``.
* ``loss_ratio``: final validation loss / the task's baseline over the finished runs that
  did not diverge and have a finite value, mean and sample standard deviation (n - 1). A
  diverged run is left out of both, its loss being whatever the overflow left (inf, NaN, or
  a finite 1e17 that would swamp the mean); it shows in ``statuses``.
* ``steps_to_solve``: median ``solved_at_step`` over the solved runs.
* ``half_life_init`` / ``half_life_final``: median over runs of the gradient half-life, in
  steps, of the top layer at the first and at the last probe (``summary.json``'s
  ``gradients.init/final.half_life``, else ``gradients.npz``). Runs without a half-life are
  left out of the median; when no run has one it reads ``none`` if the fitted decay rate was
  <= 0 (the gradient does not shrink) and ``n/a`` if there was nothing to fit (a task scored
  at every step has no step before its first scored one). The CSV counts both kinds.
* ``wall_time_s``: mean wall time of the finished runs.

Figures (PNG, next to the report, each only when the runs hold its data): see
`seqtest.report_plots`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import secrets
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seqtest.results import METRICS_FILE, SUMMARY_FILE, find_run_dirs, format_table
from seqtest.shutdown import skip_final_collections

GRADIENTS_FILE = "gradients.npz"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
CONFIG_FILE = Path(".hydra") / "config.yaml"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
RUNS_CSV = "report_runs.csv"

#: Override keys that select the seed; a configuration is everything else.
SEED_KEYS = frozenset({"seed"})
#: Override keys that change how a run executes, not what it computes: left out of the
#: configuration, so that a run resumed (``resume=true``) or run with another thread count
#: counts with the other seeds of its configuration.
RUNTIME_KEYS = frozenset({"threads", "resume", "train.progress", "train.checkpoint_every"})
#: Override keys shown in their own columns (task, model, length), not in the config label.
SHOWN_KEYS = frozenset({"task", "model", "task.length"})

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ------------------------------------------------------------------------------------ reading


def as_float(value: Any) -> float | None:
    """A number from a summary or a metrics record: JSON numbers, and the strings "nan",
    "inf" and "-inf" that the run-folder writer uses for non-finite values. None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(value)
    return None


def finite(value: Any) -> float | None:
    number = as_float(value)
    return number if number is not None and math.isfinite(number) else None


def override_key(override: str) -> str:
    """The key of a Hydra override: ``+seed=1`` -> ``seed``, ``~model`` -> ``model``."""
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class Run:
    """One run folder, read back. ``summary`` is None when the run failed (see ``reason``)."""

    path: Path
    name: str
    overrides: list[str] | None = None
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    gradients: dict[str, np.ndarray] | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    described: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.summary is None

    @property
    def status(self) -> str:
        if self.summary is None:
            return "failed"
        status = self.summary.get("status")
        if isinstance(status, str) and status:
            return status
        return "solved" if self.summary.get("solved_at_step") is not None else "unsolved"

    @property
    def finished(self) -> bool:
        """A summary whose status is not `interrupted`: the run used its step budget."""
        return self.summary is not None and self.status != "interrupted"

    @property
    def solved(self) -> bool:
        return self.summary is not None and (
            self.status == "solved" or self.summary.get("solved_at_step") is not None
        )

    def get(self, key: str) -> Any:
        """A field of the summary, else what the run's config or overrides say."""
        if self.summary is not None and self.summary.get(key) is not None:
            return self.summary[key]
        return self.described.get(key)

    @property
    def seed(self) -> Any:
        return self.get("seed")

    @property
    def loss_ratio(self) -> float | None:
        if self.summary is None:
            return None
        ratio = as_float(self.summary.get("loss_ratio"))
        if ratio is None:
            loss = as_float(self.summary.get("final_val_loss"))
            baseline = finite(self.summary.get("baseline_loss"))
            if loss is not None and baseline:
                ratio = loss / baseline
        return ratio

    @property
    def config(self) -> tuple[str, ...]:
        """The grouping key: the overrides minus the seed and the runtime keys, sorted;
        without overrides, the task, model and length."""
        if self.overrides is not None:
            left_out = SEED_KEYS | RUNTIME_KEYS
            return tuple(sorted(o for o in self.overrides if override_key(o) not in left_out))
        return tuple(f"{k}={self.get(k)}" for k in ("task", "model", "length"))

    def half_life(self, when: str) -> tuple[str | None, float | None]:
        """The gradient half-life (steps) of the top layer at the first (`init`) or last
        (`final`) probe, as (kind, value): ("value", v); ("none", None) when the fitted decay
        rate is <= 0 (the gradient does not shrink); ("no fit", None) when there was nothing to
        fit (e.g. a task scored at every step has no step before the first scored one);
        (None, None) when the run holds no gradient data."""
        grads = self.summary.get("gradients") if self.summary else None
        if isinstance(grads, dict) and isinstance(grads.get(when), dict):
            entry = grads[when]
            if "half_life" in entry:
                return _half_life_kind(
                    as_float(entry.get("half_life")), as_float(entry.get("decay_rate"))
                )
        if self.gradients is not None and "half_life" in self.gradients:
            values = np.asarray(self.gradients["half_life"], dtype=float)
            rates = np.asarray(
                self.gradients.get("decay_rate", np.full_like(values, np.nan)), dtype=float
            )
            if values.ndim == 2 and values.size and rates.shape == values.shape:
                index = 0 if when == "init" else -1
                return _half_life_kind(float(values[index, -1]), float(rates[index, -1]))
        return None, None

    def gradient_digest(self, when: str, key: str) -> float | None:
        """A value of the summary's gradient digest (``gradients.init`` / ``.final``), such as
        ``top_lyapunov`` or ``saturation``; None when absent or not finite."""
        grads = self.summary.get("gradients") if self.summary else None
        entry = grads.get(when) if isinstance(grads, dict) else None
        return finite(entry.get(key)) if isinstance(entry, dict) else None

    def h_grad_profile(self, when: str) -> np.ndarray | None:
        """Mean ||dL/dh_t|| of the top layer over the steps t at the first / last probe."""
        if self.gradients is None or "h_grad" not in self.gradients:
            return None
        h_grad = np.asarray(self.gradients["h_grad"], dtype=float)
        if h_grad.ndim != 3 or h_grad.shape[0] == 0:
            return None
        return h_grad[0 if when == "init" else -1, -1]

    def curve(self, baseline: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, validation loss / baseline) from the metrics, non-finite values dropped."""
        own = finite(self.summary.get("baseline_loss")) if self.summary else None
        baseline = own or baseline
        steps, ratios = [], []
        if baseline:
            for record in self.metrics:
                step, loss = as_float(record.get("step")), finite(record.get("val_loss"))
                if step is not None and loss is not None:
                    steps.append(step)
                    ratios.append(loss / baseline)
        return np.asarray(steps, dtype=float), np.asarray(ratios, dtype=float)


def _half_life_kind(half_life: float | None, rate: float | None) -> tuple[str, float | None]:
    if half_life is not None and math.isfinite(half_life):
        return "value", half_life
    if rate is not None and math.isfinite(rate):
        return "none", None  # a fitted rate <= 0: no decay, no half-life
    return "no fit", None


def _read_metrics(path: Path, notes: list[str]) -> list[dict]:
    """Every readable record of metrics.jsonl; unreadable lines are noted and skipped."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as error:
        notes.append(f"{METRICS_FILE} unreadable ({error.strerror or error})")
        return []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            where = "last line" if number == len(lines) else f"line {number}"
            notes.append(f"{METRICS_FILE}: {where} is cut or corrupted (skipped)")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_gradients(path: Path, notes: list[str]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as error:  # a cut or foreign file must not stop the report
        notes.append(f"{GRADIENTS_FILE} unreadable ({type(error).__name__}: {error})")
        return None


def _last_logged_error(run_dir: Path) -> str | None:
    """The last ERROR line of the job's log (Hydra writes `<job name>.log` in the run folder)."""
    found = None
    for log in sorted(run_dir.glob("*.log")):
        try:
            with log.open("rb") as handle:
                handle.seek(max(0, log.stat().st_size - 20_000))
                tail = handle.read().decode(errors="replace")
        except OSError:
            continue
        for line in tail.splitlines():
            if "[ERROR]" in line:
                found = line.split(" - ", 1)[-1].strip()
    return found


def _describe(run_dir: Path, overrides: list[str] | None) -> dict:
    """Task, model, length and seed of a run without a summary, from Hydra's record."""
    described: dict[str, Any] = {}
    try:
        config = yaml.load((run_dir / CONFIG_FILE).read_text(), Loader=_Loader)
    except (OSError, ValueError, yaml.YAMLError):
        config = None
    if isinstance(config, dict):
        task, model = config.get("task"), config.get("model")
        if isinstance(task, dict):
            target = str(task.get("_target_", ""))
            if "." in target:  # seqtest.tasks.<name>.<Class>: the task's file names it
                described["task"] = target.split(".")[-2]
            described["length"] = task.get("length")
        if isinstance(model, dict):
            described["model"] = model.get("name") or model.get("cell")
        described["seed"] = config.get("seed")
    for override in overrides or []:
        if override_key(override) == "seed":
            described["seed"] = override.split("=", 1)[-1]
    return {k: v for k, v in described.items() if v is not None}


def load_run(run_dir: Path, root: Path | None = None) -> Run:
    """Read one run folder. Never raises for what is inside the folder."""
    run_dir = Path(run_dir)
    name = str(run_dir.relative_to(root)) if root is not None else str(run_dir)
    run = Run(path=run_dir, name=name or ".")

    overrides_path = run_dir / OVERRIDES_FILE
    if overrides_path.exists():
        try:
            overrides = yaml.load(overrides_path.read_text(), Loader=_Loader)
            if isinstance(overrides, list):
                run.overrides = [str(o) for o in overrides]
            elif overrides is None:
                run.overrides = []
            else:
                run.notes.append(f"{OVERRIDES_FILE} is not a list (ignored)")
        except (OSError, ValueError, yaml.YAMLError) as error:
            run.notes.append(f"{OVERRIDES_FILE} unreadable ({type(error).__name__})")

    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        run.metrics = _read_metrics(metrics_path, run.notes)

    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        run.reason = f"no {SUMMARY_FILE}"
    else:
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as error:
            run.reason = f"{SUMMARY_FILE} unreadable ({type(error).__name__}: {error})"
        else:
            if isinstance(summary, dict):
                run.summary = summary
            else:
                run.reason = f"{SUMMARY_FILE} holds a {type(summary).__name__}, not an object"

    if run.failed:
        steps = [s for s in (as_float(r.get("step")) for r in run.metrics) if s is not None]
        if steps:
            run.reason += f"; metrics stop at step {int(max(steps))}"
        elif not metrics_path.exists():
            run.reason += f", no {METRICS_FILE}"
        error = _last_logged_error(run_dir)
        if error:
            run.reason += f"; log: {error}"
        run.described = _describe(run_dir, run.overrides)

    gradients_path = run_dir / GRADIENTS_FILE
    if gradients_path.exists():
        run.gradients = _read_gradients(gradients_path, run.notes)
    return run


def as_roots(roots: Path | str | Sequence[Path | str]) -> list[Path]:
    """One folder or several, as a list of paths."""
    if isinstance(roots, (str, os.PathLike)):
        return [Path(roots)]
    return [Path(r) for r in roots]


def folder_labels(folders: Sequence[Path]) -> list[str]:
    """Short names that tell `folders` apart: the last part of each path, or as many trailing
    parts as it takes for every name to differ (``a/sweep`` and ``b/sweep``, not ``sweep``
    twice). A folder given twice keeps its whole path."""
    parts = [folder.resolve().parts for folder in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = [str(Path(*p[-depth:])) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(folder.resolve()) for folder in folders]


def load_runs(roots: Path | Sequence[Path]) -> list[Run]:
    """Every run folder under `roots` (each itself included), in job order. With several
    folders, each run's name starts with its folder's label (`folder_labels`), so that job
    0 of one sweep and job 0 of another stay apart."""
    folders = as_roots(roots)
    labels = folder_labels(folders)
    runs = []
    for root, label in zip(folders, labels, strict=True):
        for run_dir in find_run_dirs(root):
            run = load_run(run_dir, root)
            if len(folders) > 1:
                inner = "" if run.name == "." else run.name
                run.name = str(Path(label) / inner)
            runs.append(run)
    return runs


# ------------------------------------------------------------------------------- aggregating


@dataclass
class Group:
    """The runs of one configuration (their overrides minus the seed)."""

    key: tuple[str, ...]
    runs: list[Run]
    label: str = ""

    def first(self, key: str) -> Any:
        values = [r.get(key) for r in self.runs if r.get(key) is not None]
        return values[0] if values else None

    def values(self, key: str) -> list:
        """Distinct values of a field over the runs, in order."""
        return list(dict.fromkeys(r.get(key) for r in self.runs if r.get(key) is not None))

    @property
    def task(self) -> Any:
        return _joined(self.values("task"))

    @property
    def model(self) -> Any:
        return _joined(self.values("model"))

    @property
    def length(self) -> Any:
        return _joined(self.values("length"))

    @property
    def baseline(self) -> float | None:
        for run in self.runs:
            if run.summary is not None and finite(run.summary.get("baseline_loss")):
                return finite(run.summary["baseline_loss"])
        return None

    @property
    def series(self) -> tuple[str, ...]:
        """The configuration without its length: one line of the against-length figures."""
        key = tuple(o for o in self.key if override_key(o) != "task.length")
        if self.runs and self.runs[0].overrides is None:
            key = tuple(o for o in key if not o.startswith("length="))
        return key


def _joined(values: list) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else "/".join(map(str, values))


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Runs grouped by configuration, ordered by task, model (in order of appearance) and
    length; each group's label holds the overrides that differ between configurations and
    are not already shown as task, model or length."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        groups.setdefault(run.config, Group(run.config, [])).runs.append(run)
    result = list(groups.values())
    varying = _varying_keys([g.key for g in result])
    for group in result:
        group.label = " ".join(
            o for o in group.key if override_key(o) in varying and override_key(o) not in SHOWN_KEYS
        )
    order: dict[str, dict[Any, int]] = {"task": {}, "model": {}}
    for group in result:
        for name in order:
            order[name].setdefault(str(getattr(group, name)), len(order[name]))

    def sort_key(group: Group):
        length = group.length
        numeric = isinstance(length, int | float) and not isinstance(length, bool)
        return (
            order["task"][str(group.task)],
            order["model"][str(group.model)],
            _natural(group.label),
            (0, length, "") if numeric else (1, 0, str(length)),
        )

    return sorted(result, key=sort_key)


def _natural(text: str) -> list:
    """Sort key that orders numbers by value: hidden_size=64 before hidden_size=128."""
    return [
        (0, float(p), "") if _is_number(p) else (1, 0.0, p)
        for p in re.split(r"(-?\d+\.?\d*)", text)
    ]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _varying_keys(keys: Sequence[tuple[str, ...]]) -> set[str]:
    """Override keys whose value is not the same in every configuration (absent counts as a
    value of its own)."""
    names = {override_key(o) for key in keys for o in key}
    seen: dict[str, set[str | None]] = {name: set() for name in names}
    for key in keys:
        present = {override_key(o): o for o in key}
        for name in names:
            seen[name].add(present.get(name))
    return {name for name, values in seen.items() if len(values) > 1}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise_group(group: Group) -> dict[str, Any]:
    """One report row. Numbers are plain floats (None where there is nothing to show)."""
    runs = group.runs
    finished = [r for r in runs if r.finished]
    converged = [r for r in finished if r.status != "diverged"]
    ratios = [v for v in (finite(r.loss_ratio) for r in converged) if v is not None]
    solved = [r for r in finished if r.solved]
    solve_steps = [
        v for v in (finite(r.summary.get("solved_at_step")) for r in solved) if v is not None
    ]
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.status] = statuses.get(run.status, 0) + 1
    row: dict[str, Any] = {
        "config": " ".join(group.key),
        "label": group.label,
        "task": group.task,
        "model": group.model,
        "length": group.length,
        "runs": len(runs),
        "failed": statuses.get("failed", 0),
        "statuses": ", ".join(f"{n} {s}" for s, n in statuses.items()),
        "finished": len(finished),
        "solved": len(solved),
        "solved_fraction": len(solved) / len(finished) if finished else None,
        "loss_ratio_mean": statistics.fmean(ratios) if ratios else None,
        "loss_ratio_std": statistics.stdev(ratios) if len(ratios) >= 2 else None,
        "loss_ratio_n": len(ratios),
        "steps_to_solve_median": _median(solve_steps),
    }
    for when in ("init", "final"):
        kinds = [r.half_life(when) for r in runs]
        row[f"half_life_{when}"] = _median([v for kind, v in kinds if kind == "value"])
        row[f"half_life_{when}_none"] = sum(kind == "none" for kind, _ in kinds)
        row[f"half_life_{when}_no_fit"] = sum(kind == "no fit" for kind, _ in kinds)
        for key in DIGEST_KEYS:
            values = [r.gradient_digest(when, key) for r in runs]
            row[f"{key}_{when}"] = _median([v for v in values if v is not None])
    walls = [v for v in (finite(r.summary.get("wall_time_s")) for r in finished) if v is not None]
    row["wall_time_s"] = statistics.fmean(walls) if walls else None
    row["wall_time_total_s"] = sum(walls) if walls else None
    return row


# ------------------------------------------------------------------------------ formatting

#: Gradient-digest values reported per configuration (median over runs, init and final).
DIGEST_KEYS = ("top_lyapunov", "saturation")

CSV_COLUMNS = [
    "config", "task", "model", "length", "runs", "failed", "finished", "solved",
    "solved_fraction", "loss_ratio_mean", "loss_ratio_std", "loss_ratio_n",
    "steps_to_solve_median", "half_life_init", "half_life_init_none", "half_life_init_no_fit",
    "half_life_final", "half_life_final_none", "half_life_final_no_fit",
    "top_lyapunov_init", "top_lyapunov_final", "saturation_init", "saturation_final",
    "wall_time_s", "statuses",
]  # fmt: skip
FIGURE_CAPTIONS = {
    "report_curves.png": "Validation loss / baseline against training step: median over seeds "
    "(thick), each seed (thin), band from the lowest to the highest seed; dashed: the baseline.",
    "report_length.png": "Fraction of seeds that solved the task, and final loss / baseline "
    "(mean ± std over seeds), against sequence length.",
    "report_gradient_decay.png": "log10 of the mean ||dL/dh_t|| of the top layer against the "
    "number of steps before the last one, at the first and the last gradient probe (mean over "
    "seeds; steps whose gradient is exactly zero are not drawn).",
    "report_half_life.png": "Gradient half-life of the top layer (steps) against sequence "
    "length: first probe dashed, last probe solid.",
}
RUN_COLUMNS = ["run", "task", "model", "length", "seed", "status", "loss_ratio", "solved_at_step"]


def _g(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _loss_cell(row: dict) -> str:
    mean, std = row["loss_ratio_mean"], row["loss_ratio_std"]
    if mean is None:
        return "-"
    return f"{_g(mean)} ± {_g(std, 2)}" if std is not None else _g(mean)


def _half_life_cell(row: dict, when: str) -> str:
    value = row[f"half_life_{when}"]
    if value is not None:
        return f"{value:.3g}"
    if row[f"half_life_{when}_none"]:
        return "none"
    return "n/a" if row[f"half_life_{when}_no_fit"] else "-"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.3g} s"
    if value < 7200:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


def display_rows(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows with formatted cells for the terminal and Markdown, and their column names."""
    with_label = any(row["label"] for row in rows)
    columns = (["config"] if with_label else []) + [
        "task", "model", "T", "runs", "status", "solved", "loss / baseline",
        "steps to solve", "half-life init", "half-life final", "lyapunov init",
        "lyapunov final", "saturated init", "saturated final", "wall time",
    ]  # fmt: skip
    shown = []
    for row in rows:
        shown.append(
            {
                "config": row["label"] or "-",
                "task": _g(row["task"]),
                "model": _g(row["model"]),
                "T": _g(row["length"]),
                "runs": str(row["runs"]),
                "status": row["statuses"],
                "solved": f"{row['solved']}/{row['finished']}" if row["finished"] else "-",
                "loss / baseline": _loss_cell(row),
                "steps to solve": _g(row["steps_to_solve_median"], 4),
                "half-life init": _half_life_cell(row, "init"),
                "half-life final": _half_life_cell(row, "final"),
                "lyapunov init": _g(row["top_lyapunov_init"], 3),
                "lyapunov final": _g(row["top_lyapunov_final"], 3),
                "saturated init": _g(row["saturation_init"], 2),
                "saturated final": _g(row["saturation_final"], 2),
                "wall time": _seconds(row["wall_time_s"]),
            }
        )
    return shown, columns


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return buffer.getvalue()


def run_rows(runs: Iterable[Run]) -> list[dict]:
    """One row per run (the table a multirun prints at its end)."""
    rows = []
    for run in runs:
        # the first clause of the reason; the report lists the whole of it
        status = run.status if not run.failed else f"failed ({run.reason.split(';')[0]})"
        rows.append(
            {
                "run": run.name,
                "task": run.get("task"),
                "model": run.get("model"),
                "length": run.get("length"),
                "seed": run.seed,
                "status": status,
                "loss_ratio": run.loss_ratio,
                "solved_at_step": run.get("solved_at_step") if not run.failed else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------- report


@dataclass
class Report:
    root: Path  # the folder read (the first, when several were: see `roots`)
    out_dir: Path
    runs: list[Run]
    groups: list[Group]
    rows: list[dict]
    files: list[Path] = field(default_factory=list)
    figure_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    roots: list[Path] = field(default_factory=list)

    @property
    def folders(self) -> list[Path]:
        """The folders read, for titles."""
        return self.roots or [self.root]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.failed]

    @property
    def common_overrides(self) -> list[str]:
        """Overrides every configuration shares (shown once, above the table)."""
        if not self.groups:
            return []
        shared = set(self.groups[0].key)
        for group in self.groups[1:]:
            shared &= set(group.key)
        return [o for o in self.groups[0].key if o in shared]

    def text(self) -> str:
        """The terminal version of the report."""
        shown, columns = display_rows(self.rows)
        out = [
            f"seqtest report {', '.join(map(str, self.folders))}: {len(self.runs)} runs, "
            f"{len(self.groups)} configurations"
        ]
        if self.common_overrides:
            out.append("common overrides: " + " ".join(self.common_overrides))
        out.append(format_table(shown, columns))
        if self.failed:
            out.append(f"\nfailed runs ({len(self.failed)}):")
            out += [f"  {r.name}: {r.reason}" for r in self.failed]
        noted = [r for r in self.runs if r.notes]
        if noted:
            out.append("\nnotes:")
            out += [f"  {r.name}: {'; '.join(r.notes)}" for r in noted]
        for error in self.figure_errors:
            out.append(f"figure not drawn: {error}")
        if self.files:
            out.append("\nwrote " + ", ".join(str(p) for p in self.files))
        return "\n".join(out)

    def markdown(self, figures: list[Path]) -> str:
        shown, columns = display_rows(self.rows)
        out = ["# seqtest report: " + ", ".join(f"`{r}`" for r in self.folders), ""]
        out.append(
            f"{len(self.runs)} runs in {len(self.groups)} configurations "
            f"({len(self.failed)} failed)."
        )
        if self.common_overrides:
            out += ["", "Common overrides: `" + " ".join(self.common_overrides) + "`"]
        out += ["", markdown_table(shown, columns), ""]
        out += [
            "*solved*: runs that solved / finished runs (finished: a summary whose status is not",
            "`interrupted`). *loss / baseline*: final validation loss over the task's baseline,",
            "mean ± sample std over finished runs that did not diverge. *steps to solve*: median",
            "over solved runs. *half-life*: median gradient half-life of the top layer, in steps,",
            "at the first and the last gradient probe (*none*: the gradient does not decay;",
            "*n/a*: nothing to fit, e.g. a task scored at every step). *lyapunov*: median top",
            "finite-time Lyapunov exponent of the top layer's state-to-state Jacobian, per step.",
            "*saturated*: median fraction of saturated units of the top layer. Both at the first",
            "and the last probe. *wall time*: mean per finished run.",
            "",
        ]
        if self.failed:
            out += [f"## Failed runs ({len(self.failed)})", ""]
            out += [f"- `{r.name}`: {r.reason}" for r in self.failed]
            out.append("")
        noted = [r for r in self.runs if r.notes]
        if noted:
            out += ["## Notes", ""]
            out += [f"- `{r.name}`: {'; '.join(r.notes)}" for r in noted]
            out.append("")
        if figures:
            out += ["## Figures", ""]
            for path in figures:
                out += [f"![{path.stem}]({path.name})", ""]
                if path.name in FIGURE_CAPTIONS:
                    out += [FIGURE_CAPTIONS[path.name], ""]
        if self.figure_errors:
            out += ["Figures not drawn: " + "; ".join(self.figure_errors), ""]
        return "\n".join(out)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a report.
    The file gets the usual permissions (0666 less the umask): reports are meant to be read
    by others, on a cluster's shared file system too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_report(root: Path | Sequence[Path], out_dir: Path | None = None) -> Report:
    """Read and aggregate every run under `root`, one folder or several (then `out_dir` is
    required: no one folder is the report's own); writes nothing."""
    started = time.perf_counter()
    roots = as_roots(root)
    if not roots:
        raise ValueError("no folder to report on")
    if len(roots) > 1 and out_dir is None:
        raise ValueError(f"{len(roots)} folders to report on: say where to write (out_dir)")
    runs = load_runs(roots)
    groups = group_runs(runs)
    rows = [summarise_group(g) for g in groups]
    out = Path(out_dir) if out_dir else roots[0]
    report = Report(roots[0], out, runs, groups, rows, roots=roots)
    report.seconds = time.perf_counter() - started
    return report


def write_report(
    root: Path | Sequence[Path], out_dir: Path | None = None, figures: bool = True
) -> Report:
    """Build the report of the runs under `root` (one folder or several) and write
    report.csv, report_runs.csv, report.md and the figures into `out_dir` (default: `root`;
    required for several)."""
    started = time.perf_counter()
    report = build_report(root, out_dir)
    if not report.runs:
        return report
    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figure_paths: list[Path] = []
    if figures:
        from seqtest.report_plots import draw_figures

        figure_paths, report.figure_errors = draw_figures(report, out)
    write_text_atomic(out / REPORT_CSV, csv_text(report.rows, CSV_COLUMNS))
    write_text_atomic(out / RUNS_CSV, csv_text(run_rows(report.runs), RUN_COLUMNS))
    write_text_atomic(out / REPORT_MD, report.markdown(figure_paths))
    written += [out / REPORT_MD, out / REPORT_CSV, out / RUNS_CSV, *figure_paths]
    report.files = written
    report.seconds = time.perf_counter() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`seqtest-report PATH [PATH ...]`: print the report of the runs under PATH and write it
    there (several folders: into --out)."""
    skip_final_collections()
    parser = argparse.ArgumentParser(
        prog="seqtest-report",
        description="Summarise the runs under PATH (a multirun folder, a run folder or any "
        "folder holding run folders): a table per configuration (overrides minus seed and "
        "runtime keys such as threads or resume), report.csv, report.md and figures. Several "
        "PATHs make one report (the seeds of one configuration from different sweeps in one "
        "row), written into --out.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="folder of runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the files here (default: PATH; required with several PATHs)",
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.is_dir():
            parser.error(f"{path} is not a folder")
    if len(args.paths) > 1 and args.out is None:
        parser.error(f"{len(args.paths)} PATHs given: --out is required (the report's folder)")
    report = write_report(args.paths, args.out, figures=not args.no_figures)
    if not report.runs:
        where = " ".join(str(p) for p in args.paths)
        print(f"seqtest-report: no run folders under {where}", file=sys.stderr)
        return 1
    print(report.text())
    print(f"({len(report.runs)} runs read and reported in {report.seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
