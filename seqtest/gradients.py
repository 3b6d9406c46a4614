"""Gradient-decay analysis: how much of the loss's gradient reaches each earlier time step.

One *probe* takes a fixed batch, runs the model's unrolled forward pass
(``model.forward_unrolled(x) -> (output, States)``) and measures the quantities below. Of
the model it needs only ``forward_unrolled``, ``cell`` ("rnn" | "lstm" | "gru"),
``num_layers``, ``layer_weights(l) -> (W_ih, W_hh, b_ih, b_hh)``, ``recurrent_weight(l)``,
``config.hidden_size`` and, for the rnn, ``config.activation`` ("tanh" | "relu" | "linear";
the linear cell is a reference case for tests and theory).

* **Per-step hidden-state gradients** g[l, t] = ||dL/dh_t^l||: the *total* derivative of the
  loss with respect to the state of layer l after step t, through the recurrence (the
  gradient with respect to the tensors the next step and the next layer consume). Per-sample
  L2 norm over the hidden units, then mean over samples, plus the 10/50/90th percentiles over
  samples. For the LSTM the same for the cell state c_t.
* **Input gradients** ||dL/dx_t|| per step (mean over samples), and their mean over the task's
  informative (sample, step) pairs (``task.informative_positions``).
* **Decay fit** of ln g against the distance d = t* - t for the steps t < t* before the first
  scored step t* (the first step any sample is scored at; for a loss at the last step: every
  earlier step). Least squares ln g = a - r d gives the decay rate r in nats per step
  (positive: vanishing; negative: exploding, reported as such), R^2, the half-life ln 2 / r in
  steps (None when r <= 0: the gradient does not shrink, there is no half-life) and the
  horizon: the first distance d at which g[t* - d] <= 1e-3 g[t*], read from the profile; when
  the profile stays above that within the sequence, the fit's extrapolation (a - ln(1e-3
  g[t*])) / r is reported instead (``horizon_extrapolated`` says which; None when r <= 0).
  When the mask scores every step from the first one (t* = 0), there is no step before it and
  the fit is empty: rate, half-life, horizon and R^2 are None.
* **Recurrent weights**: spectral radius and largest singular value of each gate block of
  the recurrent matrix W_hh ([G*H, H], PyTorch's gate order: rnn one block, LSTM i f g o,
  GRU r z n). ``spectral_radius`` / ``max_singular`` hold the candidate block (rnn: all of
  W_hh, LSTM: g, GRU: n); ``gate_spectral_radius`` / ``gate_max_singular`` every block.
* **Finite-time Lyapunov exponents**: the top k exponents of the state-to-state Jacobian
  J_t = d s_t / d s_{t-1} of each layer (s = h, or (h, c) for the LSTM: 2H) along the probe's
  trajectory, with the layer's input (the lower layer's states) held fixed. QR method:
  Q_t R_t = J_t Q_{t-1} from a fixed random orthonormal Q_0 (seed 0), exponent_i = mean over
  the T steps of ln |R_t[i, i]| (natural log, per step; a step's term is floored at ln of
  float64's smallest normal number, so a singular Jacobian gives a very negative but finite
  exponent). J_t Q comes from the cell's analytic tangent map (`linearise`), in float64, for
  each of the first ``lyapunov_samples`` samples; the exponents are averaged over them.
  Finite-time exponents carry an O(1/T) transient from Q_0. Sign convention: a vanishing
  gradient has ``top_lyapunov`` < 0 and ``decay_rate`` > 0; in theory decay_rate is close
  to -top_lyapunov.
* **Saturation** per layer, from the pre-activations: the fraction of (step, sample, unit)
  entries with |tanh| > 0.99, sigmoid < 0.01 or > 0.99, or relu exactly zero, over all the
  layer's nonlinearities (``gate_saturation``: per gate block). A linear cell never saturates.
* **Weight-gradient norms** ||dL/dW|| per layer (W_ih, W_hh, b_ih, b_hh together) and, last,
  for every other parameter (the readout).

Underflow. Norms are computed in float64 with scaling (no sum of squares of tiny numbers).
A step whose norm is below ``torch.finfo(probe dtype).tiny`` (zero included) is flagged in
``underflow``; the fit uses only the steps nearer the scored step than the first flagged one
and reports how many of the window it dropped (``fit_dropped``). Outputs never hold -inf;
"no value" is None in JSON and NaN in the npz file. ``dtype="float64"`` runs the probe on a
float64 copy of the model and batch, which sees about 10^-308 instead of 10^-38. Flushing
subnormals to zero (``torch.set_flush_denormal``) makes more steps come out exactly zero;
they are flagged the same way.

The probe uses ``torch.autograd.grad``: it leaves no ``.grad`` on the parameters, changes no
parameter and restores the model's train/eval mode.

``gradients.npz`` (`GradientTracker.save`), P probes, L layers, T steps, k exponents,
G gate blocks (1 rnn, 4 LSTM, 3 GRU):

==========================  ============  ===================================================
array                       shape         meaning
==========================  ============  ===================================================
steps                       [P]           training step of each probe
h_grad                      [P, L, T]     mean over samples of ||dL/dh_t^l||
h_grad_p10, _p50, _p90      [P, L, T]     percentiles over samples of the same norms
underflow                   [P, L, T]     bool: h_grad below the probe dtype's smallest normal
c_grad, c_grad_p10/50/90,   [P, L, T]     the same for the LSTM cell state (LSTM only)
c_underflow
x_grad                      [P, T]        mean over samples of ||dL/dx_t||
x_grad_informative          [P]           mean of ||dL/dx_t|| over the informative positions
decay_rate                  [P, L]        fitted rate r, nats per step (> 0: vanishing)
half_life                   [P, L]        ln 2 / r in steps (NaN: r <= 0 or no fit)
horizon                     [P, L]        distance where g falls to 1e-3 of g[t*] (NaN: none)
horizon_extrapolated        [P, L]        bool: horizon from the fit, not the profile
r2                          [P, L]        R^2 of the fit
fit_points, fit_dropped     [P, L]        steps used by the fit / dropped for underflow
c_decay_rate, c_half_life,  [P, L]        the fit on the LSTM cell-state gradients (LSTM only)
c_horizon, c_r2,
c_fit_points
scored_step                 [P]           t*, first scored step
loss                        [P]           probe loss
lyapunov                    [P, L, k]     top k Lyapunov exponents, descending
spectral_radius             [P, L]        spectral radius of the candidate block of W_hh
max_singular                [P, L]        largest singular value of the same block
gate_spectral_radius        [P, L, G]     per gate block
gate_max_singular           [P, L, G]     per gate block
saturation                  [P, L]        saturated fraction over all nonlinearities
gate_saturation             [P, L, G]     per gate block
weight_grad                 [P, L + 1]    ||dL/dW|| per layer, then the other parameters
probe_seconds               [P]           wall time of each probe
cell, dtype                 []            strings: the cell and the probe dtype
tiny                        []            the probe dtype's smallest normal number
==========================  ============  ===================================================
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seqtest.errors import require, require_choice, require_positive_int
from seqtest.results import atomic_file
from seqtest.tasks._base import Batch, Task

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRADIENTS_FILE = "gradients.npz"
HORIZON_FACTOR = 1e-3
PERCENTILES = (10, 50, 90)
#: Per-step ln|R_ii| floor of the Lyapunov QR method: ln of float64's smallest normal number.
LOG_FLOOR = math.log(torch.finfo(torch.float64).tiny)


@dataclass
class AnalysisConfig:
    """What the `analysis:` block of the config holds."""

    every: int = 500  # probe every N training steps
    batch_size: int = 64  # probe batch size
    dtype: str = "float32"  # probe dtype: float32 | float64 (a float64 copy of the model)
    lyapunov_k: int = 5  # top-k Lyapunov exponents (0 skips them)
    lyapunov_samples: int = 8  # samples of the probe batch the exponents are averaged over
    enabled: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        require_positive_int("analysis.every", self.every)
        require_positive_int("analysis.batch_size", self.batch_size)
        require_choice("analysis.dtype", self.dtype, DTYPES)
        require(
            isinstance(self.lyapunov_k, int)
            and not isinstance(self.lyapunov_k, bool)
            and self.lyapunov_k >= 0,
            "analysis.lyapunov_k",
            self.lyapunov_k,
            "an integer >= 0 (0 skips the Lyapunov exponents)",
        )
        require_positive_int("analysis.lyapunov_samples", self.lyapunov_samples)
        require(isinstance(self.enabled, bool), "analysis.enabled", self.enabled, "true or false")
        require(isinstance(self.plots, bool), "analysis.plots", self.plots, "true or false")


# ------------------------------------------------------------------------------- cell equations

#: The vanilla RNN's activations: the function and its saturation test on pre-activations.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "linear": lambda pre: pre,
}


def _activation(model: nn.Module) -> str:
    return getattr(model.config, "activation", "tanh")


def _activation_function(model: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation of a vanilla-RNN layer, in float64."""
    name = _activation(model)
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    module = copy.deepcopy(model.layers[layer].activation).double()
    # rows of units: a per-unit module (prelu) reads its channels from dim 1
    return lambda pre: module(pre.reshape(-1, pre.shape[-1])).reshape(pre.shape)


