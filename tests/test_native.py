"""The compiled BPTT loops (`seqtest.native`): bit-identical to the Python loops they replace
once these use the compiled tanh kernel (vanilla RNNs, GRU, LN-RNN, LN-LSTM; the BN-RNN and
BN-LSTM to rounding, their batch norm being our own kernel, checked against PyTorch's; the
float32 GRU and normalised LSTMs to rounding where their fused step kernels run, checked
against float64; every loop on oneDNN's packed recurrent products against float64), the tanh
and sigmoid kernels against float64, and a clear fallback or error where they cannot be
built."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from seqtest import bptt, native
from seqtest.errors import ConfigError
from seqtest.models import build_model
from tests.conftest import gradients

needs_toolchain = pytest.mark.skipif(
    native.toolchain_missing() is not None,
    reason=f"no toolchain to build the compiled loops: {native.toolchain_missing()}",
)


@pytest.fixture
def fresh_build(monkeypatch):
    """A process-wide state in which no build was tried yet (restored afterwards)."""
    monkeypatch.setattr(native, "_built", {})


def train_once(model, x, weights, loops: str, monkeypatch):
    """Output, input and parameter gradients, and buffers after one training pass of a copy
    of `model` with SEQTEST_NATIVE=`loops`."""
    monkeypatch.setenv("SEQTEST_NATIVE", loops)
    model = copy.deepcopy(model)
    out, grads = gradients(model, x, weights)
    return [out, *grads, *model.buffers()]


def assert_compiled_equals_python(
    model, monkeypatch, exact: bool = True, fused: bool = False
) -> None:
    """One training pass of a [5, 12, 3]-input model with the Python loops and one with the
    compiled ones: outputs, gradients and buffers equal to the last bit (`exact`; else to
    rounding: within 1e-5 in float32, 1e-12 in float64, of each tensor's largest entry, as
    a sum's rounding error scales with its terms, not with the sum; 2e-5 in float32 where
    the compiled loops run the `fused` step kernels: two float32 computations that each
    stay within about 1e-5 of float64, checked below, differ by up to the sum of their
    errors; measured up to 1.5e-5 for a BN-LSTM's bias), every gradient nonzero
    (so that none is compared vacuously). The Python loops run with the compiled loops' tanh
    kernel in place of PyTorch's (`bptt.tanh_into`), so that every other kernel and its
    order is held to the last bit; the kernel itself is checked against float64 below."""
    model.train()
    dtype = next(model.parameters()).dtype
    x = torch.randn(5, 12, 3, dtype=dtype)
    weights = torch.randn(5, 12, 2, dtype=dtype)
    assert all(layer.path(x) == "bptt" for layer in model.layers)
    monkeypatch.setenv("SEQTEST_NATIVE", "require")
    kernels = native.loops()
    monkeypatch.setattr(bptt, "tanh_into", lambda out, x: out.copy_(kernels.tanh(x)))
    python = train_once(model, x, weights, "off", monkeypatch)
    compiled = train_once(model, x, weights, "require", monkeypatch)
    assert native.status() == "compiled"
    tolerance = (2e-5 if fused else 1e-5) if dtype == torch.float32 else 1e-12
    for a, b in zip(python, compiled, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            scale = float(a.detach().abs().max())
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance * scale)
    gradients = compiled[1 : 2 + len(list(model.parameters()))]
    assert all(g.abs().max() > 0 for g in gradients)


def fused_step_kernels() -> bool:
    """Whether the compiled GRU and normalised LSTM loops run their fused float32 step
    kernels on this machine (they come with the tanh kernel: x86-64 with AVX2 or AVX-512)."""
    return native.loops().tanh_kernel_name() != "pytorch"


CASES = [("layer", 2, 6, 10), ("batch", 1, 6, 4), ("batch", 2, 9, 30)]


@needs_toolchain
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm,layers,hidden,bn_max_steps", CASES)
def test_compiled_normalised_lstm_loops_equal_the_python_loops(
    norm, layers, hidden, bn_max_steps, dtype, monkeypatch
):
    """Outputs, every gradient (input, W_hh, the normalisations' weights and biases, and
    through them W_ih) and the batch-norm running estimates: equal to the last bit for layer
    norm (the same kernels in the same order), to rounding for batch norm (our own kernel,
    summing in another order than PyTorch's) and in float32 where the fused step kernels
    run. Batch norm keeps statistics for 4 of 12 steps in one case (the last slot shared)
    and for all of them in the other."""
    torch.manual_seed(0)
    model = build_model(
        dict(cell="lstm", hidden_size=hidden, num_layers=layers, norm=norm,
             bn_max_steps=bn_max_steps), 3, 2,
    ).to(dtype)  # fmt: skip
    fused = dtype == torch.float32 and fused_step_kernels()
    assert_compiled_equals_python(
        model, monkeypatch, exact=norm == "layer" and not fused, fused=fused
    )


@needs_toolchain
@pytest.mark.parametrize("last_step_only", [False, True])
@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("hidden", [6, 40])
def test_the_fused_lstm_kernels_match_a_float64_twin(
    hidden, norm, last_step_only, packed_products, monkeypatch
):
    """The compiled normalised LSTM loop in float32 (its fused step kernels, where this
    machine has them), two layers, against autograd through the step-by-step twin in
    float64, an independent computation: outputs, the gradients of the input and of every
    parameter, and the batch-norm running estimates, within 1e-5 of each one's largest
    entry. A loss on every step and one on the last step alone (zero incoming gradients
    elsewhere); 40 units cover whole and partial vector registers of a row, 6 a partial one
    alone."""
    monkeypatch.setenv("SEQTEST_NATIVE", "require")
    torch.manual_seed(0)
    model = build_model(dict(cell="lstm", hidden_size=hidden, num_layers=2, norm=norm), 3, 2)
    twin = copy.deepcopy(model).double()
    x = torch.randn(5, 12, 3)
    weights = torch.randn(5, 12, 2)
    if last_step_only:
        weights[:, :-1] = 0
    assert all(layer.path(x) == "bptt" for layer in model.layers)
    out, grads = gradients(model, x, weights)
    out_twin, grads_twin = gradients(twin, x.double(), weights.double(), unrolled=True)
    compiled = [out, *grads, *model.buffers()]
    exact = [out_twin, *grads_twin, *twin.buffers()]
    for a, b in zip(compiled, exact, strict=True):
        scale = float(b.detach().abs().max())
        assert scale > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale)


@needs_toolchain
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm,activation", [("layer", "tanh"), ("layer", "elu"),
                                             ("layer", "prelu"), ("batch", "tanh"),
                                             ("batch", "relu"), ("batch", "prelu")])  # fmt: skip
def test_compiled_normalised_rnn_loops_equal_the_python_loops(norm, activation, dtype, monkeypatch):
    """Two layers, batch norm with statistics for 4 of the 12 steps: to the last bit with layer
    norm, to rounding with batch norm (our own kernel)."""
    torch.manual_seed(0)
    model = build_model(
        dict(cell="rnn", hidden_size=6, num_layers=2, norm=norm, activation=activation,
             bn_max_steps=4), 3, 2,
    ).to(dtype)  # fmt: skip
    assert_compiled_equals_python(model, monkeypatch, exact=norm == "layer")


@needs_toolchain
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [dict(cell="gru")]
    + [
        dict(cell="rnn", activation=a)
        for a in ("tanh", "sigmoid", "relu", "leaky_relu", "elu", "prelu")
    ],
    ids=lambda kwargs: kwargs.get("activation", kwargs["cell"]),
)
def test_compiled_rnn_and_gru_loops_equal_the_python_loops(kwargs, dtype, monkeypatch):
    """Every activation the vanilla RNN trains by hand, and the GRU, in two layers (the
    second layer's input gradient flows through the first's loops): bit-identical, except
    the GRU in float32 where its fused step kernels run (their sigmoid and the order of their
    arithmetic round differently from PyTorch's kernels): there to rounding."""
    torch.manual_seed(0)
    model = build_model(dict(hidden_size=6, num_layers=2, **kwargs), 3, 2).to(dtype)
    fused = kwargs["cell"] == "gru" and dtype == torch.float32 and fused_step_kernels()
    assert_compiled_equals_python(model, monkeypatch, exact=not fused, fused=fused)


needs_packed_products = pytest.mark.skipif(
    bptt.packed_weight(torch.zeros(64, 64), 1 << 20) is None,
    reason="no oneDNN packed products here (another processor, or a PyTorch without oneDNN)",
)


@pytest.fixture(
    params=[False, pytest.param(True, marks=needs_packed_products)], ids=["mm", "packed"]
)
def packed_products(request, monkeypatch):
    """Both ways the compiled loops run a step's recurrent product: PyTorch's `mm` (at these
    tiny sizes, as in training) and oneDNN's on the packed weight (forced: every size)."""
    if request.param:
        monkeypatch.setattr(bptt, "PACKED_MIN_MACS", 0)
    return request.param


@needs_toolchain
@pytest.mark.parametrize("loss", ["weighted", "sum", "last step"])
@pytest.mark.parametrize("hidden", [6, 40])
def test_the_fused_gru_kernels_match_a_float64_gru(loss, hidden, packed_products, monkeypatch):
    """The compiled GRU loop in float32 (its fused step kernels, where this machine has them)
    against PyTorch's nn.GRU in float64, an independent computation: hidden states and the
    gradients of the input and of every weight within 1e-5 of each one's largest entry. The
    losses give the loop an incoming gradient that is a plain tensor, a broadcast view
    (stride 0: `sum`) and zero but at the last step; 40 units cover whole and partial vector
    registers of a row, 6 a partial one alone."""
    monkeypatch.setenv("SEQTEST_NATIVE", "require")
    torch.manual_seed(0)
    reference = torch.nn.GRU(3, hidden, batch_first=True).double()
    x = torch.randn(5, 12, 3, dtype=torch.float64)
    weights = torch.randn(5, 12, hidden, dtype=torch.float64)

    def loss_of(out):
        if loss == "weighted":
            return (out * weights.to(out.dtype)).sum()
        return out.sum() if loss == "sum" else out[:, -1].sum()

    def states_and_gradients(x, params, run):
        x = x.clone().requires_grad_()
        out = run(x)
        return [out, *torch.autograd.grad(loss_of(out), [x, *params])]

    params = [p.detach().float().requires_grad_() for p in reference.parameters()]
    compiled = states_and_gradients(x.float(), params, lambda x: bptt.gru(x, *params))
    exact = states_and_gradients(x, list(reference.parameters()), lambda x: reference(x)[0])
    for a, b in zip(compiled, exact, strict=True):
        scale = float(b.detach().abs().max())
        assert scale > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale)


@needs_toolchain
@needs_packed_products
@pytest.mark.parametrize(
    "kwargs",
    [dict(activation="tanh"), dict(activation="relu"), dict(activation="prelu"),
     dict(norm="layer"), dict(norm="batch"), dict(norm="batch", activation="prelu")],
    ids=lambda kwargs: "-".join(kwargs.values()),
)  # fmt: skip
def test_the_compiled_rnn_loops_on_packed_products_match_a_float64_twin(kwargs, monkeypatch):
    """The vanilla RNNs' compiled loops in float32 with every recurrent product on a weight
    packed by oneDNN (forced down to these sizes), two layers, against autograd through the
    step-by-step twin in float64: outputs, every gradient and the batch-norm running
    estimates within 1e-5 of each one's largest entry."""
    monkeypatch.setattr(bptt, "PACKED_MIN_MACS", 0)
    monkeypatch.setenv("SEQTEST_NATIVE", "require")
    torch.manual_seed(0)
    model = build_model(dict(cell="rnn", hidden_size=40, num_layers=2, **kwargs), 3, 2)
    twin = copy.deepcopy(model).double()
    x, weights = torch.randn(5, 12, 3), torch.randn(5, 12, 2)
    assert all(layer.path(x) == "bptt" for layer in model.layers)
    out, grads = gradients(model, x, weights)
    out_twin, grads_twin = gradients(twin, x.double(), weights.double(), unrolled=True)
    for a, b in zip([out, *grads, *model.buffers()], [out_twin, *grads_twin, *twin.buffers()],
                    strict=True):  # fmt: skip
        scale = float(b.detach().abs().max())
        assert scale > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale)


@needs_toolchain
@needs_packed_products
def test_weights_are_packed_only_where_that_pays(monkeypatch):
    """float32 CPU weights from `PACKED_MIN_MACS` multiply-adds (batch x out x in) on; none
    below, in float64, with oneDNN turned off or off x86-64; a transposed view is packed
    from its values (the backward pass's W_hh'): the same product as `mm`'s."""
    w = torch.randn(384, 128)
    batch = -(-bptt.PACKED_MIN_MACS // w.numel())  # the smallest batch that pays
    assert bptt.packed_weight(w, batch) is not None
    assert bptt.packed_weight(w, batch - 1) is None
    assert bptt.packed_weight(w.double(), batch) is None
    with monkeypatch.context() as patch:
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        assert bptt.packed_weight(w, batch) is None
    assert torch.backends.mkldnn.enabled
    with monkeypatch.context() as patch:  # unmeasured on other processors: PyTorch's mm
        patch.setattr(bptt.platform, "machine", lambda: "aarch64")
        assert bptt.packed_weight(w, batch) is None
    loops = native.loops()
    x = torch.randn(batch, 384)
    torch.testing.assert_close(
        loops.packed_linear(x, bptt.packed_weight(w.t(), batch)), x @ w, rtol=1e-5, atol=1e-4
    )


def ulps_from_float64_tanh(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|values - tanh(x)| in units of the last place of float32 at tanh(x), tanh in float64."""
    exact = torch.tanh(x.double())
    magnitude = exact.float().abs()
    above = torch.nextafter(magnitude, torch.tensor(float("inf")))
    ulp = above.double() - magnitude.double()  # (in float32 a subnormal ulp may be flushed)
    return (values.double() - exact).abs() / ulp


def tanh_kernel_missing(kernel: str) -> str | None:
    """Why this machine lacks the compiled loops' tanh kernel named, or None if it has it."""
    try:
        native.loops().tanh(torch.zeros(1, 1), kernel)
    except RuntimeError as error:
        return str(error)
    return None


def tanh_by(kernel: str):
    """The compiled loops' tanh by the kernel named, or skip where this machine lacks it."""
    missing = tanh_kernel_missing(kernel)
    if missing:
        pytest.skip(missing)
    return lambda x: native.loops().tanh(x, kernel)


@needs_toolchain
@pytest.mark.parametrize("kernel", ["avx512", "avx2"])
def test_the_tanh_kernels_are_within_one_and_a_half_ulp_of_tanh(kernel):
    """Over 4 M evenly spaced numbers in [-12, 12] (both of the kernel's formulas and the
    switch between them at 0.625, the clamp at 10) and 400 K spread logarithmically down to
    1e-37 of either sign (normal numbers: runs flush subnormals to zero): at most 1.5 ulp
    from float64's tanh, odd, and exact at the special values."""
    tanh = tanh_by(kernel)
    grid = torch.linspace(-12, 12, 4_000_000)
    tiny = torch.logspace(-37, 1.2, 200_000)
    x = torch.cat([grid, tiny, -tiny]).view(-1, 1000)
    assert ulps_from_float64_tanh(tanh(x), x).max() <= 1.5
    assert torch.equal(tanh(-x), -tanh(x))
    special = torch.tensor([[0.0, -0.0, float("inf"), float("-inf"), 10.0, 1e-30]])
    assert torch.equal(tanh(special), torch.tensor([[0.0, -0.0, 1.0, -1.0, 1.0, 1e-30]]))
    assert torch.signbit(tanh(special))[0, 1]
    assert tanh(torch.tensor([[float("nan")]])).isnan().all()


@needs_toolchain
def test_the_loops_take_the_widest_tanh_kernel_this_processor_has():
    """x86-64 with AVX-512: that kernel; with AVX2 and FMA: that one; else PyTorch's tanh
    (the kernels pay only with wide registers). The default is the one named, and "pytorch"
    is PyTorch's tanh to the last bit."""
    loops = native.loops()
    name = loops.tanh_kernel_name()
    available = [k for k in ("avx512", "avx2") if tanh_kernel_missing(k) is None]
    assert name == (available[0] if available else "pytorch")
    x = torch.randn(64, 128) * 3
    assert torch.equal(loops.tanh(x), loops.tanh(x, name))
    assert torch.equal(loops.tanh(x, "pytorch"), torch.tanh(x))


@needs_toolchain
@pytest.mark.parametrize("kernel", ["avx512", "avx2"])
def test_the_tanh_kernels_take_strided_rows_and_leave_the_rest_to_pytorch(kernel, restore_threads):
    """A gate's block of a [B, 3H] matrix (rows apart in memory), one big matrix on one and on
    two threads (split by rows: the same numbers), and what the kernels do not take
    (float64, a 3-d tensor, a column slice) equal to PyTorch's tanh to the last bit."""
    tanh = tanh_by(kernel)
    gates = torch.randn(64, 384) * 3
    block = gates[:, 256:]
    assert ulps_from_float64_tanh(tanh(block), block).max() <= 1.5
    big = torch.randn(512, 512)
    torch.set_num_threads(1)
    one_thread = tanh(big)
    torch.set_num_threads(2)
    assert torch.equal(tanh(big), one_thread)
    for other in (gates.double(), gates.view(8, 8, 384), gates[:, ::2]):
        assert torch.equal(tanh(other), torch.tanh(other))


@needs_toolchain
@pytest.mark.parametrize("kernel", ["avx512", "avx2"])
def test_the_gru_kernels_sigmoid_is_within_two_and_a_quarter_ulp_of_sigmoid(kernel):
    """The sigmoid the fused GRU kernels inline, over 8 M evenly spaced numbers in [-100, 100]
    and 400 K spread logarithmically down to 1e-37 of either sign: within 2.25 ulp of
    float64's sigmoid wherever that is a normal float (PyTorch's own: 2.46 ulp there), below
    the smallest normal float where it is not, and exact at the special values."""
    if tanh_kernel_missing(kernel):
        pytest.skip(tanh_kernel_missing(kernel))
    sigmoid = lambda x: native.loops().sigmoid(x, kernel)  # noqa: E731
    tiny = torch.logspace(-37, 2, 200_000)
    x = torch.cat([torch.linspace(-100, 100, 8_000_000), tiny, -tiny])
    values, exact = sigmoid(x).double(), torch.sigmoid(x.double())
    normal = exact >= torch.finfo(torch.float32).tiny
    magnitude = exact[normal].float()
    ulp = torch.nextafter(magnitude, torch.tensor(float("inf"))).double() - magnitude.double()
    assert ((values[normal] - exact[normal]).abs() / ulp).max() <= 2.25
    assert values[~normal].abs().max() < torch.finfo(torch.float32).tiny
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 100.0, -100.0])
    assert torch.equal(sigmoid(special), torch.tensor([0.5, 0.5, 1.0, 0.0, 1.0, 0.0]))
    assert sigmoid(torch.tensor([float("nan")])).isnan().all()


def pytorch_batch_norm(x, weight, bias, running_mean, running_var, grad):
    """PyTorch's training-mode batch norm of x [B, F]: (y, mean, inverse std, dL/dx,
    dL/dw, dL/db) given dL/dy = `grad`; the running estimates moved in place."""
    y, mean, rstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, True, 0.1, 1e-5
    )
    grads = torch.ops.aten.native_batch_norm_backward(
        grad, x, weight, None, None, mean, rstd, True, 1e-5, [True, True, bias is not None]
    )
    return [y, mean, rstd, *grads]


