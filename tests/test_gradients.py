"""Tests of the gradient-decay analysis against cases with known answers and against an
independent re-run of the recurrence."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqtest.errors import ConfigError
from seqtest.gradients import (
    AnalysisConfig,
    GradientTracker,
    linearise,
    probe,
    trajectory,
)
from seqtest.models import States, build_model
from seqtest.plots import plot_gradients
from seqtest.tasks._base import Batch
from seqtest.tasks.adding import AddingTask
from seqtest.tasks.copying import CopyingTask

F64 = torch.float64


class LinearRNN(nn.Module):
    """h_t = W_hh h_{t-1} + W_ih x_t: a one-layer RNN without a nonlinearity, behind the
    interface the analysis uses."""

    cell = "rnn"
    num_layers = 1

    def __init__(self, w_hh: torch.Tensor, input_size: int = 2, output_size: int = 1) -> None:
        super().__init__()
        H = w_hh.shape[0]
        self.config = SimpleNamespace(hidden_size=H, num_layers=1, activation="linear")
        g = torch.Generator().manual_seed(0)
        self.weight_ih = nn.Parameter(torch.randn(H, input_size, generator=g, dtype=w_hh.dtype))
        self.weight_hh = nn.Parameter(w_hh.clone())
        self.bias_ih = nn.Parameter(torch.zeros(H, dtype=w_hh.dtype))
        self.bias_hh = nn.Parameter(torch.zeros(H, dtype=w_hh.dtype))
        self.readout = nn.Linear(H, output_size).to(w_hh.dtype)
        with torch.no_grad():
            self.readout.weight.copy_(torch.randn(output_size, H, generator=g))

    def layer_weights(self, layer: int):
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def recurrent_weight(self, layer: int) -> torch.Tensor:
        return self.weight_hh

    def forward_unrolled(self, x: torch.Tensor):
        h = x.new_zeros(x.shape[0], self.config.hidden_size)
        hs, pres = [], []
        for xp in F.linear(x, self.weight_ih, self.bias_ih).unbind(1):
            h = xp + F.linear(h, self.weight_hh, self.bias_hh)
            hs.append(h)
            pres.append(h)
        return self.readout(torch.stack(hs, dim=1)), States(h=[hs], pre=[pres])


def orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def adding_batch(length: int, batch_size: int = 8, seed: int = 0) -> tuple[AddingTask, Batch]:
    task = AddingTask(length=length)
    return task, task.sample(batch_size, torch.Generator().manual_seed(seed))


def tiny_model(cell: str, hidden: int = 5, layers: int = 2, activation: str = "tanh", seed=0):
    torch.manual_seed(seed)
    config = dict(cell=cell, hidden_size=hidden, num_layers=layers, activation=activation)
    return build_model(config, 2, 1)


CF64 = AnalysisConfig(dtype="float64")


# ------------------------------------------------------------------------- known answers


@pytest.mark.parametrize(
    ("a", "length", "horizon", "extrapolated"),
    [
        (0.8, 40, 31.0, False),  # 0.8^31 <= 1e-3 < 0.8^30, inside the 39-step window
        (0.95, 40, math.log(1e3) / -math.log(0.95), True),  # 0.95^39 > 1e-3: from the fit
        (1.1, 40, None, False),  # exploding: no half-life, no horizon
    ],
)
def test_linear_orthogonal_rnn_has_exact_geometric_profile(a, length, horizon, extrapolated):
    model = LinearRNN(a * orthogonal(6))
    task, batch = adding_batch(length)
    r = probe(model, task, batch, CF64)
    T = length
    expected = a ** (T - 1 - np.arange(T))
    for key in ("h_grad", "h_grad_p10", "h_grad_p50", "h_grad_p90"):
        np.testing.assert_allclose(r[key][0] / r[key][0, -1], expected, rtol=1e-10)
    assert r["scored_step"] == T - 1
    assert r["decay_rate"][0] == pytest.approx(-math.log(a), rel=1e-9)
    assert r["r2"][0] == pytest.approx(1.0, abs=1e-9)
    assert r["fit_points"][0] == T - 1 and r["fit_dropped"][0] == 0
    np.testing.assert_allclose(r["lyapunov"][0], math.log(a), rtol=1e-9)
    assert r["lyapunov"].shape == (1, 5)
    np.testing.assert_allclose(r["spectral_radius"], a, rtol=1e-9)
    np.testing.assert_allclose(r["max_singular"], a, rtol=1e-9)
    if a < 1:
        assert r["half_life"][0] == pytest.approx(math.log(2) / -math.log(a), rel=1e-9)
        assert r["horizon"][0] == pytest.approx(horizon, rel=1e-9)
        assert bool(r["horizon_extrapolated"][0]) is extrapolated
    else:
        assert r["decay_rate"][0] < 0
        assert np.isnan(r["half_life"][0]) and np.isnan(r["horizon"][0])
    assert r["saturation"][0] == 0.0


def test_diagonal_recurrence_exponents_are_log_magnitudes():
    w = torch.tensor([0.9, -0.7, 0.2, 0.5, -0.3, 1.05], dtype=F64)
    model = LinearRNN(torch.diag(w))
    task, batch = adding_batch(400, batch_size=2)
    r = probe(model, task, batch, AnalysisConfig(dtype="float64", lyapunov_k=5))
    expected = np.sort(np.log(np.abs(w.numpy())))[::-1][:5]
    np.testing.assert_allclose(r["lyapunov"][0], expected, atol=0.01)
    # The exponents are distinct: a QR started from the first basis vectors, or one
    # that forgets to re-orthonormalise, would not recover them in order.
    assert np.all(np.diff(r["lyapunov"][0]) < -0.05)


def test_lstm_with_pinned_forget_gate_decays_at_minus_log_f():
    H, f = 6, 0.9
    model = tiny_model("lstm", hidden=H, layers=1).double()
    w_ih, w_hh, b_ih, b_hh = model.layer_weights(0)
    with torch.no_grad():
        for rows, bias in ((slice(H, 2 * H), math.log(f / (1 - f))), (slice(3 * H, 4 * H), -12.0)):
            w_ih[rows] = 0
            w_hh[rows] = 0
            b_ih[rows] = bias
            b_hh[rows] = 0
    task, batch = adding_batch(60)
    r = probe(model, task, batch, CF64)
    assert r["c_decay_rate"][0] == pytest.approx(-math.log(f), abs=1e-4)
    assert r["c_r2"][0] > 0.9999
    # The forget gate is the only path that carries state: the top exponent is ln f (to the
    # O(1/T) transient of a finite-time exponent started from a random direction).
    assert r["lyapunov"][0, 0] == pytest.approx(math.log(f), abs=0.01)


def test_lyapunov_exponent_predicts_the_decay_rate_at_init():
    task, batch = adding_batch(100, batch_size=16)
    for cell in ("rnn", "lstm", "gru"):
        r = probe(tiny_model(cell, hidden=32, layers=1), task, batch, CF64)
        rate, top = r["decay_rate"][0], r["lyapunov"][0, 0]
        assert rate > 0 and top < 0
        assert rate == pytest.approx(-top, rel=0.2), cell


def test_small_weight_rnn_forgets_faster_than_lstm():
    task, batch = adding_batch(100, batch_size=16)
    rnn = tiny_model("rnn", hidden=32, layers=1)
    with torch.no_grad():
        rnn.recurrent_weight(0).mul_(0.1)
    lstm = tiny_model("lstm", hidden=32, layers=1)  # forget bias 1
    half_rnn = probe(rnn, task, batch)["half_life"][0]
    half_lstm = probe(lstm, task, batch)["half_life"][0]
    assert 0 < half_rnn < half_lstm / 3


# ------------------------------------------------------- agreement with an independent re-run


def rerun(model, batch: Batch, task, dh: torch.Tensor, dc: torch.Tensor):
    """A float64 re-run of `model` written with PyTorch's cell functions (the LSTM's
    equations by hand, to reach c_t), adding dh[l, t] to every h_t and dc[l, t] to every
    LSTM c_t ([L, T, B, H]). At zero perturbation, the gradients of the loss with respect to
    dh and dc are the total derivatives dL/dh_t and dL/dc_t. Returns (loss, x, weights)."""
    cell, L, H = model.cell, model.num_layers, model.config.hidden_size
    x = batch.x.double().requires_grad_(True)
    B, T, _ = x.shape
    weights = [
        [w.detach().double().requires_grad_(True) for w in model.layer_weights(layer)]
        for layer in range(L)
    ]
    layer_input = x
    for layer in range(L):
        w_ih, w_hh, b_ih, b_hh = weights[layer]
        h = c = x.new_zeros(B, H)
        hs = []
        for t in range(T):
            xt = layer_input[:, t]
            if cell == "rnn":
                h = torch.rnn_tanh_cell(xt, h, w_ih, w_hh, b_ih, b_hh)
            elif cell == "gru":
                h = torch.gru_cell(xt, h, w_ih, w_hh, b_ih, b_hh)
            else:
                i, f, g, o = (F.linear(xt, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g) + dc[layer, t]
                h = torch.sigmoid(o) * torch.tanh(c)
            h = h + dh[layer, t]
            hs.append(h)
        layer_input = torch.stack(hs, dim=1)
    w_out, b_out = model.readout.weight.double(), model.readout.bias.double()
    loss = task.loss(F.linear(layer_input, w_out, b_out), batch.y.double(), batch.mask)
    return loss, x, weights


def sample_stats(norms: torch.Tensor) -> dict:
    """Mean and percentiles over the last axis (samples)."""
    n = norms.detach().numpy()
    return {
        "h_grad": n.mean(-1),
        **{f"h_grad_p{p}": np.percentile(n, p, axis=-1) for p in (10, 50, 90)},
    }


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_gradients_match_an_independent_rerun(cell):
    model = tiny_model(cell)
    task, batch = adding_batch(12, batch_size=6)
    L, T, B, H = 2, 12, 6, 5
    dh = torch.zeros(L, T, B, H, dtype=F64, requires_grad=True)
    dc = torch.zeros(L, T, B, H, dtype=F64, requires_grad=True)
    loss, x, weights = rerun(model, batch, task, dh, dc)
    fused = task.loss(model(batch.x), batch.y, batch.mask)
    assert loss.item() == pytest.approx(fused.item(), rel=1e-5)
    flat_w = [w for ws in weights for w in ws]
    g_dh, g_dc, g_x, *g_w = torch.autograd.grad(loss, [dh, dc, x, *flat_w], allow_unused=True)

    r = probe(model, task, batch, CF64)
    for key, value in sample_stats(g_dh.norm(dim=-1)).items():  # norms [L, T, B]
        np.testing.assert_allclose(r[key], value, rtol=1e-5, err_msg=key)
    if cell == "lstm":
        np.testing.assert_allclose(r["c_grad"], g_dc.norm(dim=-1).mean(-1), rtol=1e-5)
    else:
        assert "c_grad" not in r
    # The gradient still reaches step 0, so the comparison covers every step.
    assert (r["h_grad"][:, 0] > 1e-12).all()

    x_norms = g_x.norm(dim=-1)  # [B, T]
    np.testing.assert_allclose(r["x_grad"], x_norms.mean(0).numpy(), rtol=1e-5)
    informative = task.informative_positions(batch.x)
    assert r["x_grad_informative"] == pytest.approx(float(x_norms[informative].mean()), rel=1e-5)

    per_layer = [
        torch.cat([g.reshape(-1) for g in g_w[4 * i : 4 * i + 4]]).norm() for i in range(L)
    ]
    np.testing.assert_allclose(r["weight_grad"][:L], torch.stack(per_layer).numpy(), rtol=1e-5)
    readout = torch.autograd.grad(fused, list(model.readout.parameters()))
    assert r["weight_grad"][L] == pytest.approx(
        float(torch.cat([g.reshape(-1) for g in readout]).norm()), rel=1e-5
    )

    # Central differences on one hidden state confirm the re-run's own gradient.
    layer, t, eps = 0, 3, 1e-6
    v = torch.randn(B, H, generator=torch.Generator().manual_seed(1), dtype=F64)

    def loss_at(scale: float) -> float:
        perturbation = torch.zeros(L, T, B, H, dtype=F64)
        perturbation[layer, t] = scale * v
        return rerun(model, batch, task, perturbation, torch.zeros_like(perturbation))[0].item()

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert fd == pytest.approx(float((g_dh[layer, t] * v).sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("cell", "activation"), [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]
)
def test_unrolled_twin_matches_the_fused_model(cell, activation):
    model = tiny_model(cell, activation=activation)
    task, batch = adding_batch(15, batch_size=4)
    params = list(model.parameters())
    fused = task.loss(model(batch.x), batch.y, batch.mask)
    unrolled = task.loss(model.forward_unrolled(batch.x)[0], batch.y, batch.mask)
    assert unrolled.item() == pytest.approx(fused.item(), rel=1e-5)
    grads = zip(
        torch.autograd.grad(fused, params), torch.autograd.grad(unrolled, params), strict=True
    )
    for a, b in grads:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("cell", "activation"), [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]
)
def test_linearisation_matches_the_model_and_autograd(cell, activation):
    model = tiny_model(cell, hidden=4, activation=activation).double()
    task, batch = adding_batch(7, batch_size=3)
    x = batch.x.double()
    _, states = model.forward_unrolled(x)
    for layer in range(model.num_layers):
        s_prev, xp = trajectory(model, layer, x, states, samples=3)
        s_next, tangent = linearise(model, layer, s_prev, xp)
        # The state map reproduces the model's own trajectory ...
        torch.testing.assert_close(s_next[:-1], s_prev[1:], rtol=1e-12, atol=1e-12)
        # ... and the tangent map is its Jacobian.
        D = s_prev.shape[-1]
        eye = torch.eye(D, dtype=F64).expand(3, D, D)
        for t in (0, 4):
            for s in range(3):

                def step(state, t=t, s=s, layer=layer, xp=xp):
                    return linearise(model, layer, state[None, None], xp[t : t + 1, s : s + 1])

                jac = torch.autograd.functional.jacobian(lambda z: step(z)[0][0, 0], s_prev[t, s])
                torch.testing.assert_close(tangent(t, eye)[s].T, jac, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- underflow


@pytest.mark.parametrize("flush", [False, True])
def test_float32_underflow_is_flagged_and_the_fit_stays_finite(flush):
    a, T = 0.3, 100
    model = LinearRNN(a * orthogonal(6)).float()
    task, batch = adding_batch(T)
    supported = torch.set_flush_denormal(flush)
    if flush and not supported:
        pytest.skip("flushing subnormals is not supported on this CPU")
    try:
        r32 = probe(model, task, batch, AnalysisConfig(dtype="float32"))
    finally:
        torch.set_flush_denormal(False)
    r64 = probe(model, task, batch, AnalysisConfig(dtype="float64"))

    under = r32["underflow"][0]
    tiny = torch.finfo(torch.float32).tiny
    assert under.any() and not under[-10:].any()
    # The flag marks exactly the steps below float32's smallest normal number, which float64
    # measures: g_64 * (1 + margin) < tiny where flagged, above where not.
    true_g = r64["h_grad"][0]
    assert (true_g[under] < tiny * 1.01).all() and (true_g[~under] > tiny * 0.99).all()
    dropped = int(r32["fit_dropped"][0])
    assert dropped == under.sum() and r32["fit_points"][0] == T - 1 - dropped
    for key in ("h_grad", "h_grad_p10", "h_grad_p50", "h_grad_p90", "x_grad", "lyapunov"):
        assert np.isfinite(r32[key]).all(), key
    for key in ("decay_rate", "half_life", "horizon", "r2"):
        assert np.isfinite(r32[key]).all(), key
    assert r32["decay_rate"][0] == pytest.approx(-math.log(a), rel=1e-3)

    assert not r64["underflow"].any()
    assert r64["fit_points"][0] == T - 1 > r32["fit_points"][0]
    # (float32 weights are orthogonal only to float32 precision)
    assert r64["decay_rate"][0] == pytest.approx(-math.log(a), rel=1e-6)


def test_all_steps_scored_gives_an_empty_fit_not_an_error():
    task = CopyingTask(length=6, num_symbols=3, alphabet_size=4)
    batch = task.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(dict(cell="gru", hidden_size=4), task.input_size, task.output_size)
    tracker = GradientTracker(model, task, batch, AnalysisConfig())
    r = tracker.record(0)
    assert r["scored_step"] == 0 and r["fit_points"][0] == 0
    final = tracker.summary()["final"]
    assert final["decay_rate"] is None and final["half_life"] is None and final["horizon"] is None


# ----------------------------------------------------------------------- spectra, saturation


def test_spectra_per_gate_block_and_candidate():
    H = 3
    model = tiny_model("lstm", hidden=H, layers=1)
    scales = torch.tensor([0.5, 0.8, 2.0, 0.1])
    with torch.no_grad():
        w_hh = model.recurrent_weight(0)
        for block, scale in enumerate(scales):
            w_hh[block * H : (block + 1) * H] = torch.diag(torch.tensor([scale, -scale / 2, 0.0]))
    task, batch = adding_batch(5, batch_size=2)
    r = probe(model, task, batch)
    np.testing.assert_allclose(r["gate_spectral_radius"][0], scales.numpy(), rtol=1e-6)
    np.testing.assert_allclose(r["gate_max_singular"][0], scales.numpy(), rtol=1e-6)
    assert r["spectral_radius"][0] == pytest.approx(2.0) == r["max_singular"][0]  # g block


def test_saturation_counts_saturated_gates():
    H = 4
    model = tiny_model("lstm", hidden=H, layers=1)
    with torch.no_grad():
        for w in model.layer_weights(0):
            w.zero_()
        b_ih = model.layer_weights(0)[2]
        b_ih[: 2 * H] = 8.0  # i, f: sigmoid > 0.99
        b_ih[3 * H :] = -8.0  # o: sigmoid < 0.01; g stays at tanh(0) = 0
    task, batch = adding_batch(5, batch_size=2)
    r = probe(model, task, batch)
    np.testing.assert_allclose(r["gate_saturation"][0], [1.0, 1.0, 0.0, 1.0])
    assert r["saturation"][0] == pytest.approx(0.75)

    relu = tiny_model("rnn", hidden=H, layers=1, activation="relu")
    with torch.no_grad():
        relu.layer_weights(0)[2].fill_(-100.0)  # every unit is dead
    assert probe(relu, task, batch)["saturation"][0] == 1.0


# ------------------------------------------------------------------------- contract, tracker


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_probe_leaves_the_model_untouched(dtype):
    model = tiny_model("lstm")
    before = [p.detach().clone() for p in model.parameters()]
    task, batch = adding_batch(8)
    for training in (True, False):
        model.train(training)
        probe(model, task, batch, AnalysisConfig(dtype=dtype))
        assert model.training is training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="analysis.dtype"):
        AnalysisConfig(dtype="float16")
    with pytest.raises(ConfigError, match="analysis.every"):
        AnalysisConfig(every=0)
    with pytest.raises(ConfigError, match="analysis.lyapunov_k"):
        AnalysisConfig(lyapunov_k=-1)
    assert probe(tiny_model("rnn"), *adding_batch(6), AnalysisConfig(lyapunov_k=0))[
        "lyapunov"
    ].shape == (2, 0)


def test_tracker_saves_npz_summary_and_plots(tmp_path):
    model = tiny_model("lstm")
    task, batch = adding_batch(10, batch_size=4)
    tracker = GradientTracker(model, task, batch, AnalysisConfig(every=5))
    assert tracker.due(0) and tracker.due(10) and not tracker.due(3)
    tracker.record(0)
    with torch.no_grad():
        model.recurrent_weight(0).mul_(3.0)
    tracker.record(10)
    path = tracker.save(tmp_path)
    assert path == tmp_path / "gradients.npz"
    data = np.load(path)  # no pickled objects
    P, L, T = 2, 2, 10
    shapes = {
        "steps": (P,),
        "h_grad": (P, L, T),
        "h_grad_p10": (P, L, T),
        "h_grad_p90": (P, L, T),
        "c_grad": (P, L, T),
        "underflow": (P, L, T),
        "x_grad": (P, T),
        "x_grad_informative": (P,),
        "decay_rate": (P, L),
        "half_life": (P, L),
        "horizon": (P, L),
        "r2": (P, L),
        "lyapunov": (P, L, 5),
        "spectral_radius": (P, L),
        "max_singular": (P, L),
        "gate_spectral_radius": (P, L, 4),
        "saturation": (P, L),
        "weight_grad": (P, L + 1),
    }
    for key, shape in shapes.items():
        assert data[key].shape == shape, key
    assert data["underflow"].dtype == bool
    assert data["steps"].tolist() == [0, 10] and str(data["cell"]) == "lstm"
    radius = data["spectral_radius"]
    assert radius[1, 0] == pytest.approx(3 * radius[0, 0], rel=1e-5)

    summary = tracker.summary()
    json.dumps(summary, allow_nan=False)
    for key in (
        "decay_rate",
        "half_life",
        "horizon",
        "r2",
        "top_lyapunov",
        "saturation",
        "underflow_steps",
        "x_grad_informative",
    ):
        assert key in summary["init"] and key in summary["final"]
    assert summary["final"]["step"] == 10
    record = tracker.metrics_record(-1)
    json.dumps(record, allow_nan=False)
    assert {"grad_decay_rate", "grad_half_life", "top_lyapunov", "saturation"} <= set(record)

    resumed = GradientTracker(model, task, batch, AnalysisConfig(every=5))
    resumed.load(path, upto_step=5)
    assert resumed.steps == [0] and resumed.summary()["final"] == summary["init"]
    resumed.load(tmp_path)
    assert resumed.summary() == summary
    for key, value in tracker.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[key], value, err_msg=key)

    written = plot_gradients(path, tmp_path / "plots")
    names = {"grad_profile.png", "grad_heatmap.png", "half_life.png"}
    assert {p.name for p in written} == names
    for name in names:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in plot_gradients(tracker.arrays(), tmp_path / "again")} == names


def test_disabled_tracker_records_nothing(tmp_path):
    task, batch = adding_batch(6)
    tracker = GradientTracker(tiny_model("rnn"), task, batch, AnalysisConfig(enabled=False))
    assert tracker.record(0) is None and not tracker.due(0)
    assert tracker.summary() == {"init": None, "final": None}