def _uses_generic_jacobian(model: nn.Module) -> bool:
    """Normalised cells have no closed-form tangent map here: their Jacobian products are
    taken by autograd through the layer's own step (see `_lyapunov_by_autograd`)."""
    return getattr(model.config, "norm", "none") != "none"


def gate_kinds(model: nn.Module) -> list[str]:
    """The nonlinearity of each gate block of the pre-activations, in PyTorch's order."""
    if model.cell == "lstm":
        return ["sigmoid", "sigmoid", "tanh", "sigmoid"]  # i f g o
    if model.cell == "gru":
        return ["sigmoid", "sigmoid", "tanh"]  # r z n
    return [_activation(model)]


def candidate_block(cell: str) -> int:
    """Index of the candidate block of W_hh: rnn 0 (the whole), LSTM g, GRU n."""
    return {"rnn": 0, "lstm": 2, "gru": 2}[cell]


def linearise(
    model: nn.Module, layer: int, s_prev: torch.Tensor, xp: torch.Tensor
) -> tuple[torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor]]:
    """The state map of one layer and its tangent map along a trajectory, in float64.

    `s_prev` [T, S, D] holds the state before each step (h, or for the LSTM (h, c)
    concatenated: D = 2H) and `xp` [T, S, G*H] each step's input projection W_ih x_t + b_ih.
    Returns ``s_next`` [T, S, D], the state after each step (the same equations as
    `model.forward_unrolled`), and ``tangent(t, v)``: the Jacobian d s_t / d s_{t-1} of sample
    s applied to the rows of v [S, k, D], i.e. ``(J_t v^T)^T`` for every sample at once.
    """
    _, w_hh, _, b_hh = (w.detach().to(s_prev) for w in model.layer_weights(layer))
    H = model.config.hidden_size
    cell = model.cell

    def project(v: torch.Tensor) -> torch.Tensor:  # v [S, k, H] -> W_hh v per row
        return v @ w_hh.T

    if cell == "rnn":
        activation = _activation(model)
        pre = xp + F.linear(s_prev, w_hh, b_hh)
        function = _activation_function(model, layer)
        s_next = function(pre)
        if activation == "tanh":
            slope = 1 - s_next * s_next
        elif activation == "relu":
            slope = (pre > 0).to(pre)
        elif activation == "linear":
            slope = torch.ones_like(pre)
        else:  # any other elementwise activation: its derivative is the gradient of the sum
            with torch.enable_grad():
                leaf = pre.detach().requires_grad_(True)
                slope = torch.autograd.grad(function(leaf).sum(), leaf)[0]
            s_next = s_next.detach()

        def tangent(t: int, v: torch.Tensor) -> torch.Tensor:
            return slope[t].unsqueeze(1) * project(v)

    elif cell == "lstm":
        h, c = s_prev[..., :H], s_prev[..., H:]
        i, f, g, o = (xp + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_next = f * c + i * g
        tc = torch.tanh(c_next)
        s_next = torch.cat([o * tc, c_next], dim=-1)
        di, df, dg, do = i * (1 - i), f * (1 - f), 1 - g * g, o * (1 - o)
        dtc = 1 - tc * tc

        def tangent(t: int, v: torch.Tensor) -> torch.Tensor:
            p_i, p_f, p_g, p_o = project(v[..., :H]).chunk(4, dim=-1)
            u = lambda a: a[t].unsqueeze(1)  # noqa: E731  [S, 1, H]: broadcast over the k rows
            dc = u(df) * p_f * u(c) + u(f) * v[..., H:] + u(di) * p_i * u(g) + u(i) * u(dg) * p_g
            dh = u(do) * p_o * u(tc) + u(o) * u(dtc) * dc
            return torch.cat([dh, dc], dim=-1)

    else:  # gru
        x_r, x_z, x_n = xp.chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(s_prev, w_hh, b_hh).chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        s_next = (1 - z) * n + z * s_prev
        dr, dz, dn = r * (1 - r), z * (1 - z), 1 - n * n

        def tangent(t: int, v: torch.Tensor) -> torch.Tensor:
            p_r, p_z, p_n = project(v).chunk(3, dim=-1)
            u = lambda a: a[t].unsqueeze(1)  # noqa: E731
            d_n = u(dn) * (u(dr) * p_r * u(h_n) + u(r) * p_n)
            return (u(s_prev) - u(n)) * u(dz) * p_z + (1 - u(z)) * d_n + u(z) * v

    return s_next, tangent


def _layer_inputs(model: nn.Module, x: torch.Tensor, states) -> list[torch.Tensor]:
    """Each layer's input sequence [B, T, in]: x for layer 0, the lower layer's states above."""
    inputs = [x]
    for layer in range(model.num_layers - 1):
        inputs.append(torch.stack(states.h[layer], dim=1))
    return inputs


def trajectory(model: nn.Module, layer: int, x: torch.Tensor, states, samples: int):
    """(s_prev [T, S, D], xp [T, S, G*H]) of one layer for the first `samples` samples, in
    float64: the state before each step (zeros before step 0) and the step's input projection."""
    w_ih, _, b_ih, _ = (w.detach().double() for w in model.layer_weights(layer))
    layer_input = _layer_inputs(model, x, states)[layer][:samples].detach().double()
    xp = F.linear(layer_input, w_ih, b_ih).transpose(0, 1)  # [T, S, G*H]
    h = torch.stack(states.h[layer], dim=0)[:, :samples].detach().double()  # [T, S, H]
    if model.cell == "lstm":
        h = torch.cat([h, torch.stack(states.c[layer], dim=0)[:, :samples].detach().double()], -1)
    s_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]], dim=0)
    return s_prev, xp


