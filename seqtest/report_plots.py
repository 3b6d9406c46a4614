"""The figures of a report, drawn on matplotlib's Agg canvas (no pyplot, no global state).

* ``report_curves.png``: validation loss / baseline against training step, one panel per task
  and sequence length, one colour per configuration: the median over seeds, a band from the
  lowest to the highest seed, and each seed as a thin line (a run that stopped early, solved
  or killed, simply ends). The axis stops at `CURVE_CEILING` x baseline, so that one
  diverging run (1e30 x) does not flatten every other curve; the panel says so when a curve
  went above.
* ``report_length.png``: the classic comparison: solved fraction and final loss / baseline
  (mean ± std over seeds) against sequence length, one line per model (per configuration
  without its length).
* ``report_gradient_decay.png``: log10 of the mean ||dL/dh_t|| of the top layer against the
  distance from the last step, T-1-t, at the first and at the last gradient probe; all
  configurations overlaid (mean over seeds; steps whose gradient is exactly zero are left
  out). Drawn when runs hold ``gradients.npz``.
* ``report_half_life.png``: gradient half-life (steps) of the top layer at the first and the
  last probe against sequence length, per model.

A figure is only drawn when the runs hold its data; one that fails to draw is reported and
does not stop the others.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

if TYPE_CHECKING:
    from seqtest.report import Group, Report

COLORS = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Style:
    """One colour and marker per series (a configuration without its length), the same in
    every figure, and a legend label that names only what differs."""

    def __init__(self, report: Report) -> None:
        self.index: dict[tuple[str, ...], int] = {}
        for group in report.groups:
            self.index.setdefault(group.series, len(self.index))
        self.many_tasks = len({str(g.task) for g in report.groups}) > 1
        lengths = sorted({g.length for g in report.groups if _numeric(g.length)})
        self.length_index = {length: i for i, length in enumerate(lengths)}

    def color(self, group: Group) -> str:
        return COLORS[self.index[group.series] % len(COLORS)]

    def marker(self, group: Group) -> str:
        return MARKERS[self.index[group.series] % len(MARKERS)]

    def linestyle(self, group: Group) -> str:
        """By length; series past the colour cycle also shift it, so no two lines look alike."""
        cycle = self.index[group.series] // len(COLORS)
        return LINESTYLES[(self.length_index.get(group.length, 0) + cycle) % len(LINESTYLES)]

    def label(self, group: Group) -> str:
        parts = [str(group.task)] if self.many_tasks else []
        parts.append(str(group.model))
        if group.label:
            parts.append(group.label)
        return " ".join(parts)


def _grid(count: int, width: float = 4.3, height: float = 3.3, max_cols: int = 4):
    cols = min(max_cols, count)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:count]


def _length_axis(ax, lengths: list[float]) -> None:
    if lengths and max(lengths) / max(min(lengths), 1e-12) >= 4:
        ax.set_xscale("log", base=2)
    if lengths and len(lengths) <= 12:
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{v:g}" for v in lengths])
        ax.minorticks_off()


# ------------------------------------------------------------------------------------ figures

#: The top of the loss-curve axis, in multiples of the baseline.
CURVE_CEILING = 1e3


def curves_figure(report: Report) -> Figure | None:
    style = _Style(report)
    panels: dict[tuple[str, str], list[tuple[Group, list]]] = {}
    for group in report.groups:
        baseline = group.baseline
        curves = [c for c in (run.curve(baseline) for run in group.runs) if c[0].size]
        if curves:
            panels.setdefault((str(group.task), _fmt(group.length)), []).append((group, curves))
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, ((task, length), entries) in zip(axes, panels.items(), strict=True):
        for group, curves in entries:
            color = style.color(group)
            steps = np.unique(np.concatenate([s for s, _ in curves]))
            table = np.full((len(curves), steps.size), np.nan)
            for i, (s, r) in enumerate(curves):
                table[i, np.searchsorted(steps, s)] = r
                ax.plot(s, r, color=color, lw=0.6, alpha=0.35)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # steps no seed reached
                low, mid, high = (
                    np.nanmin(table, 0), np.nanmedian(table, 0), np.nanmax(table, 0),
                )  # fmt: skip
            if len(curves) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
            ax.plot(
                steps, mid, color=color, lw=1.8, label=f"{style.label(group)} (n={len(curves)})"
            )
        ax.axhline(1.0, color="0.4", ls="--", lw=0.8)
        ratios = [c[1] for _, cs in entries for c in cs]
        _log_if_positive(ax, ratios)
        highest = max(r.max() for r in ratios)  # curves hold finite values only, never none
        if highest > CURVE_CEILING:
            ax.set_ylim(top=CURVE_CEILING)
            note = f"axis cut at {CURVE_CEILING:g} x (highest {highest:.2g} x)"
            ax.text(0.02, 0.98, note, transform=ax.transAxes, fontsize=7, va="top", color="0.3")
        ax.set_title(f"{task}, T={length}", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss / baseline")
        ax.legend(fontsize=7)
    return figure


def length_figure(report: Report) -> Figure | None:
    style = _Style(report)
    series: dict[tuple[str, ...], list[tuple[Group, dict]]] = {}
    for group, row in zip(report.groups, report.rows, strict=True):
        if _numeric(group.length) and row["finished"]:
            series.setdefault(group.series, []).append((group, row))
    if not series:
        return None
    figure = Figure(figsize=(10.5, 4.0), layout="constrained")
    solved_ax, loss_ax = figure.subplots(1, 2)
    lengths: set[float] = set()
    ratios: list[float] = []
    for number, entries in enumerate(series.values()):
        entries.sort(key=lambda e: e[0].length)
        group = entries[0][0]
        lengths.update(g.length for g, _ in entries)
        # a small sideways shift per series keeps markers and error bars apart
        shift = 2 ** (0.04 * (number - (len(series) - 1) / 2))
        x = [g.length * shift for g, _ in entries]
        kw = dict(color=style.color(group), marker=style.marker(group), label=style.label(group))
        solved_ax.plot(x, [r["solved_fraction"] for _, r in entries], **kw)
        points = [
            (xi, r["loss_ratio_mean"], r["loss_ratio_std"] or 0.0)
            for xi, (_, r) in zip(x, entries, strict=True)
        ]
        points = [p for p in points if p[1] is not None]
        if points:
            px, mean, std = map(np.asarray, zip(*points, strict=True))
            ratios += list(mean)
            loss_ax.errorbar(px, mean, yerr=std, capsize=3, **kw)
    for ax in (solved_ax, loss_ax):
        _length_axis(ax, sorted(lengths))
        ax.set_xlabel("sequence length T")
    solved_ax.set_ylim(-0.05, 1.05)
    solved_ax.set_ylabel("fraction of seeds solved")
    solved_ax.set_title("Solved", fontsize=10)
    loss_ax.axhline(1.0, color="0.4", ls="--", lw=0.8)
    _log_if_positive(loss_ax, [np.asarray(ratios)])
    loss_ax.set_ylabel("final validation loss / baseline")
    loss_ax.set_title("Final loss (mean ± std over seeds)", fontsize=10)
    solved_ax.legend(fontsize=8)
    return figure


def gradient_decay_figure(report: Report) -> Figure | None:
    style = _Style(report)
    profiles: dict[str, list[tuple[Group, np.ndarray]]] = {"init": [], "final": []}
    for group in report.groups:
        for when in profiles:
            runs = [p for p in (r.h_grad_profile(when) for r in group.runs) if p is not None]
            if not runs:
                continue
            size = runs[0].size
            mean = np.mean([p for p in runs if p.size == size], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                log = np.where(mean > 0, np.log10(mean), np.nan)
            profiles[when].append((group, log))
    if not any(profiles.values()):
        return None
    figure = Figure(figsize=(10.5, 4.0), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, (when, entries) in zip(axes, profiles.items(), strict=True):
        for group, log in entries:
            distance = np.arange(log.size)[::-1]  # T-1-t: steps before the last one
            ax.plot(
                distance, log, color=style.color(group), ls=style.linestyle(group), lw=1.3,
                label=f"{style.label(group)} T={_fmt(group.length)}",
            )  # fmt: skip
        ax.set_xlabel("steps before the last step, T-1-t")
        ax.set_title(
            "first probe (initialisation)" if when == "init" else "last probe", fontsize=10
        )
    axes[0].set_ylabel("log10 mean ||dL/dh_t||, top layer")
    handles, labels = max(
        (ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0])
    )
    columns = 1 + len(handles) // 16
    figure.legend(handles, labels, loc="outside right upper", fontsize=7, ncols=columns)
    figure.set_figwidth(10.5 + 1.6 * columns)
    return figure


def half_life_figure(report: Report) -> Figure | None:
    style = _Style(report)
    series: dict[tuple[str, ...], list[tuple[Group, dict]]] = {}
    for group, row in zip(report.groups, report.rows, strict=True):
        if _numeric(group.length) and (
            row["half_life_init"] is not None or row["half_life_final"] is not None
        ):
            series.setdefault(group.series, []).append((group, row))
    if not series:
        return None
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.subplots()
    lengths: set[float] = set()
    values: list[float] = []
    for entries in series.values():
        entries.sort(key=lambda e: e[0].length)
        group = entries[0][0]
        for when, ls, fill in (("init", "--", "none"), ("final", "-", None)):
            points = [(g.length, r[f"half_life_{when}"]) for g, r in entries]
            points = [p for p in points if p[1] is not None]
            if not points:
                continue
            x, y = zip(*points, strict=True)
            lengths.update(x)
            values += y
            ax.plot(
                x, y, color=style.color(group), marker=style.marker(group), ls=ls,
                markerfacecolor=fill, label=f"{style.label(group)}, {when}",
            )  # fmt: skip
    _length_axis(ax, sorted(lengths))
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("gradient half-life (steps), top layer")
    ax.set_title("Gradient half-life: first probe (dashed) and last probe (solid)", fontsize=10)
    ax.legend(fontsize=7)
    return figure


FIGURES: dict[str, Callable[[Report], Figure | None]] = {
    "report_curves.png": curves_figure,
    "report_length.png": length_figure,
    "report_gradient_decay.png": gradient_decay_figure,
    "report_half_life.png": half_life_figure,
}


# -------------------------------------------------------------------------------------- saving


def _fmt(value: Any) -> str:
    return f"{value:g}" if _numeric(value) else str(value)


def _log_if_positive(ax, arrays: list[np.ndarray]) -> None:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else []
    values = values[np.isfinite(values)] if len(values) else values
    if len(values) and values.min() > 0 and values.max() / values.min() > 3:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        # within one decade the major ticks alone say too little: label the minor ones too
        ax.yaxis.set_minor_formatter(plain if values.max() / values.min() < 10 else NullFormatter())


def save_figure(figure: Figure, path: Path, dpi: int = 110) -> None:
    """Save as PNG through a temporary file and a rename, like every other report file (with
    the usual permissions: matplotlib creates the file, so the umask applies)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.png")
    try:
        figure.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def draw_figures(report: Report, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw every figure that has data; returns (files written, errors as text)."""
    written, errors = [], []
    for name, draw in FIGURES.items():
        try:
            figure = draw(report)
            if figure is None:
                continue
            save_figure(figure, Path(out_dir) / name)
            written.append(Path(out_dir) / name)
        except Exception as error:  # one broken figure must not cost the whole report
            errors.append(f"{name}: {type(error).__name__}: {error}")
    return written, errors