def float64_batch_norm(x, weight, bias, running_mean, running_var, grad):
    """The same quantities computed in float64 by `F.batch_norm` and autograd, an
    independent computation (no shared code with either kernel), as x's dtype."""
    x64, weight64 = (t.double().requires_grad_() for t in (x, weight))
    bias64 = bias.double().requires_grad_() if bias is not None else None
    estimates = [running_mean.double(), running_var.double()]
    y = torch.nn.functional.batch_norm(x64, *estimates, weight64, bias64, True, 0.1, 1e-5)
    y.backward(grad.double())
    mean = x64.detach().mean(0)
    rstd = (x64.detach().var(0, unbiased=False) + 1e-5).rsqrt()
    bias_grad = bias64.grad if bias is not None else None
    values = [y.detach(), mean, rstd, x64.grad, weight64.grad, bias_grad, *estimates]
    return [v.to(x.dtype) if v is not None else None for v in values]


@needs_toolchain
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (5, 7), (64, 128), (17, 300)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_batch_norm_kernel_matches_a_float64_computation(shape, with_bias, dtype):
    """The BN-LSTM's per-step batch norm (our kernel in loops.cpp): output, batch statistics,
    the three gradients and the moved running estimates, each within 1e-5 (float32) or
    1e-12 (float64) of its largest entry. Then the inverse std and the running variance
    where the features' means are 40 times their spread: there a one-pass variance
    E[x^2] - E[x]^2 without a shift is off by 2-4e-4 in float32. (There x - mean itself
    carries float32's rounding of the mean, ~1e-6 against a spread of 0.5, in PyTorch's
    kernel as in ours: the other quantities are checked at a mean twice the spread.)"""
    compiled = native.loops()
    generator = torch.Generator().manual_seed(0)

    def draw(*size, scale=1.0, offset=0.0):
        return torch.randn(*size, generator=generator, dtype=dtype) * scale + offset

    B, F = shape
    x = draw(B, F, offset=2.0)
    grad, weight = draw(B, F), draw(F, offset=1.0)
    bias = draw(F) if with_bias else None
    estimates = [draw(F), draw(F).abs() + 0.5]
    expected = float64_batch_norm(x, weight, bias, *estimates, grad)
    assert compiled.own_batch_norm(x, weight)
    y, mean, rstd = compiled.batch_norm_forward(x, weight, bias, *estimates, 0.1, 1e-5)
    grads = compiled.batch_norm_backward(grad, x, weight, mean, rstd, 1e-5, with_bias)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for ours, theirs in zip([y, mean, rstd, *grads, *estimates], expected, strict=True):
        if theirs is None:
            assert ours is None
        else:
            assert (ours - theirs).abs().max() <= tolerance * theirs.abs().max()
    far = draw(B, F, scale=0.5, offset=20.0)
    estimates = [draw(F), draw(F).abs() + 0.5]
    expected = float64_batch_norm(far, weight, bias, *estimates, grad)
    _, _, rstd = compiled.batch_norm_forward(far, weight, bias, *estimates, 0.1, 1e-5)
    for ours, theirs in [(rstd, expected[2]), (estimates[1], expected[7])]:
        assert (ours - theirs).abs().max() <= tolerance * theirs.abs().max()


