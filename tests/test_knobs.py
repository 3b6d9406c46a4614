"""Causes and remedies as knobs: activations, initialisation, normalisation, clipping, depth,
and the feedforward baseline; each does what it says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seqtest.errors import ConfigError
from seqtest.gradients import AnalysisConfig, probe
from seqtest.init import init_gate_blocks
from seqtest.models import ModelConfig, StepBatchNorm, build_model
from seqtest.tasks.adding import AddingTask
from seqtest.tasks.copying import CopyingTask
from seqtest.train import TrainConfig, clip_gradients

F64 = AnalysisConfig(dtype="float64", lyapunov_k=2, lyapunov_samples=4)


def half_life_at_init(task: AddingTask, **model) -> float:
    torch.manual_seed(0)
    net = build_model(
        dict(hidden_size=64, **model), task.input_size, task.output_size, task.seq_len
    )
    batch = task.sample(16, torch.Generator().manual_seed(1))
    rate = probe(net, task, batch, F64)["decay_rate"][0]
    return math.log(2) / rate if rate > 0 else math.inf


# ------------------------------------------------------------------------------ initialisation


def test_orthogonal_and_identity_make_each_gate_block_what_they_say():
    w = torch.empty(4 * 16, 16)
    init_gate_blocks(w, 4, "orthogonal", gain=1.5)
    for block in w.chunk(4):
        assert torch.allclose(block @ block.T, 2.25 * torch.eye(16), atol=1e-5)
    init_gate_blocks(w, 4, "identity", gain=0.5)
    assert all(torch.equal(block, 0.5 * torch.eye(16)) for block in w.chunk(4))
    with pytest.raises(ConfigError, match="square"):
        init_gate_blocks(torch.empty(8, 3), 1, "identity")


@pytest.mark.parametrize(
    "scheme,variance",
    [
        ("xavier_uniform", 2 / (400 + 300)),
        ("xavier_normal", 2 / (400 + 300)),
        ("kaiming_uniform", 2 / 300),
        ("kaiming_normal", 2 / 300),
        ("normal", 0.05**2),
    ],
)
def test_random_schemes_have_the_variance_they_promise(scheme, variance):
    torch.manual_seed(0)
    w = torch.empty(400, 300)
    init_gate_blocks(w, 1, scheme, gain=1.0, std=0.05)
    assert w.var().item() == pytest.approx(variance, rel=0.03)
    assert abs(w.mean().item()) < 0.05 * math.sqrt(variance)


def test_model_applies_the_schemes_and_the_forget_bias():
    model = build_model(
        dict(cell="lstm", hidden_size=8, init_recurrent="orthogonal", init_input="normal",
             init_std=1e-3, forget_bias=3.0),
        2, 1,
    )  # fmt: skip
    w_ih, w_hh, b_ih, b_hh = model.layer_weights(0)
    for block in w_hh.detach().chunk(4):
        assert torch.allclose(block @ block.T, torch.eye(8), atol=1e-5)
    assert w_ih.detach().std().item() < 2e-3
    assert torch.allclose(b_ih[8:16] + b_hh[8:16], torch.full((8,), 3.0))


def test_irnn_preset_is_relu_with_identity_recurrence(make_cfg):
    from omegaconf import OmegaConf

    config = ModelConfig(**OmegaConf.to_container(make_cfg("model=irnn").model))
    model = build_model(config, 2, 1)
    assert config.activation == "relu"
    assert torch.equal(model.recurrent_weight(0).detach(), torch.eye(128))


# ---------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "leaky_relu", "elu", "prelu"])
def test_every_activation_runs_its_own_step_and_matches_the_reference(activation):
    torch.manual_seed(0)
    model = build_model(dict(cell="rnn", hidden_size=5, activation=activation), 3, 2).double()
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    w_ih, w_hh, b_ih, b_hh = model.layer_weights(0)
    reference = {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu,
        "leaky_relu": lambda a: torch.where(a > 0, a, 0.01 * a),
        "elu": lambda a: torch.where(a > 0, a, torch.exp(a) - 1),
        "prelu": lambda a: torch.where(a > 0, a, 0.01 * a),  # initial slope = leaky_slope
    }[activation]  # fmt: skip
    h = torch.zeros(4, 5, dtype=torch.float64)
    outputs = []
    for t in range(7):
        h = reference(x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh)
        outputs.append(model.readout(h))
    assert torch.allclose(model(x), torch.stack(outputs, 1), atol=1e-12)
    assert model.config.fused == (activation in ("tanh", "relu"))


def test_prelu_slope_is_learnable():
    model = build_model(dict(cell="rnn", hidden_size=4, activation="prelu"), 2, 1)
    slopes = [p for name, p in model.named_parameters() if "activation" in name]
    assert slopes and slopes[0].shape == (4,)
    model(torch.randn(3, 5, 2)).sum().backward()
    assert slopes[0].grad is not None and slopes[0].grad.abs().sum() > 0


def test_saturating_activations_shorten_the_gradient_half_life_at_init():
    """Measured ordering on the adding problem (T=100, H=64, default init): sigmoid decays
    fastest; a ReLU RNN with PyTorch's default init also decays faster than tanh (half its
    units are off at each step); relu with identity recurrence (IRNN) does not decay."""
    task = AddingTask(length=100)
    sigmoid = half_life_at_init(task, cell="rnn", activation="sigmoid")
    tanh = half_life_at_init(task, cell="rnn")
    relu = half_life_at_init(task, cell="rnn", activation="relu")
    irnn = half_life_at_init(
        task, cell="rnn", activation="relu", init_recurrent="identity", init_input="normal",
        init_std=0.001,
    )  # fmt: skip
    assert sigmoid < relu < tanh < irnn
    assert irnn > 20 * tanh


# ---------------------------------------------------------------------------------- normalisation


def test_layer_norm_rnn_normalises_every_pre_activation():
    torch.manual_seed(0)
    model = build_model(dict(cell="rnn", hidden_size=16, norm="layer"), 3, 1)
    _, states = model.forward_unrolled(torch.randn(5, 6, 3) * 10)
    pre = torch.stack(states.pre[0])  # [T, B, H]
    assert torch.allclose(pre.mean(-1), torch.zeros(6, 5), atol=1e-5)
    assert torch.allclose(pre.var(-1, unbiased=False), torch.ones(6, 5), atol=1e-3)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_recurrent_batch_norm_keeps_per_step_statistics(cell):
    torch.manual_seed(0)
    model = build_model(dict(cell=cell, hidden_size=6, norm="batch", bn_max_steps=4), 3, 1)
    layer = model.layers[0]
    bn = layer.norm_x
    assert torch.allclose(bn.weight, torch.full_like(bn.weight, 0.1))  # gamma starts at 0.1
    x = torch.randn(32, 6, 3) + torch.arange(6.0).view(1, 6, 1)  # each step its own mean
    model.train()
    model(x)
    w_x = x @ layer.weights()[0].detach().T  # [B, T, G*H], what norm_x sees
    for t in range(3):  # steps below the maximum: their own statistics (momentum 0.1 from 0)
        assert torch.allclose(bn.running_mean[t], 0.1 * w_x[:, t].mean(0), atol=1e-5)
    # steps 3, 4 and 5 share the last slot: three updates
    assert not torch.allclose(bn.running_mean[3], 0.1 * w_x[:, 3].mean(0), atol=1e-5)

    # evaluation uses the running statistics: a sample's output no longer depends on its batch
    model.eval()
    alone, together = model(x[:1]), model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-6)
    model.train()
    assert not torch.allclose(model(x[:1].repeat(2, 1, 1))[:1], model(x)[:1], atol=1e-4)


def test_step_batch_norm_in_eval_uses_running_estimates():
    bn = StepBatchNorm(3, max_steps=2)
    bn.running_mean[1] = torch.tensor([1.0, 2.0, 3.0])
    bn.running_var[1] = torch.tensor([4.0, 4.0, 4.0])
    bn.eval()
    out = bn(torch.tensor([[3.0, 2.0, 1.0]]), step=5)  # beyond the maximum: the last slot
    assert torch.allclose(out, 0.1 * torch.tensor([[1.0, 0.0, -1.0]]), atol=1e-5)


@pytest.mark.parametrize("preset", ["ln_lstm", "bn_lstm", "ln_rnn", "bn_rnn"])
def test_normalised_presets_unrolled_twin_and_analysis_run(preset, make_cfg):
    from omegaconf import OmegaConf

    config = ModelConfig(**OmegaConf.to_container(make_cfg(f"model={preset}").model))
    config.hidden_size = 8
    task = AddingTask(length=12)
    model = build_model(config, 2, 1).eval()
    batch = task.sample(6, torch.Generator().manual_seed(0))
    assert torch.allclose(model(batch.x), model.forward_unrolled(batch.x)[0])
    result = probe(model, task, batch, AnalysisConfig(lyapunov_k=3, lyapunov_samples=3))
    assert np.isfinite(result["lyapunov"]).all() and np.isfinite(result["decay_rate"]).all()
    # autograd exponents agree with the measured decay to the same order
    assert abs(result["lyapunov"][0, 0] + result["decay_rate"][0]) < 0.5


# ------------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_caps_every_step(mode):
    torch.manual_seed(0)
    model = build_model(dict(cell="rnn", hidden_size=8), 2, 1)
    params = list(model.parameters())
    for scale in (1e-3, 1.0, 1e3):
        for p in params:
            p.grad = torch.randn_like(p) * scale
        before = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        norm, clipped = clip_gradients(params, 0.5, mode)
        assert norm.item() == pytest.approx(before.item(), rel=1e-6)  # pre-clip norm returned
        after = torch.cat([p.grad.flatten() for p in params])
        if mode == "norm":
            assert torch.linalg.vector_norm(after) <= 0.5 * (1 + 1e-5)
        else:
            assert after.abs().max() <= 0.5
        assert bool(clipped) == (scale > 1e-2)


def test_bad_clip_mode_is_rejected():
    with pytest.raises(ConfigError, match="train.clip_mode"):
        TrainConfig(clip_mode="sometimes")


# -------------------------------------------------------------------------------- depth, residual


def test_residual_connections_add_each_layers_input():
    torch.manual_seed(0)
    plain = build_model(dict(cell="gru", hidden_size=4, num_layers=3), 2, 1)
    torch.manual_seed(0)
    residual = build_model(dict(cell="gru", hidden_size=4, num_layers=3, residual=True), 2, 1)
    x = torch.randn(2, 5, 2)
    h1 = plain.layers[0](x)
    h2 = plain.layers[1](h1) + h1
    h3 = plain.layers[2](h2) + h2
    assert torch.allclose(residual(x), plain.readout(h3), atol=1e-6)
    assert torch.allclose(residual(x), residual.forward_unrolled(x)[0], atol=1e-6)


# ---------------------------------------------------------------------------- feedforward baseline


def test_mlp_reads_the_flattened_sequence_and_answers_at_the_last_step():
    task = AddingTask(length=6)
    model = build_model(dict(cell="mlp", hidden_size=8, num_layers=3), 2, 1, seq_len=6)
    x = task.sample(4, torch.Generator().manual_seed(0)).x
    out = model(x)
    assert out.shape == (4, 6, 1) and (out[:, :-1] == 0).all()
    a = x.flatten(1)
    for linear in model.linears:
        a = torch.tanh(linear(a)) if model.config.activation == "tanh" else torch.relu(linear(a))
    assert torch.allclose(out[:, -1], model.readout(a), atol=1e-6)


def test_mlp_on_a_task_scored_everywhere_is_rejected(make_cfg, tmp_path):
    from seqtest.run import run

    cfg = make_cfg("model=mlp", "task=copying", "task.length=5", "train.steps=2")
    with pytest.raises(ConfigError, match="model='mlp' is invalid: expected a task scored at the"):
        run(cfg, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
    assert CopyingTask(length=5).seq_len == 25


def test_deep_sigmoid_mlp_gradient_decays_faster_than_relu_with_he_init():
    task = AddingTask(length=10)
    batch = task.sample(32, torch.Generator().manual_seed(0))

    def rate(**kw) -> float:
        torch.manual_seed(0)
        model = build_model(dict(cell="mlp", hidden_size=64, num_layers=20, **kw), 2, 1, 10)
        result = probe(model, task, batch, F64)
        assert result["h_grad"].shape == (1, 20)  # one entry per hidden layer
        return result["decay_rate"][0]

    sigmoid = rate(activation="sigmoid")
    relu_he = rate(activation="relu", init_input="kaiming_normal", init_recurrent="kaiming_normal")
    assert sigmoid > 1.0  # sigmoid' <= 1/4: more than a factor e lost per layer
    assert abs(relu_he) < 0.15  # He init keeps the gradient's scale through depth
    assert sigmoid > relu_he + 1.0
