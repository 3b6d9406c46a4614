"""The models: shapes, batch-first layout, and the unrolled twin equal to the fused kernels."""

from __future__ import annotations

import pytest
import torch

from seqtest.errors import ConfigError
from seqtest.models import ModelConfig, build_model, count_parameters

CELLS = ["rnn", "lstm", "gru"]


def make(cell: str, layers: int = 2, **kw):
    torch.manual_seed(0)
    return build_model(dict(cell=cell, hidden_size=6, num_layers=layers, **kw), 3, 2)


@pytest.mark.parametrize("cell", CELLS)
def test_output_is_batch_first_and_causal(cell):
    model = make(cell)
    x = torch.randn(4, 9, 3)
    out = model(x)
    assert out.shape == (4, 9, 2)
    # changing step 5 of sample 1 changes neither earlier steps nor other samples
    x2 = x.clone()
    x2[1, 5] += 1.0
    out2 = model(x2)
    assert torch.equal(out[:, :5], out2[:, :5])
    assert torch.equal(out[[0, 2, 3]], out2[[0, 2, 3]])
    assert not torch.allclose(out[1, 5:], out2[1, 5:])


@pytest.mark.parametrize(
    "cell,activation", [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]
)
def test_unrolled_twin_matches_fused_forward_and_gradients(cell, activation):
    model = make(cell, activation=activation).double()
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    fused = model(x)
    unrolled, states = model.forward_unrolled(x)
    assert torch.allclose(fused, unrolled, atol=1e-12)
    assert len(states.h) == 2 and len(states.h[0]) == 8 and states.h[0][0].shape == (5, 6)
    assert len(states.c) == (2 if cell == "lstm" else 0)
    grads_fused = torch.autograd.grad(fused.square().sum(), list(model.parameters()))
    grads_unrolled = torch.autograd.grad(unrolled.square().sum(), list(model.parameters()))
    for a, b in zip(grads_fused, grads_unrolled, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_forget_bias_is_the_sum_of_both_lstm_biases():
    model = make("lstm", forget_bias=2.5)
    H = 6
    for layer in range(2):
        _, _, b_ih, b_hh = model.layer_weights(layer)
        assert torch.allclose(b_ih[H : 2 * H] + b_hh[H : 2 * H], torch.full((H,), 2.5))
        assert not torch.allclose(b_ih[:H], torch.full((H,), 2.5))  # other gates untouched


def test_parameter_count_matches_the_cell_equations():
    I, H, O = 3, 6, 2
    per_gate = H * I + H * H + 2 * H
    for cell, gates in [("rnn", 1), ("lstm", 4), ("gru", 3)]:
        model = build_model(dict(cell=cell, hidden_size=H, num_layers=1), I, O)
        assert count_parameters(model) == gates * per_gate + H * O + O


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(cell="transformer"), "model.cell"),
        (dict(hidden_size=0), "model.hidden_size"),
        (dict(num_layers=-1), "model.num_layers"),
        (dict(cell="rnn", activation="swish"), "model.activation"),
        (dict(cell="lstm", activation="relu"), "model.activation"),
    ],
)
def test_bad_model_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)