@needs_toolchain
def test_the_batch_norm_kernel_leaves_what_it_does_not_cover_to_pytorch(restore_threads):
    """Large steps on several threads (PyTorch's kernel splits them over the threads and was
    measured faster), strided inputs and half precision run PyTorch's kernel: bit-identical
    to it."""
    compiled = native.loops()
    weight, bias = torch.rand(512) + 0.5, torch.randn(512)
    large, strided = torch.randn(256, 512), torch.randn(512, 8).t()  # [8, 512], strided
    torch.set_num_threads(2)
    half = torch.ones(6, dtype=torch.bfloat16)
    cases = [(large, weight, bias), (strided, weight, bias),
             (torch.randn(4, 6, dtype=torch.bfloat16), half, half)]  # fmt: skip
    for x, w, b in cases:
        assert not compiled.own_batch_norm(x, w)
        grad = torch.randn_like(x)
        ours_estimates = [torch.zeros_like(w), torch.ones_like(w)]
        theirs_estimates = [e.clone() for e in ours_estimates]
        ours = list(compiled.batch_norm_forward(x, w, b, *ours_estimates, 0.1, 1e-5))
        ours += compiled.batch_norm_backward(grad, x, w, ours[1], ours[2], 1e-5, True)
        theirs = pytorch_batch_norm(x, w, b, *theirs_estimates, grad)
        for a, t in zip(ours + ours_estimates, theirs + theirs_estimates, strict=True):
            assert torch.equal(a, t)
    torch.set_num_threads(1)  # on one thread our kernel also runs the large step
    assert compiled.own_batch_norm(large, weight)


