"""Speed of seqtest against bare PyTorch, the cost of the gradient probes, parallel sweeps and
the allocator settings.

    python -m seqtest.bench --quick                 # CI smoke run, under two minutes
    python -m seqtest.bench                         # the full grid (tens of minutes)
    python -m seqtest.bench --json bench.json       # also write the records as JSON
    python -m seqtest.bench --only steps --models lstm bn_lstm --grid 64,200,128
    python -m seqtest.bench --device cuda           # the training steps on a GPU

Seven measurements, each a list of records (``kind`` tells them apart):

* ``step``: seqtest's whole training step (`seqtest.train.train_step`: task.sample, model,
  task.loss, backward, `clip_gradients`, the optimiser step of a run: Adam on PyTorch's
  fused kernel) against a bare PyTorch reference written here with no seqtest code
  (adding-problem batch, ``nn.RNN/LSTM/GRU`` + ``nn.Linear`` on the last step, MSE,
  ``clip_grad_norm_``, ``torch.optim.Adam`` as PyTorch builds it by default). Variants
  without a fused kernel are compared with the best hand-written loop or with the plain
  cell's module (see `REFERENCES`); the record also carries the target's own denominator
  (``target_ms``). For the normalised cells the same rounds also time PyTorch's
  normalisation kernels alone
  (`normalisation_kernels_step`): ``loop_plus_norms_ratio`` = (loop + those kernels) /
  loop, what the loop would cost with the normalisations added and nothing else. A
  step-by-step implementation built on those kernels can beat it only by doing the rest of
  the step faster than that Python loop (as seqtest's compiled loops do, `seqtest.native`;
  every record's ``loops`` says whether they ran: "compiled", "off" or why the build
  failed). Timed interleaved on ``--threads`` torch threads, seqtest / reference, then
  reference / seqtest, and so on: the medians of the rounds, their ratio, and the median of
  each round's ratio (``paired_ratio``).
* ``path``: seqtest's step on the path it takes against the same step on the twin's step
  loop under autograd (`path_records`): what each hand-written or fused path saves.
* ``optimizer``: the two optimisers' steps alone, over each model's parameters: how much of
  a step record's ratio the fused Adam accounts for.
* ``gemm``: the two orders of an input weight's gradient, grad' x and (x' grad)', for the
  input widths of the tasks: why the hand-written RNN and GRU take the second with few
  inputs (`seqtest.bptt.input_weight_gradient`).
* ``probe``: the gradient probes' share of a run's wall time at the default cadence
  (`seqtest.bench_probe.run_cost`).
* ``parallel``: a sweep under ``hydra/launcher=joblib`` against the same jobs one after another
  (the basic launcher), each as a ``python -m seqtest -m ...`` subprocess; before them, the
  machine's own ceiling (``kind: capacity``, `capacity_records`): one-thread processes side
  by side, and one process on every core's thread, against one process alone, for a matrix
  product, a memory-bound pass and the LSTM training step.
* ``allocator``: a training step in fresh processes with glibc's default allocator settings
  (``SEQTEST_MALLOC=default``), with those seqtest applies (`seqtest.allocator`), and with
  those plus no mapped blocks at all (``SEQTEST_MALLOC=no_mmap``, opt-in).

``--device cuda`` runs the step comparison on a GPU (both sides; timings wait for the
queued kernels), and the optimiser steps with them. The other five measure the CPU and run
only when asked for with ``--only``.

The benchmark configures torch as a run does (`seqtest.run.configure_torch`): subnormals
flushed and freed memory kept in the heap, for seqtest and the reference alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import resources

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from seqtest import allocator, bptt, native
from seqtest.models import ModelConfig, build_model, count_parameters, train_on_twin_loop
from seqtest.run import configure_torch
from seqtest.tasks.adding import AddingTask
from seqtest.train import TrainConfig, train_step

# as `seqtest` does at its start, before any tensor exists (PyTorch reads it once); the
# reference runs in the same process and gets the same pages
allocator.use_huge_pages()

#: Benchmarked models: name -> `ModelConfig` fields besides the hidden size.
MODELS: dict[str, dict] = {
    "rnn": dict(cell="rnn"),
    "lstm": dict(cell="lstm"),
    "gru": dict(cell="gru"),
    "rnn_sigmoid": dict(cell="rnn", activation="sigmoid"),
    "rnn_relu": dict(cell="rnn", activation="relu"),
    "rnn_prelu": dict(cell="rnn", activation="prelu"),
    "ln_lstm": dict(cell="lstm", norm="layer"),
    "bn_lstm": dict(cell="lstm", norm="batch"),
    "ln_rnn": dict(cell="rnn", norm="layer"),
    "bn_rnn": dict(cell="rnn", norm="batch"),
}

#: What each model is compared with: (reference, what the target is measured against, limit).
#: Where the target names several references, it is the fastest of them in the same rounds:
#: the normalised LSTMs' target is "the best plain LSTM loop", and of the two loops written
#: here, which one is faster depends on the size.
REFERENCES: dict[str, tuple[str, tuple[str, ...], float]] = {
    "rnn": ("nn.RNN", ("nn.RNN",), 1.05),
    "lstm": ("nn.LSTM", ("nn.LSTM",), 1.05),
    "gru": ("nn.GRU", ("nn.GRU",), 1.05),
    "rnn_sigmoid": ("sigmoid RNN loop", ("nn.RNN",), 1.3),
    # the ReLU RNN (the IRNN's cell) has PyTorch's own module, so the plain cells' limit
    "rnn_relu": ("nn.RNN relu", ("nn.RNN relu",), 1.05),
    # prelu (a learned slope per unit) has no PyTorch RNN module: the variants' limit
    "rnn_prelu": ("nn.RNN", ("nn.RNN",), 1.3),
    "ln_lstm": ("LSTM loop", ("LSTM loop", "LSTM BPTT loop"), 1.2),
    "bn_lstm": ("LSTM loop", ("LSTM loop", "LSTM BPTT loop"), 1.2),
    # the tanh RNN with a normalisation inside its step: no fused kernel, so the limit of
    # the RNN variants without one, against the plain cell's module
    "ln_rnn": ("nn.RNN", ("nn.RNN",), 1.3),
    "bn_rnn": ("nn.RNN", ("nn.RNN",), 1.3),
}

SECTIONS = ("steps", "paths", "optimizer", "gemm", "probes", "parallel", "allocator")
#: The bare reference's optimiser: ``torch.optim.Adam`` as PyTorch builds it by default (a loop
#: of small ops per parameter tensor on the CPU). seqtest's runs use the fused kernel.
REFERENCE_OPTIMIZER = "Adam"
QUICK_GRID = [(64, 200, 128)]
FULL_GRID = [(32, 100, 64), (64, 200, 128), (128, 400, 256)]
LR = 1e-3
CLIP = 1.0


# ---------------------------------------------------------------- the bare PyTorch reference


def adding_batch(batch: int, length: int, generator: torch.Generator):
    """The adding problem written plainly: values U[0,1], one marker in each half, target
    the sum of the two marked values. x [B, T, 2], y [B], on the generator's device."""
    device = generator.device
    values = torch.rand(batch, length, generator=generator, device=device)
    half = length // 2
    first = torch.randint(0, half, (batch, 1), generator=generator, device=device)
    second = torch.randint(half, length, (batch, 1), generator=generator, device=device)
    markers = torch.zeros(batch, length, device=device)
    markers.scatter_(1, first, 1.0).scatter_(1, second, 1.0)
    x = torch.stack([values, markers], dim=-1)
    y = values.gather(1, first).squeeze(1) + values.gather(1, second).squeeze(1)
    return x, y


