"""Figures of one run's gradient probes (``gradients.npz``, see `seqtest.gradients`).

`plot_gradients(npz_or_arrays, out_dir)` writes, for the top layer:

* ``grad_profile.png``: log10 ||dL/dh_t|| against the time step t, one line per probe, from
  light (first probe) to dark (last); steps whose gradient underflowed the probe's dtype are
  marked with crosses on the dashed line at that dtype's smallest normal number.
* ``grad_heatmap.png``: log10 ||dL/dh_t|| over training step (rows) and time step (columns);
  underflowed steps are grey.
* ``half_life.png``: the fitted half-life (steps) over training; probes without one (the
  gradient does not shrink, or there was nothing to fit) are crosses on the axis.

Matplotlib's object interface with the Agg canvas: no pyplot, no global backend state.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from seqtest.results import atomic_file

FIGURES = ("grad_profile.png", "grad_heatmap.png", "half_life.png")


def _load(source) -> dict[str, np.ndarray]:
    if isinstance(source, dict):
        return {k: np.asarray(v) for k, v in source.items()}
    with np.load(source) as data:
        return {k: data[k] for k in data.files}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    return path


def _log10_profile(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """(log10 g with underflowed steps as NaN [P, T], underflow [P, T]) of the top layer."""
    g = data["h_grad"][:, -1].astype(np.float64)
    under = data["underflow"][:, -1].astype(bool) | ~(g > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logg = np.where(under, np.nan, np.log10(np.where(g > 0, g, 1.0)))
    return logg, under


def plot_gradients(npz_or_arrays, out_dir: str | os.PathLike) -> list[Path]:
    """Write the three figures to `out_dir` from a ``gradients.npz`` path or its arrays;
    returns their paths (none when there are no probes)."""
    data = _load(npz_or_arrays)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = data["steps"]
    if len(steps) == 0 or "h_grad" not in data:
        return []
    logg, under = _log10_profile(data)
    P, T = logg.shape
    tiny = float(data["tiny"]) if "tiny" in data else None
    dtype = str(data["dtype"]) if "dtype" in data else "?"
    written = []

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    colors = [(0.25 + 0.75 * i / max(P - 1, 1)) for i in range(P)]
    cmap = colormaps["Blues"]
    floor = np.log10(tiny) if tiny else np.nanmin(logg, initial=0.0) - 1
    t = np.arange(T)
    for i in range(P):
        label = f"step {steps[i]}" if i in (0, P - 1) else None
        ax.plot(t, logg[i], color=cmap(colors[i]), lw=1.2, label=label)
        if under[i].any():
            ax.plot(t[under[i]], np.full(under[i].sum(), floor), "x", color=cmap(colors[i]), ms=4)
    if tiny:
        ax.axhline(floor, color="grey", ls="--", lw=0.8, label=f"{dtype} smallest normal")
    ax.set_xlabel("time step t")
    ax.set_ylabel(r"$\log_{10}\,\|\partial L/\partial h_t\|$ (top layer)")
    ax.set_title("Gradient reaching each step, first probe light, last dark")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / FIGURES[0]))

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(logg),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        extent=(-0.5, T - 0.5, -0.5, P - 0.5),
        cmap=colormaps["viridis"].with_extremes(bad="lightgrey"),
    )
    ticks = np.arange(0, P, -(-P // 8))  # at most 8 labelled rows, evenly spaced
    ax.set_yticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("time step t")
    ax.set_ylabel("training step")
    ax.set_title("log10 ||dL/dh_t|| (grey: underflow)")
    fig.colorbar(image, ax=ax)
    written.append(_save(fig, out_dir / FIGURES[1]))

    fig = Figure(figsize=(6, 3.8))
    ax = fig.add_subplot()
    half = data["half_life"][:, -1].astype(np.float64)
    ax.plot(steps, half, "o-", ms=3, label="half-life")
    missing = ~np.isfinite(half)
    if missing.any():
        ax.plot(steps[missing], np.zeros(missing.sum()), "x", color="red", label="none")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient half-life (steps)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / FIGURES[2]))
    return written