@needs_toolchain
@pytest.mark.parametrize("forward_threads,backward_threads", [(1, 2), (2, 1)])
def test_either_kernels_statistics_serve_the_others_backward(
    forward_threads, backward_threads, restore_threads
):
    """Which kernel runs is decided per call (by size and thread count), so a forward pass by
    one and a backward pass by the other must agree: both save the batch mean and the
    inverse std. A [256, 512] step runs ours on one thread and PyTorch's on two."""
    compiled = native.loops()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=generator) + 2
    grad, weight, bias = torch.randn(256, 512, generator=generator), torch.rand(512), None
    estimates = [torch.zeros(512), torch.ones(512)]
    expected = float64_batch_norm(x, weight, bias, *estimates, grad)
    torch.set_num_threads(forward_threads)
    assert compiled.own_batch_norm(x, weight) == (forward_threads == 1)
    y, mean, rstd = compiled.batch_norm_forward(x, weight, bias, *estimates, 0.1, 1e-5)
    torch.set_num_threads(backward_threads)
    assert compiled.own_batch_norm(x, weight) == (backward_threads == 1)
    grads = compiled.batch_norm_backward(grad, x, weight, mean, rstd, 1e-5, False)
    for ours, theirs in zip([y, mean, rstd, *grads[:2]], expected[:5], strict=True):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert grads[2] is None