class SigmoidRNNLoop(nn.Module):
    """h_t = sigmoid(W_ih x_t + W_hh h_{t-1} + b), written as one would by hand: the input
    term of all steps in one product, then one addmm and one sigmoid per step."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.core = nn.RNN(input_size, hidden, batch_first=True)  # only for its parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.core
        projected = F.linear(x, c.weight_ih_l0, c.bias_ih_l0 + c.bias_hh_l0)
        w_hh_t = c.weight_hh_l0.t()
        h = x.new_zeros(x.shape[0], c.hidden_size)
        for xp in projected.unbind(1):
            h = torch.sigmoid(torch.addmm(xp, h, w_hh_t))
        return h


class LSTMLoop(nn.Module):
    """The plain LSTM as a loop under autograd (the fastest of the variants tried that let
    autograd do the backward pass; `LSTMBPTTLoop` writes its own and is faster): gates stored
    in the order i, f, o, g so that one sigmoid covers [B, 3H] and one tanh [B, H]; the input
    term of all steps in one product; one addmm per step; c by addcmul."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_ih = nn.Parameter(torch.empty(4 * hidden, input_size))
        self.w_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(4 * hidden))
        bound = hidden**-0.5
        nn.init.uniform_(self.w_ih, -bound, bound)
        nn.init.uniform_(self.w_hh, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = self.hidden
        projected = F.linear(x, self.w_ih, self.bias)
        w_hh_t = self.w_hh.t()
        h = c = x.new_zeros(x.shape[0], H)
        for xp in projected.unbind(1):
            gates = torch.addmm(xp, h, w_hh_t)
            i, f, o = gates[:, : 3 * H].sigmoid().chunk(3, dim=1)
            c = torch.addcmul(f * c, i, gates[:, 3 * H :].tanh())
            h = o * c.tanh()
        return h


class _LSTMBackprop(torch.autograd.Function):
    """The last hidden state [B, H] of a plain LSTM (gates i, f, g, o) from its input term
    [T, B, 4H] (W_ih x_t + both biases), with the backward pass written by hand: the forward
    loop stores the activated gates, c_t, tanh(c_t) and h_t in [T, ...] buffers with autograd
    off; the backward loop runs the steps in reverse, writing dL/d(pre-activations) of every
    step into one buffer, so W_hh's gradient is one matrix product at the end."""

    @staticmethod
    def forward(ctx, inputs, w_hh):
        T, B, G = inputs.shape
        H = G // 4
        w_hh_t = w_hh.t().contiguous()
        gates, tanh_cells = inputs.new_empty(T, B, G), inputs.new_empty(T, B, H)
        cells, hidden = inputs.new_zeros(T + 1, B, H), inputs.new_zeros(T + 1, B, H)
        for t in range(T):
            z = torch.addmm(inputs[t], hidden[t], w_hh_t)
            act = torch.sigmoid(z, out=gates[t])
            i, f, g, o = act.chunk(4, dim=1)
            torch.tanh(z[:, 2 * H : 3 * H], out=g)
            c = torch.mul(f, cells[t], out=cells[t + 1]).addcmul_(i, g)
            torch.mul(o, torch.tanh(c, out=tanh_cells[t]), out=hidden[t + 1])
        ctx.save_for_backward(w_hh, gates, cells, tanh_cells, hidden)
        return hidden[T].clone()

    @staticmethod
    def backward(ctx, grad_last):
        w_hh, gates, cells, tanh_cells, hidden = ctx.saved_tensors
        T, B, G = gates.shape
        H = G // 4
        d_pre = torch.empty_like(gates)  # dL/d(W_ih x_t + W_hh h_{t-1} + b)
        d_act = gates.new_empty(B, G)
        d_i, d_f, d_g, d_o = d_act.chunk(4, dim=1)
        dh, dc = grad_last, torch.zeros_like(cells[0])
        for t in range(T - 1, -1, -1):
            i, f, g, o = gates[t].chunk(4, dim=1)
            k = tanh_cells[t]
            torch.mul(dh, k, out=d_o)
            dc += torch.ops.aten.tanh_backward(dh * o, k)
            torch.mul(dc, g, out=d_i)
            torch.mul(dc, cells[t], out=d_f)
            torch.mul(dc, i, out=d_g)
            dc *= f
            torch.ops.aten.sigmoid_backward.grad_input(d_act, gates[t], grad_input=d_pre[t])
            torch.ops.aten.tanh_backward.grad_input(d_g, g, grad_input=d_pre[t, :, 2 * H : 3 * H])
            dh = d_pre[t] @ w_hh
        d_w_hh = d_pre.view(T * B, G).t() @ hidden[:T].view(T * B, H)
        return d_pre, d_w_hh


class LSTMBPTTLoop(nn.Module):
    """The plain LSTM as a loop with a hand-written backward pass (`_LSTMBackprop`): the input
    term of all steps in one product, then one `addmm` per step and no autograd graph. At
    small sizes it is much faster than `LSTMLoop` under autograd; a normalised LSTM's loop
    does the same work plus its normalisations."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.core = nn.LSTM(input_size, hidden, batch_first=True)  # only for its parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.core
        inputs = F.linear(x.transpose(0, 1), c.weight_ih_l0, c.bias_ih_l0 + c.bias_hh_l0)
        return _LSTMBackprop.apply(inputs, c.weight_hh_l0)


class Fused(nn.Module):
    def __init__(self, kind: Callable[..., nn.RNNBase], input_size: int, hidden: int) -> None:
        super().__init__()
        self.core = kind(input_size, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)[0][:, -1]


def reference_core(name: str, input_size: int, hidden: int) -> nn.Module:
    """The reference's recurrent part by name (see `REFERENCES`): [B, T, in] -> last h [B, H]."""
    fused = {"nn.RNN": nn.RNN, "nn.LSTM": nn.LSTM, "nn.GRU": nn.GRU,
             "nn.RNN relu": functools.partial(nn.RNN, nonlinearity="relu")}  # fmt: skip
    if name in fused:
        return Fused(fused[name], input_size, hidden)
    loops = {"sigmoid RNN loop": SigmoidRNNLoop, "LSTM loop": LSTMLoop,
             "LSTM BPTT loop": LSTMBPTTLoop}  # fmt: skip
    return loops[name](input_size, hidden)


def reference_optimizer(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The reference's optimiser, `REFERENCE_OPTIMIZER`: ``torch.optim.Adam`` as PyTorch
    builds it by default."""
    return torch.optim.Adam(parameters, lr=LR)


def reference_step(
    name: str, batch: int, length: int, hidden: int, seed: int = 0, device: str = "cpu"
) -> Callable:
    """A closure running one bare-PyTorch training step of reference `name` on `device`."""
    torch.manual_seed(seed)
    core = reference_core(name, 2, hidden).to(device)
    readout = nn.Linear(hidden, 1).to(device)
    parameters = [*core.parameters(), *readout.parameters()]
    optimizer = reference_optimizer(parameters)
    generator = torch.Generator(device).manual_seed(seed)

    def step() -> None:
        x, y = adding_batch(batch, length, generator)
        loss = F.mse_loss(readout(core(x)).squeeze(1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()

    return step


def normalisation_kernels_step(
    norm: str, batch: int, length: int, hidden: int, device: str = "cpu", cell: str = "lstm"
) -> Callable:
    """A closure running, `length` times, the forward and backward kernels of the
    normalisations a normalised step must run inside its loop alone (PyTorch's native layer-
    or batch-norm kernels; the LSTM's two, on [B, 4H] for W_hh h and [B, H] for c; the
    RNN's one, on [B, H]): what a step-by-step normalised cell must add to the plain loop's
    work, whatever else it does. (The normalisation of W_ih x does not depend on the
    recurrence and runs over the whole sequence at once.) `step_records` reports
    (loop + this) / loop."""
    aten = torch.ops.aten
    generator = torch.Generator().manual_seed(0)
    cases = []
    for width in (4 * hidden, hidden) if cell == "lstm" else (hidden,):
        x = torch.randn(batch, width, generator=generator)
        grad = torch.randn(batch, width, generator=generator)
        case = (x, grad, torch.ones(width), torch.zeros(width), torch.zeros(width),
                torch.ones(width))  # fmt: skip
        cases.append(tuple(tensor.to(device) for tensor in case))
    mask = [True, True, True]

    def layer_norm(x, grad, weight, bias, _mean, _var) -> None:
        _, mean, rstd = torch.native_layer_norm(x, weight.shape, weight, bias, 1e-5)
        aten.native_layer_norm_backward(grad, x, weight.shape, mean, rstd, weight, bias, mask)

    def batch_norm(x, grad, weight, bias, running_mean, running_var) -> None:
        _, mean, rstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, 0.1, 1e-5
        )
        aten.native_batch_norm_backward(grad, x, weight, None, None, mean, rstd, True, 1e-5, mask)

    one = layer_norm if norm == "layer" else batch_norm

    def step() -> None:
        for _ in range(length):
            for case in cases:
                one(*case)

    return step


# ---------------------------------------------------------------- seqtest's step


def run_optimizer(parameters: Iterable[nn.Parameter], lr: float = LR) -> torch.optim.Optimizer:
    """The optimiser a run builds by default (``optim: adam``, conf/optim/adam.yaml: Adam on
    PyTorch's fused kernel), so that the benchmark times what a run does."""
    node = OmegaConf.load(resources.files("seqtest.conf").joinpath("optim", "adam.yaml"))
    node.lr = lr
    return instantiate(node)(parameters)


def describe(optimizer: torch.optim.Optimizer) -> str:
    """The optimiser's class and kernel for the records: "Adam" or "Adam(fused)"."""
    name = type(optimizer).__name__
    return f"{name}(fused)" if optimizer.defaults.get("fused") else name


def seqtest_model(
    model: str, hidden: int, length: int, seed: int = 0, device: str = "cpu"
) -> tuple[AddingTask, nn.Module]:
    """The adding task of `length` steps and seqtest's `model` (a key of `MODELS`) of
    `hidden` units for it, initialised from `seed`, on `device`."""
    task = AddingTask(length=length)
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=hidden, name=model, **MODELS[model])
    return task, build_model(config, task.input_size, task.output_size, task.seq_len).to(device)


def seqtest_step(
    model: str,
    batch: int,
    length: int,
    hidden: int,
    seed: int = 0,
    device: str = "cpu",
    twin_loop: bool = False,
) -> Callable:
    """A closure running one step of seqtest's training loop (`seqtest.train.train_step`)
    on `device`; with `twin_loop`, every layer on the twin's step loop
    (`seqtest.models.train_on_twin_loop`). Its ``path`` says which path the layers take."""
    task, net = seqtest_model(model, hidden, length, seed, device)
    train_on_twin_loop(net, twin_loop)
    net.train()
    parameters = [p for p in net.parameters() if p.requires_grad]
    optimizer = run_optimizer(net.parameters())
    train_config = TrainConfig(batch_size=batch, clip=CLIP, progress=False)
    generator = torch.Generator(device).manual_seed(seed)

    def step() -> None:
        train_step(net, task, optimizer, parameters, train_config, generator)

    step.optimizer = describe(optimizer)
    # (an input of no steps: `path` reads the batch size and the device; with a [B, T, in]
    # tensor allocated here, 400 KB at the largest size, the large LSTM row measured 1.48x
    # and 1.88x, against 0.97-1.00 without, in the same process and on the same kernel)
    step.path = net.layers[0].path(torch.empty(batch, 0, task.input_size, device=device))
    return step


# ---------------------------------------------------------------- timing


def _synchronize() -> None:
    """Wait for queued CUDA work, so that a timing covers the kernels it launched (CUDA runs
    asynchronously; on the CPU there is nothing to wait for)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(step: Callable, repeats: int) -> float:
    """Seconds per step over `repeats` consecutive steps."""
    _synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    _synchronize()
    return (time.perf_counter() - started) / repeats


def interleaved(
    steps: dict[str, Callable], rounds: int, repeats: int, warmup: int = 2, settle: int = 0
) -> dict[str, list[float]]:
    """Time each closure `repeats` steps at a time, in turn, for `rounds` rounds: the seconds
    per step of each, round by round. The order reverses every other round (A B C, C B A,
    ...), so that a machine whose speed drifts during a round favours no closure. `settle`
    untimed steps start each turn: the first step after a different workload's turn can pay
    for memory that workload left behind (`path_records`)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else reversed(order):
            for _ in range(settle):
                steps[name]()
            times[name].append(_time(steps[name], repeats))
    return times


def paired_ratio(times: dict[str, list[float]], name: str, other: str) -> float:
    """The median over rounds of `name`'s time / `other`'s in the same round. Each round's
    two timings are seconds apart, so a drift of the machine's speed over a run (on the
    2-core machine of docs/performance.md, up to 1.5x within a minute) cancels in each
    ratio, where it does not in the ratio of the two medians."""
    return statistics.median(a / b for a, b in zip(times[name], times[other], strict=True))


def tanh_kernel_name() -> str | None:
    """The compiled loops' tanh ("avx512", "avx2" or "pytorch"), None where they are not
    built (yet) or off."""
    return native.loops().tanh_kernel_name() if native.status() == "compiled" else None


def interleaved_us(
    closures: dict[str, Callable], rounds: int, budget_s: float, calibrate: str, settle: int = 0
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """`interleaved` with as many repeats as fill about `budget_s` for closure `calibrate`
    (and `settle` untimed steps at the start of each turn): each closure's median in
    microseconds, and the seconds per call of every round."""
    repeats = _repeats_for(closures[calibrate], budget_s)
    times = interleaved(closures, rounds, repeats, settle=settle)
    return {name: 1e6 * statistics.median(values) for name, values in times.items()}, times


def _repeats_for(step: Callable, budget_s: float) -> int:
    """How many steps fill about `budget_s` seconds (at least 1)."""
    _synchronize()
    started = time.perf_counter()
    step()
    _synchronize()
    return max(1, round(budget_s / max(time.perf_counter() - started, 1e-6)))


def step_records(
    models: Iterable[str],
    grid: Iterable[tuple[int, int, int]],
    rounds: int = 5,
    budget_s: float = 0.5,
    repeats: int | None = None,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Time seqtest's step against its reference for every model and (B, T, H) of `grid`.

    One record per pair: ``model``, ``B``, ``T``, ``H``, ``seqtest_ms``, ``reference_ms``,
    ``ratio`` (seqtest / reference, of the medians), ``reference`` (what it is), the target's
    own denominator ``target_of`` / ``target_ms``, ``target_ratio`` and ``target``, and
    ``paired_ratio`` / ``target_paired_ratio``: the median of the per-round ratios
    (`paired_ratio`), the estimate a drifting machine speed disturbs least.
    Every reference a target names (nn.RNN for the sigmoid RNN; both LSTM loops for the
    normalised LSTMs) is timed in the same rounds, and the target is the fastest of them
    (``candidates_ms`` holds each one's time). `repeats` fixes the steps per timing; else
    they fill about `budget_s`. Everything runs on `device` (recorded as ``device``).
    """
    records = []
    for B, T, H in grid:
        for model in models:
            reference, candidates, limit = REFERENCES[model]
            steps = {
                "seqtest": seqtest_step(model, B, T, H, device=device),
                reference: reference_step(reference, B, T, H, device=device),
            }
            for name in candidates:
                if name not in steps:
                    steps[name] = reference_step(name, B, T, H, device=device)
            norm, cell = MODELS[model].get("norm"), MODELS[model]["cell"]
            if norm:
                steps["norm_kernels"] = normalisation_kernels_step(norm, B, T, H, device, cell)
            n = repeats or _repeats_for(steps["seqtest"], budget_s)
            times = interleaved(steps, rounds, n)
            medians = {name: statistics.median(values) for name, values in times.items()}
            seqtest_ms = 1000 * medians["seqtest"]
            reference_ms = 1000 * medians[reference]
            target_of = min(candidates, key=medians.__getitem__)
            target_ms = 1000 * medians[target_of]
            record = {
                "kind": "step",
                "model": model,
                "B": B,
                "T": T,
                "H": H,
                "seqtest_ms": seqtest_ms,
                "reference_ms": reference_ms,
                "ratio": seqtest_ms / reference_ms,
                "reference": reference,
                "target_of": target_of,
                "target_ms": target_ms,
                "target_ratio": seqtest_ms / target_ms,
                "paired_ratio": paired_ratio(times, "seqtest", reference),
                "target_paired_ratio": paired_ratio(times, "seqtest", target_of),
                "target": limit,
                # the optimisers: the run's default (fused Adam) against PyTorch's default Adam
                # (their cost alone: `optimizer_records`)
                "seqtest_optimizer": steps["seqtest"].optimizer,
                "reference_optimizer": REFERENCE_OPTIMIZER,
                "candidates_ms": {name: 1000 * medians[name] for name in candidates},
                "rounds": rounds,
                "steps_per_round": n,
                "threads": torch.get_num_threads(),
                "device": device,
                # the hand-written BPTT's loops: "compiled", "off", or why the build failed
                # ("not built" where only fused kernels ran so far), and their tanh
                "loops": native.status(),
                "tanh": tanh_kernel_name(),
            }
            with_norms = ""
            if "norm_kernels" in medians:
                norms_ms = record["norm_kernels_ms"] = 1000 * medians["norm_kernels"]
                record["loop_plus_norms_ratio"] = (target_ms + norms_ms) / target_ms
                with_norms = (
                    f"; loop + norm kernels {record['loop_plus_norms_ratio']:.3f}"
                    f" ({record['loops']} loops)"
                )
            records.append(record)
            if log:
                log(
                    f"{model:12s} B={B:<4d} T={T:<4d} H={H:<4d} seqtest {seqtest_ms:8.2f} ms  "
                    f"{reference:16s} {reference_ms:8.2f} ms  ratio {record['ratio']:.3f} "
                    f"(paired {record['paired_ratio']:.3f})  vs {target_of} "
                    f"{record['target_ratio']:.3f} (paired {record['target_paired_ratio']:.3f}; "
                    f"target <= {limit}){with_norms}"
                )
    return records


# ---------------------------------------------------------------- paths against the twin's loop


def path_records(
    models: Iterable[str],
    grid: Iterable[tuple[int, int, int]],
    rounds: int = 5,
    budget_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """seqtest's training step on the path each model takes (`RecurrentLayer.path`: the
    hand-written BPTT, or a fused kernel) against the same step with every layer on the
    twin's step loop under autograd (`seqtest.models.train_on_twin_loop`), interleaved: what
    each path saves over the reference loop, and what a cell on that loop would cost.
    Records: ``kind`` "path", ``model``, ``B``, ``T``, ``H``, ``path``, ``seqtest_ms``,
    ``twin_loop_ms``, ``ratio`` (of the medians) and ``paired_ratio``.

    Each turn starts with an untimed step (`interleaved`'s `settle`): measured at the largest
    size, the fused LSTM's first step after a step of the twin's loop took 0.9-1.3 s against
    0.45 s for the ones after it, so with one timed step per turn the fused side read
    864 ms."""
    records = []
    for B, T, H in grid:
        for model in models:
            fast = seqtest_step(model, B, T, H)
            steps = {"seqtest": fast, "twin loop": seqtest_step(model, B, T, H, twin_loop=True)}
            medians, times = interleaved_us(steps, rounds, budget_s, "twin loop", settle=1)
            seqtest_ms, twin_ms = (medians[name] / 1000 for name in steps)
            record = {
                "kind": "path",
                "model": model,
                "B": B,
                "T": T,
                "H": H,
                "path": fast.path,
                "seqtest_ms": seqtest_ms,
                "twin_loop_ms": twin_ms,
                "ratio": seqtest_ms / twin_ms,
                "paired_ratio": paired_ratio(times, "seqtest", "twin loop"),
                "rounds": rounds,
                "loops": native.status(),
            }
            records.append(record)
            if log:
                log(
                    f"path {model:12s} B={B:<4d} T={T:<4d} H={H:<4d} {fast.path:6s} "
                    f"{seqtest_ms:8.2f} ms  twin loop {twin_ms:8.2f} ms  ratio "
                    f"{record['ratio']:.3f} (paired {record['paired_ratio']:.3f})"
                )
    return records


# ---------------------------------------------------------------- the optimiser alone


def optimizer_records(
    models: Iterable[str],
    hidden_sizes: Iterable[int],
    rounds: int = 5,
    budget_s: float = 0.2,
    log: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> list[dict]:
    """The optimiser step alone, over the parameters of each model at each hidden size: the
    run's default (`run_optimizer`) against PyTorch's default Adam (the reference's), timed
    interleaved. Their difference is part of every step record's ``ratio``; this shows how
    much. One record per pair: ``model``, ``H``, ``parameters``, ``seqtest_optimizer`` /
    ``reference_optimizer``, ``seqtest_us`` / ``reference_us`` (medians), ``ratio``,
    ``paired_ratio`` and ``saved_us``."""
    records = []
    for H in hidden_sizes:
        for model in models:
            optimizers = {}
            for name, make in (("seqtest", run_optimizer), ("reference", reference_optimizer)):
                _, net = seqtest_model(model, H, length=2, device=device)
                parameters = [p for p in net.parameters() if p.requires_grad]
                for parameter in parameters:
                    parameter.grad = torch.randn_like(parameter)
                optimizers[name] = make(parameters)
            steps = {name: optimizer.step for name, optimizer in optimizers.items()}
            medians, times = interleaved_us(steps, rounds, budget_s, calibrate="reference")
            seqtest_us, reference_us = medians["seqtest"], medians["reference"]
            record = {
                "kind": "optimizer",
                "model": model,
                "H": H,
                "parameters": count_parameters(net),
                "seqtest_optimizer": describe(optimizers["seqtest"]),
                "reference_optimizer": REFERENCE_OPTIMIZER,
                "seqtest_us": seqtest_us,
                "reference_us": reference_us,
                "ratio": seqtest_us / reference_us,
                "paired_ratio": paired_ratio(times, "seqtest", "reference"),
                "saved_us": reference_us - seqtest_us,
                "rounds": rounds,
                "threads": torch.get_num_threads(),
                "device": device,
            }
            records.append(record)
            if log:
                log(
                    f"optimizer {model:12s} H={H:<4d} {record['seqtest_optimizer']} "
                    f"{seqtest_us:7.1f} us  {REFERENCE_OPTIMIZER} {reference_us:7.1f} us  "
                    f"ratio {record['ratio']:.3f} (paired {record['paired_ratio']:.3f}), "
                    f"{record['saved_us']:.0f} us saved per step"
                )
    return records


# ---------------------------------------------------------------- input-weight gradient

#: Input widths of the ``gemm`` section: the tasks' (1 to 10) and both sides of the switch.
GEMM_INPUTS = (1, 2, 4, 8, 10, 14, 16, 32, 128)


def gemm_records(
    grid: Iterable[tuple[int, int, int]],
    rounds: int = 5,
    budget_s: float = 0.2,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """The two orders of an input weight's gradient grad' x ([G, in], G = 4H gate rows, N =
    B * T rows of grad [N, G] and x [N, in]): ``direct`` = grad.t() @ x, ``transposed`` =
    (x.t() @ grad).t(), timed interleaved for each input width in `GEMM_INPUTS`. The hand-
    written RNN and GRU take the transposed one below `bptt.SKINNY_INPUTS` inputs
    (`bptt.input_weight_gradient`); ``chosen`` says which. One record per (N, G, in):
    ``direct_us``, ``transposed_us``, ``ratio`` = direct / transposed (medians) and
    ``paired_ratio``."""
    records = []
    for B, T, H in grid:
        N, G = B * T, 4 * H
        grad = torch.randn(N, G)
        for width in GEMM_INPUTS:
            x = torch.randn(N, width)
            products = {
                "direct": lambda x=x, grad=grad: grad.t().mm(x),
                "transposed": lambda x=x, grad=grad: x.t().mm(grad).t(),
            }
            medians, times = interleaved_us(products, rounds, budget_s, calibrate="direct")
            direct_us, transposed_us = medians["direct"], medians["transposed"]
            record = {
                "kind": "gemm",
                "N": N,
                "G": G,
                "inputs": width,
                "direct_us": direct_us,
                "transposed_us": transposed_us,
                "ratio": direct_us / transposed_us,
                "paired_ratio": paired_ratio(times, "direct", "transposed"),
                "chosen": "transposed" if width < bptt.SKINNY_INPUTS else "direct",
                "rounds": rounds,
                "threads": torch.get_num_threads(),
            }
            records.append(record)
            if log:
                log(
                    f"gemm N={N:<6d} G={G:<5d} in={width:<4d} direct {direct_us:9.1f} us  "
                    f"transposed {transposed_us:9.1f} us  ratio {record['ratio']:.2f} "
                    f"(paired {record['paired_ratio']:.2f}); seqtest takes {record['chosen']}"
                )
    return records


# ---------------------------------------------------------------- probes


def probe_records(cells: Iterable[str], length: int, steps: int, hidden: int, log=None):
    """The probes' share of a run at the default cadence (`seqtest.bench_probe.run_cost`)."""
    from seqtest.bench_probe import run_cost

    records = []
    for cell in cells:
        cost = run_cost(cell, length, steps, hidden)
        record = {"kind": "probe", "model": cell, "T": length, "H": hidden, "steps": steps}
        record |= {key: value for key, value in cost.items() if key != "cell"}
        record["target"] = 0.05
        records.append(record)
        with_probes, without = (
            "/".join(f"{wall:.0f}" for wall in cost["walls_s"][key])
            for key in ("with_probes", "without")
        )
        if log:
            log(
                f"probes {cell:5s} T={length} H={hidden} steps={steps}: "
                f"{100 * cost['probe_share']:.1f}% of the run by their own time (target "
                f"<= 5%); {100 * cost['difference_share']:.1f}% by the difference of the mean "
                f"wall times with and without them (runs {with_probes} s with, "
                f"{without} s without)"
            )
    return records


# ---------------------------------------------------------------- parallel sweeps


def _sweep(overrides: list[str], env: dict | None = None) -> float:
    """Wall seconds of `python -m seqtest -m <overrides>` in a fresh sweep folder."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable, "-m", "seqtest", "-m", *overrides,
            f"hydra.sweep.dir={folder}", "train.progress=false", "analysis.plots=false",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(
            command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, cwd=folder,
        )  # fmt: skip
        return time.perf_counter() - started


#: Workloads of the parallel-capacity measurement: what one process repeats, built on demand.
CAPACITY_WORKLOADS = ("gemm", "stream", "lstm_step")


def _capacity_work(workload: str, quick: bool) -> Callable[[], None]:
    """One unit of a workload: a [512, 512] matrix product (compute-bound, in cache), tanh
    over 4M floats (16 MB in and out: memory-bound), or seqtest's LSTM training step at
    B=64, T=200, H=128 (the two-LSTM sweep's job; B=8, T=20, H=16 with ``quick``)."""
    if workload == "gemm":
        a, out = torch.randn(512, 512), torch.empty(512, 512)
        return lambda: torch.mm(a, a, out=out)
    if workload == "stream":
        x, out = torch.randn(1 << 22), torch.empty(1 << 22)
        return lambda: torch.tanh(x, out=out)
    if workload == "lstm_step":
        return seqtest_step("lstm", *((8, 20, 16) if quick else (64, 200, 128)))
    raise ValueError(f"workload={workload!r}: allowed {', '.join(CAPACITY_WORKLOADS)}")


def _capacity_child(workload: str, quick: bool, seconds: float, threads: int = 1) -> None:
    """Run in a fresh process on `threads` torch threads: warm up, say ``ready``, read the
    shared start time from stdin, then count the units of work finished in the window
    [start, start + seconds]; print JSON."""
    configure_torch(threads)
    work = _capacity_work(workload, quick)
    for _ in range(2):
        work()
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    while time.time() < start_at:
        time.sleep(0.0005)
    started = time.time()
    stop, done = started + seconds, 0
    now = started
    while now < stop:
        work()
        done += 1
        now = time.time()
    print(json.dumps({"started": started, "ended": now, "units": done / (now - started)}))


def _capacity_round(
    workload: str, processes: int, quick: bool, seconds: float, threads: int = 1
) -> list[dict]:
    """`processes` children side by side over the same window, `threads` torch threads each;
    each one's JSON. The window opens once every child has imported and warmed up (a
    barrier, not a guessed delay)."""
    arguments = f"{workload!r}, {quick!r}, {seconds!r}, {threads!r}"
    code = f"from seqtest.bench import _capacity_child; _capacity_child({arguments})"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                child.wait()
                raise RuntimeError(f"capacity child ({workload}) exited with {child.returncode}")
        start_at = time.time() + 0.1
        for child in children:
            child.stdin.write(f"{start_at!r}\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = child.communicate()
            if child.returncode:
                raise RuntimeError(f"capacity child ({workload}) exited with {child.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:  # a failed child must not leave the others waiting for their start time
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def capacity_records(
    quick: bool, rounds: int = 1, workloads: Iterable[str] = CAPACITY_WORKLOADS, log=None
) -> list[dict]:
    """What running side by side can gain on this machine, the ceiling of the parallel-sweep
    speed-ups. Three ways to use the cores for the same work, over the same window:

    * ``alone``: one process, one thread;
    * ``side_by_side``: one one-thread process per core (what joblib runs); its throughput
      over ``alone`` is below the core count where the cores share their arithmetic units
      or memory bandwidth (hyperthreads, a virtual machine's vCPUs on one physical core, a
      saturated memory bus);
    * ``threaded``: one process with one thread per core (the basic launcher, one job
      after another).

    ``parallel_ceiling`` = side_by_side / threaded is the most a joblib sweep of such jobs can
    gain over the basic launcher: work that already spreads well over threads leaves little
    to gain. Rounds alternate the three; medians."""
    processes = os.cpu_count() or 1
    seconds = 0.5 if quick else 4.0
    records = []
    for workload in workloads:
        alone, together, threaded, overlaps = [], [], [], []
        for _ in range(rounds):
            alone.append(_capacity_round(workload, 1, quick, seconds)[0]["units"])
            threaded.append(_capacity_round(workload, 1, quick, seconds, processes)[0]["units"])
            side_by_side = _capacity_round(workload, processes, quick, seconds)
            together.append(sum(r["units"] for r in side_by_side))
            overlaps.append(
                min(r["ended"] for r in side_by_side) - max(r["started"] for r in side_by_side)
            )
        alone_rate, together_rate = statistics.median(alone), statistics.median(together)
        threaded_rate = statistics.median(threaded)
        record = {
            "kind": "capacity",
            "workload": workload,
            "processes": processes,
            "alone_per_s": alone_rate,
            "side_by_side_per_s": together_rate,
            "throughput": together_rate / alone_rate,
            "per_process_slowdown": processes * alone_rate / together_rate,
            "threaded_per_s": threaded_rate,
            "thread_speedup": threaded_rate / alone_rate,
            "parallel_ceiling": together_rate / threaded_rate,
            "seconds": seconds,
            "overlap_s": min(overlaps),  # the shortest time all ran at once, in any round
            "rounds": rounds,
        }
        records.append(record)
        if log:
            log(
                f"capacity {workload:9s}: one process {alone_rate:.1f}/s, {processes} side by side "
                f"{together_rate:.1f}/s in all: {record['throughput']:.2f}x the throughput of "
                f"one (each process {record['per_process_slowdown']:.2f}x slower than alone); "
                f"one process on {processes} threads {threaded_rate:.1f}/s "
                f"({record['thread_speedup']:.2f}x): side by side / threaded "
                f"{record['parallel_ceiling']:.2f}x"
            )
    return records


def parallel_records(quick: bool, rounds: int = 1, log=None) -> list[dict]:
    """Two sweeps, each under joblib and one job after another, interleaved.

    * quick_compare (3 jobs: rnn, lstm, gru on adding T=50): joblib with its default n_jobs
      (one job per core, one thread each) against the basic launcher, both with torch's
      default threads (what `seqtest -m experiment=quick_compare` does) and with one thread
      per job (the speed-up of running side by side alone). ``--quick`` measures only the
      latter, on shortened runs.
    * two B=64, T=200, H=128 LSTM jobs (seeds 0 and 1): joblib with two jobs of one thread
      against the basic launcher with two threads per job. Not with ``--quick``: on a machine
      whose cores are busy, two threads per job can take minutes even for a few steps.
    """
    if quick:
        short = ["train.steps=20", "train.eval_every=10", "analysis.every=10"]
        quick_steps = lstm_steps = [*short, "train.val_size=64", "analysis.batch_size=16"]
        basic_variants = {"basic_1_thread": ["threads=1"]}
    else:
        quick_steps, lstm_steps = [], ["train.steps=500", "train.eval_every=100"]
        basic_variants = {"basic": ["threads=null"], "basic_1_thread": ["threads=1"]}
    lstm = [
        "model=lstm", "task.length=200", "model.hidden_size=128", "train.batch_size=64",
        "train.early_stop=false", "seed=0,1", *lstm_steps,
    ]  # fmt: skip
    sweeps = {
        "quick_compare": (["experiment=quick_compare", *quick_steps], basic_variants, []),
        "lstm_B64_T200_H128_x2": (
            lstm, {"basic_2_threads": ["threads=2"]}, ["hydra.launcher.n_jobs=2"]
        ),
    }  # fmt: skip
    if quick:
        del sweeps["lstm_B64_T200_H128_x2"]
    records = []
    for name, (overrides, sequential, joblib) in sweeps.items():
        variants = {**sequential, "joblib": ["hydra/launcher=joblib", *joblib]}
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for _ in range(rounds):
            for variant, extra in variants.items():
                times[variant].append(_sweep([*overrides, *extra]))
        medians = {variant: statistics.median(values) for variant, values in times.items()}
        first = next(iter(sequential))
        record = {
            "kind": "parallel",
            "sweep": name,
            "overrides": overrides,
            "seconds": medians,
            "basic": first,
            "basic_s": medians[first],
            "joblib_s": medians["joblib"],
            "speedup": medians[first] / medians["joblib"],
            "target": 1.6 if name == "quick_compare" else 1.3,
            "rounds": rounds,
        }
        records.append(record)
        if log:
            timings = ", ".join(f"{k} {v:.1f} s" for k, v in medians.items())
            log(
                f"sweep {name}: {timings}; speed-up over {first} {record['speedup']:.2f}x "
                f"(target >= {record['target']})"
            )
    return records


# ---------------------------------------------------------------- allocator


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM), or None off Linux. Not `ru_maxrss`: Linux
    carries that over `execve` from the parent, so a fresh child would report the bench's
    own peak."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def _allocator_child(model: str, B: int, T: int, H: int, steps: int) -> None:
    """Run in a fresh process: median ms per step, minor page faults per step and peak
    resident memory, as JSON. The parent sets SEQTEST_MALLOC to choose the settings."""
    configure_torch(1)
    step = seqtest_step(model, B, T, H)
    for _ in range(3):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "ms": 1000 * statistics.median(times),
        "faults_per_step": (usage.ru_minflt - faults) / steps,
        "max_rss_mb": _peak_rss_mb(),
        "state": allocator.keep_freed_memory(),
        "huge_pages": allocator.huge_pages_on(),
    }))  # fmt: skip


def allocator_records(cases: Iterable[tuple], rounds: int, steps: int, log=None) -> list[dict]:
    """Each (model, B, T, H) in fresh processes with glibc's and PyTorch's default allocator
    settings, with seqtest's (`seqtest.allocator`: glibc's thresholds and huge pages) and with
    the opt-in ``no_mmap``, interleaved."""
    records = []
    for model, B, T, H in cases:
        results: dict[str, list[dict]] = {"default": [], "tuned": [], "no_mmap": []}
        for _ in range(rounds):
            for setting in results:
                # each child starts from glibc's and PyTorch's defaults; seqtest's settings
                # are then applied or not by the child itself, as SEQTEST_MALLOC says
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                env.pop("THP_MEM_ALLOC_ENABLE", None)
                env["SEQTEST_MALLOC"] = setting
                code = (
                    "from seqtest.bench import _allocator_child; "
                    f"_allocator_child({model!r}, {B}, {T}, {H}, {steps})"
                )
                out = subprocess.run(
                    [sys.executable, "-c", code], env=env, check=True, capture_output=True,
                    text=True,
                ).stdout  # fmt: skip
                results[setting].append(json.loads(out.strip().splitlines()[-1]))
        medians = {
            setting: {
                key: statistics.median(r[key] for r in runs) for key in ("ms", "faults_per_step")
            }
            | {"max_rss_mb": max((r["max_rss_mb"] or 0) for r in runs) or None}
            for setting, runs in results.items()
        }
        default, tuned, no_mmap = medians["default"], medians["tuned"], medians["no_mmap"]
        record = {
            "kind": "allocator",
            "model": model,
            "B": B,
            "T": T,
            "H": H,
            "default_ms": default["ms"],
            "tuned_ms": tuned["ms"],
            "speedup": default["ms"] / tuned["ms"],
            "default_faults_per_step": default["faults_per_step"],
            "tuned_faults_per_step": tuned["faults_per_step"],
            "no_mmap_ms": no_mmap["ms"],
            "no_mmap_speedup": default["ms"] / no_mmap["ms"],
            "no_mmap_faults_per_step": no_mmap["faults_per_step"],
            "max_rss_mb": {setting: m["max_rss_mb"] for setting, m in medians.items()},
            "states": {setting: runs[0]["state"] for setting, runs in results.items()},
            "huge_pages": {setting: runs[0]["huge_pages"] for setting, runs in results.items()},
            "settings": dict(allocator.ENVIRONMENT),
            "rounds": rounds,
        }
        records.append(record)
        if log:
            log(
                f"allocator {model:8s} B={B} T={T} H={H}: "
                + "; ".join(
                    f"{setting} {m['ms']:.1f} ms, {m['faults_per_step']:.0f} faults/step, "
                    f"peak {m['max_rss_mb'] or float('nan'):.0f} MB"
                    for setting, m in medians.items()
                )
                + f"; speed-up tuned {record['speedup']:.2f}x, "
                f"no_mmap {record['no_mmap_speedup']:.2f}x"
            )
    return records


# ---------------------------------------------------------------- command line


def machine(device: str = "cpu") -> dict:
    gpu = torch.cuda.get_device_name(device) if device == "cuda" else None
    return {
        "kind": "machine",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "allocator": allocator.keep_freed_memory(),
        "huge_pages": allocator.huge_pages_on(),
        "device": device,
        "gpu": gpu,
        "tf32": torch.backends.cudnn.allow_tf32,  # (off, as in a run: `configure_torch`)
    }


def _grid(text: str) -> tuple[int, int, int]:
    B, T, H = (int(v) for v in text.split(","))
    return B, T, H


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, few rounds (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the records here")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--grid", nargs="+", type=_grid, metavar="B,T,H")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 3 quick, 7 full)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the steps")
    parser.add_argument("--repeats", type=int, help="steps per timing (default: fill ~0.25/1 s)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where the training steps run (the other measurements are of the CPU; with "
        "cuda, --only defaults to steps)",
    )  # fmt: skip
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS,
        help="which measurements (default: all seven on the CPU, steps and optimizer on cuda)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (allowed: cpu, cuda)")
    if args.only is None:
        args.only = ("steps", "optimizer") if args.device == "cuda" else SECTIONS
    configure_torch(args.threads)  # as a run: flush subnormals, keep freed memory
    quick = args.quick
    grid = args.grid or (QUICK_GRID if quick else FULL_GRID)
    rounds = args.rounds or (3 if quick else 7)

    def log(line: str) -> None:
        print(line, flush=True)

    records = [machine(args.device)]
    log(f"# {records[0]}")
    if "steps" in args.only:
        budget = 0.25 if quick else 1.0
        records += step_records(
            args.models, grid, rounds, budget, args.repeats, log=log, device=args.device
        )
    if "paths" in args.only:
        records += path_records(args.models, grid, rounds, 0.25 if quick else 1.0, log=log)
    if "optimizer" in args.only:
        hidden_sizes = sorted({H for _, _, H in grid})
        records += optimizer_records(args.models, hidden_sizes, rounds,
                                     budget_s=0.05 if quick else 0.2, log=log,
                                     device=args.device)  # fmt: skip
    if "gemm" in args.only:
        records += gemm_records(grid, rounds, budget_s=0.05 if quick else 0.2, log=log)
    if "probes" in args.only:
        if quick:
            records += probe_records(["lstm"], length=50, steps=300, hidden=64, log=log)
        else:
            # 1500 steps: four probes (at 0, 500, 1000, 1500), a larger share than the seven
            # of a default 3000-step run, in half its time; four runs per cell (`run_cost`)
            records += probe_records(["rnn", "lstm", "gru"], 200, 1500, 128, log=log)
    if "parallel" in args.only:
        records += capacity_records(quick, rounds=1 if quick else 3, log=log)
        records += parallel_records(quick, rounds=1 if quick else 2, log=log)
    if "allocator" in args.only:
        cases = [("lstm", 64, 200, 128)]
        if not quick:
            cases += [("bn_lstm", 64, 200, 128), ("lstm", 128, 400, 256), ("gru", 128, 400, 256)]
        records += allocator_records(cases, rounds=1 if quick else 3, steps=5 if quick else 20,
                                     log=log)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return records


if __name__ == "__main__":
    main()