def lyapunov_exponents(
    model: nn.Module, layer: int, x: torch.Tensor, states, k: int, samples: int
) -> np.ndarray:
    """Top-k finite-time Lyapunov exponents [k'] (k' = min(k, state size)), descending, of
    one layer along the trajectory in `states`, averaged over the first `samples` samples."""
    if _uses_generic_jacobian(model):
        return _lyapunov_by_autograd(model, layer, x, states, k, samples)
    s_prev, xp = trajectory(model, layer, x, states, samples)
    T, S, D = s_prev.shape
    k = min(k, D)
    if k == 0:
        return np.zeros(0)
    _, tangent = linearise(model, layer, s_prev, xp)
    generator = torch.Generator().manual_seed(0)
    q0 = torch.linalg.qr(torch.randn(D, k, generator=generator, dtype=torch.float64))[0]
    v = q0.T.to(s_prev.device).expand(S, k, D)  # orthonormal rows
    total = torch.zeros(S, k, dtype=torch.float64, device=s_prev.device)
    for t in range(T):
        q, r = torch.linalg.qr(tangent(t, v).transpose(1, 2))  # [S, D, k], [S, k, k]
        total += torch.diagonal(r, dim1=-2, dim2=-1).abs().log().clamp_min(LOG_FLOOR)
        v = q.transpose(1, 2)
    exponents = (total / T).mean(0)
    return np.sort(exponents.cpu().numpy())[::-1].copy()


