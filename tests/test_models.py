"""The models: shapes, batch-first layout, the unrolled twin equal to the fused kernels, and
every hand-written BPTT (vanilla and normalised RNNs, GRU, normalised LSTMs) equal to
autograd through the twin."""

from __future__ import annotations

import copy

import pytest
import torch

from seqtest.bptt import SKINNY_INPUTS
from seqtest.errors import ConfigError
from seqtest.models import FEW_INPUTS, ModelConfig, build_model, count_parameters
from tests.conftest import gradients

CELLS = ["rnn", "lstm", "gru"]


def make(cell: str, layers: int = 2, hidden_size: int = 6, **kw):
    torch.manual_seed(0)
    return build_model(dict(cell=cell, hidden_size=hidden_size, num_layers=layers, **kw), 3, 2)


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


def assert_bptt_matches_the_twin(model, inputs: int = 3) -> None:
    """A float64 model's hand-written training path against autograd through its twin:
    outputs, the gradients of the input and of every parameter (each nonzero, so that none is
    compared vacuously), and the buffers (batch-norm running estimates) after the pass."""
    twin = copy.deepcopy(model)
    x = torch.randn(5, 10, inputs, dtype=torch.float64)
    assert all(layer.path(x) == "bptt" for layer in model.layers)
    weights = torch.randn(5, 10, 2, dtype=torch.float64)  # every step and output counts
    out, grads = gradients(model, x, weights)
    out_twin, grads_twin = gradients(twin, x, weights, unrolled=True)
    assert torch.allclose(out, out_twin, atol=1e-12)
    names = ["x"] + [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, grads, grads_twin, strict=True):
        assert b.abs().max() > 0, name
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    for (name, a), b in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.allclose(a, b, atol=1e-12), name


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("layers,residual,hidden", [(1, False, 6), (2, True, 6), (2, False, 9)])
def test_hand_written_bptt_matches_autograd_through_the_twin(norm, layers, residual, hidden):
    """The training path of the layer- and batch-norm LSTMs (seqtest.bptt) against autograd
    through the step-by-step twin, in float64: outputs, gradients of the input and of every
    parameter, and the batch-norm running estimates (10 steps, statistics kept for 4: the
    shared last slot is updated by several steps in turn). The input term takes its
    statistics from the weights for up to `FEW_INPUTS` inputs (3 and 6 here) and from the
    product for more (the second layer's 9)."""
    assert 6 <= FEW_INPUTS < 9
    model = make("lstm", layers, hidden, norm=norm, residual=residual, bn_max_steps=4).double()
    assert_bptt_matches_the_twin(model)


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize(
    "activation", ["tanh", "sigmoid", "relu", "leaky_relu", "elu", "prelu"]
)  # fmt: skip
@pytest.mark.parametrize("layers,residual,bn_max_steps", [(1, False, 4), (2, True, 30)])
def test_hand_written_normalised_rnn_bptt_matches_autograd_through_the_twin(
    norm, activation, layers, residual, bn_max_steps
):
    """The layer- and batch-norm vanilla RNNs' training path (seqtest.bptt.NormalisedRNN)
    against autograd through the twin, in float64, for every activation: outputs,
    gradients of the input and of every parameter (LN's gain and shift, both BNs' gains,
    through the input term W_ih and the biases, prelu's slopes, here of both signs), the
    batch-norm running estimates (kept for 4 of the 10 steps, or for all)."""
    model = make(
        "rnn", layers, norm=norm, activation=activation, residual=residual,
        bn_max_steps=bn_max_steps, leaky_slope=0.1,
    ).double()  # fmt: skip
    if activation == "prelu":
        with torch.no_grad():
            for layer in model.layers:
                layer.activation.weight.copy_(torch.linspace(-0.3, 0.5, 6))
    assert_bptt_matches_the_twin(model)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_the_normalised_rnn_input_term_is_right_for_few_and_many_inputs(norm):
    """Layer 1 reads SKINNY_INPUTS features (the layer-norm RNN's input term as one product
    over all steps), layer 2 the 6 of layer 1 (one product per step)."""
    torch.manual_seed(0)
    model = build_model(dict(cell="rnn", hidden_size=6, num_layers=2, norm=norm), SKINNY_INPUTS, 2)
    assert_bptt_matches_the_twin(model.double(), inputs=SKINNY_INPUTS)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_hand_written_bptt_matches_the_twin_with_buffers_split_into_blocks(cell, norm, monkeypatch):
    """At large sizes the per-step buffers are split into blocks (`step_buffers`); with
    blocks of one to eight steps the results are the same as the twin's."""
    from seqtest import bptt

    step_bytes = 5 * 6 * 8  # one step of [B, H] = [5, 6] in float64; [5, 4H] is 4 times it
    for steps_per_block in (2, 8):
        monkeypatch.setattr(bptt, "BLOCK_BYTES", steps_per_block * step_bytes)
        views = bptt.step_buffers(torch.zeros((), dtype=torch.float64), 11, 5, 6)
        assert len(views) == 11 and all(v.shape == (5, 6) for v in views)
        blocks = {v.untyped_storage().data_ptr() for v in views}
        assert len(blocks) == -(-11 // steps_per_block)
        model = make(cell, 1, norm=norm, bn_max_steps=4).double()
        assert_bptt_matches_the_twin(model)


@pytest.mark.parametrize("loops", ["off", "require"])
@pytest.mark.parametrize(
    "cell,activation", [("rnn", "tanh"), ("rnn", "relu"), ("rnn", "prelu"), ("gru", "tanh")]
)
def test_hand_written_rnn_and_gru_match_the_twin_with_buffers_split_into_blocks(
    cell, activation, loops, monkeypatch
):
    """The RNN's and the GRU's [T, ...] buffers come in blocks of `bptt.BLOCK_BYTES` too
    (`step_blocks`); with blocks of 1, 3 and 5 of the 10 steps (the T + 1 hidden states then
    take a block more than the other buffers at 1 and 5), in the Python and the compiled
    loops, the results are the twin's."""
    from seqtest import bptt, native

    if loops == "require" and native.toolchain_missing():
        pytest.skip(native.toolchain_missing())
    monkeypatch.setenv("SEQTEST_NATIVE", loops)
    gates = 3 if cell == "gru" else 1
    step_bytes = 5 * gates * 6 * 8  # one step of [B, G] = [5, gates * H] in float64
    for steps_per_block in (1, 3, 5):
        monkeypatch.setattr(bptt, "BLOCK_BYTES", steps_per_block * step_bytes)
        like = torch.zeros((), dtype=torch.float64)
        assert bptt.steps_per_block(like, 5, gates * 6) == steps_per_block
        assert_bptt_matches_the_twin(make(cell, 2, activation=activation).double())


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_normalised_backward_runs_once_and_leaves_a_leaf_input_alone(cell, norm):
    """The backward pass writes dL/dz_t over the input term it was given, so a second pass
    through the same graph stops with an error; an input term that is a leaf tensor (whose
    memory its owner keeps) gets a fresh gradient instead, and is left unchanged."""
    from seqtest.bptt import normalised_lstm, normalised_rnn

    layer = make(cell, 1, norm=norm).layers[0]
    out = layer(torch.randn(4, 6, 3))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        out.sum().backward()
    inputs = layer.input_term(torch.randn(4, 6, 3)).detach().requires_grad_()
    before = inputs.detach().clone()
    w_hh = layer.weights()[1]
    if cell == "lstm":
        normalised_lstm(inputs, w_hh, *layer.normalisations()).sum().backward()
    else:
        normalised_rnn(inputs, w_hh, *layer.normalisations(), "tanh").sum().backward()
    assert torch.equal(inputs.detach(), before)
    assert inputs.grad is not None and not torch.equal(inputs.grad, before)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_hand_written_bptt_in_float32_is_as_accurate_as_autograd(cell, norm):
    """In float32 the two paths round differently. Against the float64 result, the
    hand-written one's largest gradient error (relative to each gradient's largest entry)
    is within 1e-5 or, where float32 itself cannot do that well (batch norm's gradients
    lose about 3e-5 to cancellation at this size, on both paths), within 1.5 times the
    error of autograd through the twin."""
    model = make(cell, 2, norm=norm, bn_max_steps=4).double()
    x = torch.randn(5, 10, 3, dtype=torch.float64)
    weights = torch.randn(5, 10, 2, dtype=torch.float64)
    _, exact = gradients(copy.deepcopy(model), x, weights, unrolled=True)
    _, fast = gradients(copy.deepcopy(model).float(), x.float(), weights.float())
    _, twin = gradients(copy.deepcopy(model).float(), x.float(), weights.float(), unrolled=True)

    def error(grads):
        return max(
            float((g.double() - e).abs().max() / e.abs().max())
            for g, e in zip(grads, exact, strict=True)
        )

    assert error(fast) <= max(1e-5, 1.5 * error(twin))


def test_hand_written_bptt_is_used_only_for_training_with_gradients():
    """Evaluation and no_grad run the fused kernel where there is one, else the twin's loop;
    so do one-sample batch-norm batches."""
    x = torch.randn(3, 4, 3)
    cases = [
        (dict(cell="lstm", norm="layer"), "loop"),
        (dict(cell="lstm", norm="batch"), "loop"),
        (dict(cell="rnn", activation="tanh"), "fused"),
        (dict(cell="rnn", activation="relu"), "fused"),
        (dict(cell="rnn", activation="sigmoid"), "loop"),
        (dict(cell="rnn", activation="prelu"), "loop"),
        (dict(cell="rnn", norm="layer"), "loop"),
        (dict(cell="rnn", norm="batch", activation="relu"), "loop"),
        (dict(cell="rnn", norm="layer", activation="prelu"), "loop"),
    ]
    for kwargs, otherwise in cases:
        layer = make(layers=1, **kwargs).layers[0]
        assert layer.path(x) == "bptt", kwargs
        with torch.no_grad():
            assert layer.path(x) == otherwise, kwargs
        assert layer.eval().path(x) == otherwise, kwargs
    assert make("lstm", 1, norm="layer").layers[0].path(x[:1]) == "bptt"
    assert make("lstm", 1, norm="batch").layers[0].path(x[:1]) == "loop"
    assert make("rnn", 1, norm="layer").layers[0].path(x[:1]) == "bptt"
    assert make("rnn", 1, norm="batch").layers[0].path(x[:1]) == "loop"
    assert make("lstm", 1).layers[0].path(x) == "fused"
    gru_layer = make("gru", 1).layers[0]
    assert gru_layer.path(x) == "bptt" and gru_layer.eval().path(x) == "fused"


def test_train_on_twin_loop_puts_every_layer_on_the_twins_loop_and_back():
    """The reference the benchmark measures each path against: in training, with gradients,
    every layer takes the twin's loop, and gets the twin's outputs and gradients."""
    from seqtest.models import train_on_twin_loop

    x, weights = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 2).double()
    for kwargs in (dict(cell="rnn"), dict(cell="gru"), dict(cell="lstm", norm="layer")):
        model = make(layers=2, **kwargs).double()
        fast = [layer.path(x) for layer in model.layers]
        assert train_on_twin_loop(model) is model
        assert all(layer.path(x) == "loop" for layer in model.layers)
        out, grads = gradients(model, x, weights)
        out_twin, grads_twin = gradients(model, x, weights, unrolled=True)
        assert torch.allclose(out, out_twin, atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, grads_twin, strict=True))
        train_on_twin_loop(model, on=False)
        assert [layer.path(x) for layer in model.layers] == fast == ["bptt", "bptt"]