@needs_toolchain
def test_the_compiled_loops_are_what_training_uses_by_default(monkeypatch):
    """Unset SEQTEST_NATIVE means "auto": the training pass of a vanilla RNN, a GRU and a
    normalised LSTM calls the compiled loops; "off" never calls them."""
    calls = []
    compiled = native.loops()
    assert compiled is not None

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(compiled, name)

    monkeypatch.setitem(native._built, "module", Spy())
    expected = {"rnn": ["rnn_forward", "rnn_backward"], "gru": ["gru_forward", "gru_backward"],
                "lstm": ["forward", "backward"]}  # fmt: skip
    for cell, names in expected.items():
        norm = "layer" if cell == "lstm" else "none"
        model = build_model(dict(cell=cell, hidden_size=4, norm=norm), 3, 2)
        monkeypatch.delenv("SEQTEST_NATIVE", raising=False)
        calls.clear()
        model(torch.randn(2, 5, 3)).sum().backward()
        assert calls == names
        monkeypatch.setenv("SEQTEST_NATIVE", "off")
        model(torch.randn(2, 5, 3)).sum().backward()
        assert calls == names


def test_a_failed_build_warns_once_and_trains_on_the_python_loops(fresh_build, monkeypatch):
    def broken():
        raise RuntimeError("Error building extension\nfoo.cpp:1: error: no such thing\n")

    monkeypatch.setattr(native, "_compile", broken)
    monkeypatch.delenv("SEQTEST_NATIVE", raising=False)
    model = build_model(dict(cell="lstm", hidden_size=4, norm="batch"), 3, 2)
    with pytest.warns(RuntimeWarning, match="Python loops.*error: no such thing"):
        model(torch.randn(2, 5, 3)).sum().backward()
    assert native.status().startswith("failed: building loops.cpp failed")
    with warnings.catch_warnings():  # warned once, not at every step
        warnings.simplefilter("error")
        model(torch.randn(2, 5, 3)).sum().backward()
    monkeypatch.setenv("SEQTEST_NATIVE", "require")
    with pytest.raises(RuntimeError, match="SEQTEST_NATIVE=require: building"):
        model(torch.randn(2, 5, 3))