def _lyapunov_by_autograd(
    model: nn.Module, layer: int, x: torch.Tensor, states, k: int, samples: int
) -> np.ndarray:
    """The exponents of a cell without a closed-form tangent map (layer or batch norm).

    The finite-time exponents of J_T ... J_1 are those of its transpose J_1^T ... J_T^T, whose
    products are vector-Jacobian products: backpropagation through the layer's own `step`
    (in float64, evaluation mode), from the last step to the first, with the same QR method.
    """
    cell = copy.deepcopy(model.layers[layer]).double().eval()
    layer_input = _layer_inputs(model, x, states)[layer][:samples].detach().double()
    xp = cell.project(layer_input).detach()  # [S, T, G*H]
    h = torch.stack(states.h[layer], dim=0)[:, :samples].detach().double()  # [T, S, H]
    lstm = model.cell == "lstm"
    c = torch.stack(states.c[layer], dim=0)[:, :samples].detach().double() if lstm else None
    T, S, H = h.shape
    D = 2 * H if lstm else H
    k = min(k, D)
    if k == 0:
        return np.zeros(0)
    # the same starting directions on every device: drawn on the CPU, then moved
    generator = torch.Generator().manual_seed(0)
    q0 = torch.linalg.qr(torch.randn(D, k, generator=generator, dtype=torch.float64))[0]
    u = q0.T.expand(S, k, D).to(h.device, copy=True)
    total = h.new_zeros(S, k)
    zeros = h.new_zeros(S, H)
    with torch.enable_grad():
        for t in reversed(range(T)):
            h_prev = (h[t - 1] if t else zeros).clone().requires_grad_(True)
            c_prev = (c[t - 1] if t and lstm else zeros).clone().requires_grad_(lstm)
            (h_next, c_next), _ = cell.step(xp[:, t], (h_prev, c_prev), t)
            out = torch.cat([h_next, c_next], -1) if lstm else h_next
            wrt = [h_prev, c_prev] if lstm else [h_prev]
            rows = []
            for j in range(k):
                grads = torch.autograd.grad(out, wrt, grad_outputs=u[:, j], retain_graph=True)
                rows.append(torch.cat(grads, -1))
            q, r = torch.linalg.qr(torch.stack(rows, 1).transpose(1, 2))
            total += torch.diagonal(r, dim1=-2, dim2=-1).abs().log().clamp_min(LOG_FLOOR)
            u = q.transpose(1, 2)
    exponents = (total / T).mean(0)
    return np.sort(exponents.cpu().numpy())[::-1].copy()