@pytest.mark.parametrize(
    "cell,activation",
    [("rnn", "tanh"), ("rnn", "sigmoid"), ("rnn", "relu"), ("rnn", "leaky_relu"),
     ("rnn", "elu"), ("gru", "tanh")],
)  # fmt: skip
@pytest.mark.parametrize("layers,residual", [(1, False), (2, True)])
def test_hand_written_rnn_and_gru_bptt_match_autograd_through_the_twin(
    cell, activation, layers, residual
):
    """The vanilla RNN's and the GRU's training paths (seqtest.bptt.ElementwiseRNN, GRU)
    against autograd through the twin, in float64: outputs and the gradients of the input
    and every parameter."""
    model = make(cell, layers, activation=activation, residual=residual, leaky_slope=0.1)
    assert_bptt_matches_the_twin(model.double())


@pytest.mark.parametrize("layers,residual", [(1, False), (2, True)])
@pytest.mark.parametrize("slopes", ["positive", "zero", "mixed"])
def test_hand_written_prelu_rnn_bptt_matches_autograd_through_the_twin(slopes, layers, residual):
    """The prelu RNN's training path (`ElementwiseRNN` with the slopes) against autograd
    through the twin, in float64, with every slope positive, every slope zero, and slopes of
    both signs (where the output's sign no longer tells the pre-activation's): outputs and
    the gradients of the input and every parameter, the slopes included."""
    model = make("rnn", layers, activation="prelu", residual=residual).double()
    values = {"positive": torch.full((6,), 0.2), "zero": torch.zeros(6),
              "mixed": torch.linspace(-0.3, 0.5, 6)}[slopes]  # fmt: skip
    with torch.no_grad():
        for layer in model.layers:
            layer.activation.weight.copy_(values)
    assert_bptt_matches_the_twin(model)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_the_input_weight_gradient_is_right_in_both_orders(cell):
    """Layer 1 reads SKINNY_INPUTS features (the direct product grad' x), layer 2 the 6 of
    layer 1 (the transposed one, (x' grad)'): both against autograd through the twin."""
    torch.manual_seed(0)
    model = build_model(dict(cell=cell, hidden_size=6, num_layers=2), SKINNY_INPUTS, 2)
    assert_bptt_matches_the_twin(model.double(), inputs=SKINNY_INPUTS)


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_hand_written_bptt_matches_the_fused_kernel_in_float32(cell):
    """Against PyTorch's own nn.RNN / nn.GRU: outputs and gradients to 1e-5."""
    model = make(cell, 2)
    fused = copy.deepcopy(model).eval()  # evaluation mode (no other effect here): the kernel
    x = torch.randn(8, 30, 3)
    weights = torch.randn(8, 30, 2)
    out, grads = gradients(model, x, weights)
    out_fused, grads_fused = gradients(fused, x, weights)
    assert fused.layers[0].path(x) == "fused" and model.layers[0].path(x) == "bptt"
    assert torch.allclose(out, out_fused, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_fused, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_the_sigmoid_rnn_on_the_tanh_kernel_is_the_sigmoid_rnn():
    """The GPU path of the sigmoid RNN (`sigmoid_rnn_on_tanh_kernel`, run here on PyTorch's
    CPU tanh RNN) against the cell equations of the twin, in float64: outputs and the
    gradients of the input and of every weight. On the CPU, training keeps the compiled
    loop."""
    from seqtest.models import sigmoid_rnn_on_tanh_kernel

    layer = make("rnn", 1, activation="sigmoid").double().layers[0]
    x = torch.randn(5, 9, 3, dtype=torch.float64, requires_grad=True)
    weights = layer.weights()
    out = sigmoid_rnn_on_tanh_kernel(x, *weights, training=True)
    twin = torch.stack(layer.unroll(x)[0], dim=1)
    assert torch.allclose(out, twin, rtol=1e-12, atol=1e-14)
    scale = torch.randn_like(out)
    grads = torch.autograd.grad((out * scale).sum(), [x, *weights])
    grads_twin = torch.autograd.grad((twin * scale).sum(), [x, *weights])
    for a, b in zip(grads, grads_twin, strict=True):
        assert b.abs().max() > 0
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert layer.path(x) == "bptt"


def test_the_gru_backward_refuses_a_second_pass_over_its_overwritten_buffers():
    """The GRU's backward writes its gradients over saved buffers; a second backward through
    the same graph would read them back as garbage, so it stops with an error instead."""
    model = make("gru", 1)
    out = model(torch.randn(4, 6, 3))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        out.sum().backward()


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


@pytest.mark.parametrize("length", [3, 5, 7])
@pytest.mark.parametrize("beta", [False, True])
def test_recurrent_batch_norm_of_a_sequence_follows_its_definition(length, beta):
    """`StepBatchNorm.forward_sequence` in training normalises each step's features over the
    batch with the biased variance, and moves each step's running estimates towards the
    unbiased one (steps beyond `max_steps` = 5 take turns on the last slot). Checked against
    the formula written out here: sequences that fit the slots (one kernel) and one that
    does not (the plain passes), values, gradients and running estimates."""
    from seqtest.models import StepBatchNorm

    torch.manual_seed(0)
    norm = StepBatchNorm(4, 5, beta=beta).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if beta:
            norm.bias.uniform_(-1, 1)
    x = torch.randn(6, length, 4, dtype=torch.float64, requires_grad=True)
    out = norm.forward_sequence(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight
    expected = expected + norm.bias if beta else expected
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    params = [x, *norm.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), params)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)
    running_mean, running_var = torch.zeros(5, 4, dtype=torch.float64), torch.ones(5, 4).double()
    for t in range(length):
        slot = min(t, 4)
        running_mean[slot] = 0.9 * running_mean[slot] + 0.1 * mean[t].detach()
        running_var[slot] = 0.9 * running_var[slot] + 0.1 * x[:, t].detach().var(0)
    torch.testing.assert_close(norm.running_mean, running_mean)
    torch.testing.assert_close(norm.running_var, running_var)