def test_a_missing_toolchain_is_named(fresh_build, monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("SEQTEST_NATIVE", "require")
    assert "ninja" in native.toolchain_missing()
    with pytest.raises(RuntimeError, match="cannot build loops.cpp: no .*ninja"):
        native.loops()


def test_an_unknown_choice_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv("SEQTEST_NATIVE", "yes")
    with pytest.raises(ConfigError, match="SEQTEST_NATIVE.*auto, off, require"):
        native.loops()


def test_the_build_folder_is_keyed_by_the_source_text_and_flags(tmp_path, monkeypatch):
    """Installs with the same source share one build; a changed source or compiler flags
    build anew."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "loops.cpp"
    source.write_text("// one")
    monkeypatch.setattr(native, "SOURCE", source)
    first = native.build_directory()
    assert first.parent == tmp_path and first == native.build_directory()
    source.write_text("// two")
    second = native.build_directory()
    assert second != first
    monkeypatch.setattr(native, "CFLAGS", ["-O2"])  # other flags: another build
    assert native.build_directory() not in (first, second)


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """`cpp_extension.load` waits for its lock file to go; a build killed mid-way leaves it
    behind, which would hang every later run. A lock older than `STALE_LOCK_S` is removed
    before loading; a fresh one (a build running now) is left for load to wait on."""
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setattr(native, "build_directory", lambda: tmp_path)
    monkeypatch.setattr(cpp_extension, "load", lambda **_: seen.append(lock.exists()))
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - native.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    native._compile()
    lock.touch()
    native._compile()
    assert seen == [False, True]


@pytest.mark.slow
@needs_toolchain
def test_two_processes_building_at_once_both_get_the_loops(tmp_path):
    """The jobs of a parallel sweep may all start with no build in the cache: one builds,
    the others wait for its lock, and every one trains on the compiled loops."""
    code = (
        "import torch; from seqtest import native; from seqtest.models import build_model\n"
        "m = build_model(dict(cell='lstm', hidden_size=4, norm='batch'), 3, 2)\n"
        "m(torch.randn(2, 5, 3)).sum().backward(); print(native.status())"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "SEQTEST_NATIVE": "require"}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [job.communicate(timeout=600) for job in jobs]
    for job, (out, err) in zip(jobs, results, strict=True):
        assert job.returncode == 0 and out.strip() == "compiled", err
    (folder,) = tmp_path.iterdir()
    assert (folder / "seqtest_loops.so").exists() and not (folder / "lock").exists()


def test_a_build_is_logged_only_when_one_is_needed(tmp_path, monkeypatch, caplog):
    """Every run that trains these cells loads the loops; its log mentions the build only
    when there is none yet in the build folder."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(native, "build_directory", lambda: tmp_path)
    monkeypatch.setattr(cpp_extension, "load", lambda **_: None)
    with caplog.at_level(logging.INFO, logger="seqtest.native"):
        native._compile()
        assert "building the compiled BPTT loops" in caplog.text
        caplog.clear()
        (tmp_path / "seqtest_loops.so").touch()
        native._compile()
        assert caplog.text == ""