def weight_spectra(model: nn.Module, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(spectral radius [G], largest singular value [G]) of each gate block of W_hh."""
    w = model.recurrent_weight(layer).detach().double()
    H = w.shape[1]
    blocks = w.reshape(-1, H, H)
    radius = torch.linalg.eigvals(blocks).abs().amax(-1)
    singular = torch.linalg.matrix_norm(blocks, ord=2)
    return radius.cpu().numpy(), singular.cpu().numpy()


def saturation(model: nn.Module, pre: list[torch.Tensor]) -> np.ndarray:
    """Saturated fraction [G] of each gate block's entries over steps, samples and units."""
    pre = torch.stack(pre).detach()  # [T, B, G*H]
    kinds = gate_kinds(model)
    fractions = []
    for kind, block in zip(kinds, pre.chunk(len(kinds), dim=-1), strict=True):
        if kind == "tanh":
            saturated = torch.tanh(block).abs() > 0.99
        elif kind == "sigmoid":
            s = torch.sigmoid(block)
            saturated = (s < 0.01) | (s > 0.99)
        elif kind == "relu":
            saturated = torch.relu(block) == 0
        elif kind in ("leaky_relu", "prelu"):  # only the small negative slope passes
            saturated = block < 0
        elif kind == "elu":  # derivative exp(pre) below 0.01
            saturated = block < math.log(0.01)
        else:  # linear: never saturates
            saturated = torch.zeros_like(block, dtype=torch.bool)
        fractions.append(float(saturated.double().mean()))
    return np.array(fractions)


# ---------------------------------------------------------------------------------- norms and fit


def row_norms(grad: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norms [N] of `grad` [N, ...] in float64, scaled by the row's largest entry
    so that squaring never underflows."""
    g = grad.detach().double().reshape(grad.shape[0], -1)
    scale = g.abs().amax(dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (scale * (g / safe).pow(2).sum(dim=1, keepdim=True).sqrt()).squeeze(1)


def _profile(grads: list[list[torch.Tensor | None]], like: list[list[torch.Tensor]]) -> dict:
    """Mean and percentiles over samples of the per-sample norms of each layer's per-step
    gradients (None: unused, zero): [L, T] each."""
    per_sample = []
    for layer_grads, layer_states in zip(grads, like, strict=True):
        g = torch.stack(
            [
                g if g is not None else torch.zeros_like(s)
                for g, s in zip(layer_grads, layer_states, strict=True)
            ]
        )  # [T, B, H]
        per_sample.append(row_norms(g.flatten(0, 1)).reshape(g.shape[:2]))
    norms = torch.stack(per_sample).cpu().numpy()  # [L, T, B]
    out = {"mean": norms.mean(-1)}
    for p in PERCENTILES:
        out[f"p{p}"] = np.percentile(norms, p, axis=-1)
    return out


def fit_decay(g: np.ndarray, underflow: np.ndarray, scored_step: int, tiny: float) -> dict:
    """Fit ln g = a - r d over the steps t < `scored_step` (d = scored_step - t), nearer the
    scored step than the first underflowed one. Returns decay_rate, half_life, horizon,
    horizon_extrapolated, r2 (None where undefined), fit_points and fit_dropped."""
    out: dict[str, Any] = {
        "decay_rate": None,
        "half_life": None,
        "horizon": None,
        "horizon_extrapolated": False,
        "r2": None,
        "fit_points": 0,
        "fit_dropped": 0,
    }
    window = scored_step  # steps 0 .. t*-1, distances t* .. 1
    d = np.arange(1, window + 1)
    gd = g[scored_step - d]
    under = underflow[scored_step - d]
    first_under = int(np.argmax(under)) if under.any() else window
    keep = slice(0, first_under)
    out["fit_points"], out["fit_dropped"] = first_under, window - first_under
    if first_under >= 2:
        dk, yk = d[keep].astype(np.float64), np.log(gd[keep])
        dc = dk - dk.mean()
        slope = float((dc * (yk - yk.mean())).sum() / (dc * dc).sum())
        intercept = float(yk.mean() - slope * dk.mean())
        residual = yk - (intercept + slope * dk)
        ss_res, ss_tot = float((residual**2).sum()), float(((yk - yk.mean()) ** 2).sum())
        rate = -slope
        out["decay_rate"] = rate
        out["r2"] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
        out["half_life"] = math.log(2) / rate if rate > 0 else None
    else:
        intercept = rate = None
    # Horizon: the first distance where the profile falls to 1e-3 of g at the scored step.
    if window == 0 or underflow[scored_step]:
        return out
    threshold = HORIZON_FACTOR * float(g[scored_step])
    for i in range(window):
        if under[i]:
            if threshold >= tiny:  # the true value is below tiny, hence below the threshold
                out["horizon"] = float(d[i])
                return out
            break  # the threshold lies below what this dtype can see: extrapolate
        if gd[i] <= threshold:
            out["horizon"] = float(d[i])
            return out
    if rate is not None and rate > 0:
        horizon = (intercept - math.log(threshold)) / rate
        out["horizon"] = max(horizon, float(first_under + 1))  # the profile saw no fall up to here
        out["horizon_extrapolated"] = True
    return out


# ------------------------------------------------------------------------------------------ probe


def _resolve_dtype(dtype: str | torch.dtype | None, config: AnalysisConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.dtype
    if isinstance(dtype, str):
        require_choice("analysis.dtype", dtype, DTYPES)
        return DTYPES[dtype]
    require(dtype in DTYPES.values(), "analysis.dtype", dtype, "torch.float32 or torch.float64")
    return dtype


def _cast(batch: Batch, dtype: torch.dtype) -> Batch:
    return Batch(*(t.to(dtype) if t.is_floating_point() else t for t in batch))


def probe(
    model: nn.Module,
    task: Task,
    batch: Batch,
    config: AnalysisConfig | None = None,
    *,
    dtype: str | torch.dtype | None = None,
) -> dict[str, Any]:
    """One probe of `model` on `batch` (see the module docstring). `dtype` overrides
    `config.dtype`; a dtype other than the model's runs on a converted deep copy.

    Returns arrays [L, T] (h_grad, h_grad_p10/p50/p90, underflow; c_grad, c_underflow for the
    LSTM), [T] (x_grad), [L] (decay_rate, half_life, horizon, horizon_extrapolated, r2,
    fit_points, fit_dropped, spectral_radius, max_singular, saturation; c_* fits for the
    LSTM), [L, G] (gate_*), [L, k] (lyapunov), [L + 1] (weight_grad), and scalars
    x_grad_informative, scored_step, loss, probe_seconds, cell, dtype, tiny. Per-layer fit
    values that do not exist are NaN here (None in `GradientTracker.summary`).
    """
    config = config or AnalysisConfig()
    dtype = _resolve_dtype(dtype, config)
    started = time.perf_counter()
    first_param = next(model.parameters())
    if first_param.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    batch = _cast(batch, dtype)
    was_training = model.training
    model.eval()
    try:
        result = _probe(model, task, batch, config, dtype)
    finally:
        model.train(was_training)
    result["probe_seconds"] = time.perf_counter() - started
    return result


def _probe(model, task: Task, batch: Batch, config: AnalysisConfig, dtype: torch.dtype) -> dict:
    L = model.num_layers
    tiny = float(torch.finfo(dtype).tiny)
    x = batch.x.detach().clone().requires_grad_(True)
    output, states = model.forward_unrolled(x)
    loss = task.loss(output, batch.y, batch.mask)

    is_lstm = model.cell == "lstm"
    is_mlp = model.cell == "mlp"  # depth plays the part of time: one "layer" of L steps
    if is_mlp:
        layer_params = [list(linear.parameters()) for linear in model.linears]
    else:
        layer_params = [list(model.layer_weights(layer)) for layer in range(L)]
    in_layers = {id(p) for ps in layer_params for p in ps}
    other_params = [p for p in model.parameters() if id(p) not in in_layers]
    param_groups = [*layer_params, other_params]
    flat_params = [p for ps in param_groups for p in ps if p.requires_grad]
    flat_h = [h for hs in states.h for h in hs]
    flat_c = [c for cs in states.c for c in cs] if is_lstm else []
    inputs = [*flat_h, *flat_c, x, *flat_params]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)

    T = len(states.h[0])
    nh, nc = len(flat_h), len(flat_c)
    h_grads = [list(grads[l * T : (l + 1) * T]) for l in range(L)]
    c_grads = [list(grads[nh + l * T : nh + (l + 1) * T]) for l in range(L)] if is_lstm else []
    x_grad = grads[nh + nc]
    param_grads = dict(zip(map(id, flat_params), grads[nh + nc + 1 :], strict=True))

    mask = batch.mask
    scored_columns = mask.any(0).nonzero()
    scored_step = int(scored_columns[0]) if len(scored_columns) else T - 1
    if is_mlp:  # the loss reads the last hidden layer; the fit runs over the ones below it
        scored_step = T - 1

    result: dict[str, Any] = {"loss": float(loss.detach()), "scored_step": scored_step}
    result["cell"] = model.cell
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["tiny"] = tiny

    def profile_and_fit(prefix: str, grads_, states_) -> None:
        prof = _profile(grads_, states_)
        result[f"{prefix}_grad"] = prof["mean"]
        for p in PERCENTILES:
            result[f"{prefix}_grad_p{p}"] = prof[f"p{p}"]
        underflow = prof["mean"] < tiny
        fits = [fit_decay(prof["mean"][l], underflow[l], scored_step, tiny) for l in range(L)]
        name = "" if prefix == "h" else f"{prefix}_"
        result[f"{'' if prefix == 'h' else 'c_'}underflow"] = underflow
        for key in ("decay_rate", "half_life", "horizon", "r2"):
            result[name + key] = np.array([np.nan if f[key] is None else f[key] for f in fits])
        if prefix == "h":
            for key, kind in (("horizon_extrapolated", bool), ("fit_points", int)):
                result[key] = np.array([f[key] for f in fits], dtype=kind)
            result["fit_dropped"] = np.array([f["fit_dropped"] for f in fits], dtype=int)
        else:
            result["c_fit_points"] = np.array([f["fit_points"] for f in fits], dtype=int)

    profile_and_fit("h", h_grads, states.h)
    if is_lstm:
        profile_and_fit("c", c_grads, states.c)

    x_norms = row_norms(
        (x_grad if x_grad is not None else torch.zeros_like(x)).reshape(-1, x.shape[-1])
    ).reshape(x.shape[:2])  # [B, T]
    result["x_grad"] = x_norms.mean(0).cpu().numpy()
    informative = task.informative_positions(batch.x).to(x_norms.device)
    result["x_grad_informative"] = (
        float(x_norms[informative].mean()) if bool(informative.any()) else float("nan")
    )

    def group_norm(params: list[torch.Tensor]) -> float:
        gs = [param_grads.get(id(p)) for p in params if p.requires_grad]
        gs = [g.reshape(1, -1) for g in gs if g is not None]
        return float(row_norms(torch.cat(gs, dim=1))[0]) if gs else 0.0

    result["weight_grad"] = np.array([group_norm(ps) for ps in param_groups])

    if is_mlp:  # no recurrent matrix, no state-to-state Jacobian
        nan = np.full((L, 1), np.nan)
        result["gate_spectral_radius"] = result["gate_max_singular"] = nan
        result["spectral_radius"] = result["max_singular"] = nan[:, 0].copy()
        result["gate_saturation"] = np.stack([saturation(model, states.pre[0])])
        result["saturation"] = result["gate_saturation"].mean(-1)
        result["lyapunov"] = np.full((L, config.lyapunov_k), np.nan)
        return result

    spectra = [weight_spectra(model, layer) for layer in range(L)]
    block = candidate_block(model.cell)
    result["gate_spectral_radius"] = np.stack([s[0] for s in spectra])
    result["gate_max_singular"] = np.stack([s[1] for s in spectra])
    result["spectral_radius"] = result["gate_spectral_radius"][:, block].copy()
    result["max_singular"] = result["gate_max_singular"][:, block].copy()

    gate_sat = np.stack([saturation(model, states.pre[layer]) for layer in range(L)])
    result["gate_saturation"] = gate_sat
    result["saturation"] = gate_sat.mean(-1)  # blocks are the same size

    samples = min(config.lyapunov_samples, x.shape[0])
    result["lyapunov"] = np.stack(
        [
            lyapunov_exponents(model, layer, x.detach(), states, config.lyapunov_k, samples)
            for layer in range(L)
        ]
    )
    return result


# ---------------------------------------------------------------------------------------- tracker


def _json_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class GradientTracker:
    """Probe a model on a fixed batch during training and keep every probe.

    `record(step)` probes now (a no-op when ``config.enabled`` is false); `due(step)` says
    whether `step` is on the probe cadence; `save(path)` writes ``gradients.npz`` and
    `load(path, upto_step)` reads it back; `summary()` and `metrics_record(i)` give JSON-safe
    digests of the top layer.
    """

    def __init__(self, model: nn.Module, task: Task, batch: Batch, config: AnalysisConfig) -> None:
        self.model = model
        self.task = task
        self.batch = batch
        self.config = config
        self.steps: list[int] = []
        self.probes: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return self.config.enabled and step % self.config.every == 0

    def record(self, step: int) -> dict[str, Any] | None:
        if not self.config.enabled:
            return None
        result = probe(self.model, self.task, self.batch, self.config)
        self.steps.append(int(step))
        self.probes.append(result)
        return result

    def arrays(self) -> dict[str, np.ndarray]:
        """Every probe stacked along a first axis [P, ...] (see the module docstring)."""
        out: dict[str, np.ndarray] = {"steps": np.array(self.steps, dtype=np.int64)}
        if not self.probes:
            return out
        first = self.probes[0]
        for key, value in first.items():
            if key in ("cell", "dtype", "tiny"):
                out[key] = np.array(value)
                continue
            out[key] = np.stack([np.asarray(p[key]) for p in self.probes])
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probes to `path` (a folder gets ``gradients.npz``) atomically."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".npz":
            path = path / GRADIENTS_FILE
        with atomic_file(path, "wb") as handle:
            np.savez(handle, **self.arrays())
        return path

    def load(self, path: str | os.PathLike, upto_step: int | None = None) -> None:
        """Replace the recorded probes with those of a saved ``gradients.npz`` (a folder gets
        its ``gradients.npz``), keeping only probes at steps <= `upto_step` when given (to
        resume a run from a checkpoint)."""
        path = Path(path)
        if path.is_dir():
            path = path / GRADIENTS_FILE
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        steps = arrays.pop("steps").astype(int)
        shared = {key: arrays.pop(key) for key in ("cell", "dtype", "tiny") if key in arrays}
        shared = {key: value.item() for key, value in shared.items()}
        self.steps, self.probes = [], []
        for i, step in enumerate(steps):
            if upto_step is not None and step > upto_step:
                continue
            self.steps.append(int(step))
            self.probes.append({**{k: v[i] for k, v in arrays.items()}, **shared})

    def _digest(self, index: int) -> dict[str, Any]:
        p = self.probes[index]
        top = -1
        lyap = p["lyapunov"][top]
        return {
            "step": self.steps[index],
            "decay_rate": _json_float(p["decay_rate"][top]),
            "half_life": _json_float(p["half_life"][top]),
            "horizon": _json_float(p["horizon"][top]),
            "r2": _json_float(p["r2"][top]),
            "top_lyapunov": _json_float(lyap[0]) if len(lyap) else None,
            "spectral_radius": _json_float(p["spectral_radius"][top]),
            "saturation": _json_float(p["saturation"][top]),
            "underflow_steps": int(p["underflow"][top].sum()),
            "x_grad_informative": _json_float(p["x_grad_informative"]),
        }

    def summary(self) -> dict[str, dict[str, Any] | None]:
        """{"init": ..., "final": ...}: the first and the last probe's digest (None if none)."""
        if not self.probes:
            return {"init": None, "final": None}
        return {"init": self._digest(0), "final": self._digest(-1)}

    def metrics_record(self, index: int = -1) -> dict[str, Any]:
        """Flat JSON-safe fields of one probe, to merge into a metrics.jsonl record."""
        d = self._digest(index)
        p = self.probes[index]
        return {
            "grad_decay_rate": d["decay_rate"],
            "grad_half_life": d["half_life"],
            "grad_horizon": d["horizon"],
            "grad_r2": d["r2"],
            "grad_underflow_steps": d["underflow_steps"],
            "grad_x_informative": d["x_grad_informative"],
            "top_lyapunov": d["top_lyapunov"],
            "spectral_radius": d["spectral_radius"],
            "saturation": d["saturation"],
            "probe_seconds": _json_float(p["probe_seconds"]),
        }
