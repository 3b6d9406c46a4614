"""Hand-written backpropagation through time: vanilla RNNs (plain, layer- or batch-normalised),
the GRU and the normalised LSTMs.

**Vanilla RNN** (`ElementwiseRNN`; tanh, sigmoid, relu, leaky relu, elu, prelu):
h_t = f(W_ih x_t + b + W_hh h_{t-1}), the input term of all steps in one product, then one
`addmm` and one in-place activation per step, with no autograd graph. The backward pass
runs the steps in reverse with the activation's derivative taken from its output (prelu's
from the pre-activation, kept), and sums W_hh's gradient step by step inside the same
`addmm_`. `nn.RNN` records two autograd nodes per step and sums
the T partial gradients of W_hh separately; measured on a 2-core CPU (one thread, CPU time,
median of 7 rounds), this path took 0.70x, 0.81x and 0.96x of `nn.RNN`'s training-step time
at (B, T, H) = (32, 100, 64), (64, 200, 128) and (128, 400, 256).

**GRU** (`GRU`): on CPU `nn.GRU` is a chain of ordinary autograd operators too. The
hand-written loop (one `addmm`, one sigmoid over r and z, one `addcmul` + tanh for n, one
`lerp` per step; W_hh's gradient in one product at the end) measured 0.83x and 0.77x of
`nn.GRU`'s training step at (64, 200, 128) and (32, 100, 64) (`python -m seqtest.bench`).
The plain LSTM is the exception: `nn.LSTM` runs a fused oneDNN kernel that no loop beats.

Both keep their [T, ...] buffers (the input term, the hidden states, the per-step
gradients) in blocks of at most `BLOCK_BYTES` (`step_blocks`), a product per block for the
input term and the weight gradients: a single [T, B, 3H] buffer is above glibc's mmap
threshold at large sizes (157 MB at B=128, T=400, H=256), so it was mapped and faulted in
afresh at every training step; measured in the benchmark at that size, the GRU's step went
from 1.00-1.13x to 0.74x of `nn.GRU`'s and the RNN's from 0.75x to 0.71x of `nn.RNN`'s,
for 1-2% more time at the smaller sizes (one block there). With few inputs their
input-weight gradients take the faster order of the product (`input_weight_gradient`).

**Normalised LSTMs** (`NormalisedLSTM`). The layer-normalised (Ba et al. 2016) and recurrent
batch-normalised (Cooijmans et al. 2016) LSTMs have no fused kernel. Run as a Python loop
under autograd, each step records about a dozen graph nodes, and their bookkeeping (12-15 us
a node, forward and backward) costs about as much as the arithmetic at the sizes a testbed
trains. `NormalisedLSTM` runs the same loop with autograd off, keeps what the backward pass
needs in preallocated [T, ...] buffers, and computes the gradients itself, one step at a
time in reverse:

    u_t = W_ih x_t          a_t = W_hh h_{t-1}          z_t = N_x(u_t) + N_h(a_t)
    (i, f, g, o) = act(z_t)          c_t = f c_{t-1} + i g          h_t = o tanh(N_c(c_t))

where N_x, N_h, N_c are the layer's normalisations (N_x's shift includes both biases). The
input term z^x_t = N_x(u_t) does not depend on the recurrence: the layer computes it for all
steps before the loop, under autograd (`RecurrentLayer.input_term`: with few inputs the
statistics come from the weights or the inputs' covariance, so the [T, B, 4H] product is
written once, already normalised), and the backward pass hands back dL/dz_t, which it
stores anyway. Inside the loop only N_h and N_c run, as PyTorch's own `native_layer_norm` /
`native_batch_norm` kernels and their backward kernels, so their arithmetic is the
reference's. The per-step buffers are views into blocks below glibc's mmap threshold
(`step_buffers`), and dL/dz_t is written over the input term, which nothing reads after
the forward pass: at large sizes single [T, B, 4H] buffers (210 MB at B=128, T=400, H=256)
were mapped afresh, and every page faulted in, at each training step.

Measured on a 2-core CPU (`python -m seqtest.bench --only steps --models ln_lstm bn_lstm`,
the training step against the autograd LSTM loop `seqtest.bench.LSTMLoop`, back-to-back
runs of each version): moving N_x out of the loop took the layer-norm LSTM from 1.24x to
1.14x at (B, T, H) = (32, 100, 64) and the batch-norm LSTM from 1.43x to 1.21x there and
from 1.27x to 1.14x at (64, 200, 128), where the layer-norm LSTM stayed near 1.1x (it saves
a normalisation kernel forward and backward and two matrix products per step); the blocks
took them from 1.21x and 1.11x to 0.98x and 1.00x at (128, 400, 256). A plain LSTM loop
written the same way (no normalisations, `seqtest.bench.LSTMBPTTLoop`) is faster still
(0.63x and 0.78x of the autograd loop at the two smaller sizes); docs/performance.md
compares with both. N_h's and N_c's parameter gradients are summed step by step.

**Normalised vanilla RNNs** (`NormalisedRNN`): the layer-norm RNN h_t = f(LN(W_ih x_t + b +
W_hh h_{t-1})) and the batch-norm RNN h_t = f(BN_x(W_ih x_t) + b + BN_t(W_hh h_{t-1})) in the
same way as the normalised LSTMs: the input term of all steps under autograd before the
loop, then per step one product, one normalisation kernel and the activation in place. As
a loop of autograd nodes (the twin's) they took 1.41x and 1.87x of `nn.RNN`'s training step
at (32, 100, 64) and 1.28x and 1.51x at (64, 200, 128); docs/performance.md has what they
take now.

**Compiled loops.** The step loops of all four (the RNN's and the GRU's time loops,
`NormalisedRNN`'s and `NormalisedLSTM`'s `_forward_steps` and `_backward_steps`) also exist
in C++ (`loops.cpp`, built on first use by `seqtest.native`), line by line the same kernels
in the same order; the normalised cells keep their per-step buffers and statistics in C++
between the passes. Three kernels there are ours: tanh (PyTorch's CPU tanh is not
vectorised; ours, on x86-64 with AVX2 or AVX-512, is 3-7x faster on a step's [B, H] and
within 1.35 ulp; see `tanh_into`), the batch-normalised cells' per-step batch norm (on
these [B, F] shapes PyTorch's costs up to twice as much; ours agrees with it to rounding)
and, on those processors in float32, the GRU's and the normalised LSTMs' element-wise step
work fused into one or two passes over the step's rows, forward and backward. Their
recurrent products of at least `PACKED_MIN_MACS` multiply-adds run on oneDNN's kernel with
W_hh packed once per pass (`packed_weight`).
Training runs those where they could be built, equal to these
loops to rounding (and to the last bit with the tanh kernel swapped in, without batch
norm and without the fused kernels: tested), and the Python loops here otherwise. At these
sizes the small kernels of a time step cost about as much to issue from Python as to run:
switching between the two in one process (medians of interleaved training steps), the
compiled loops took 0.80x, 0.60x, 0.65x and 0.69x (tanh RNN, GRU, LN-LSTM, BN-LSTM with
PyTorch's batch norm) of the Python loops' time at (32, 100, 64), 0.84x, 0.81x, 0.82x and
0.80x at (64, 200, 128) and 0.95x, 0.96x, 1.00x and 0.89x at (128, 400, 256); the BN-LSTM's
own batch-norm kernel then took its step to 0.79x, 0.93x and 1.03x of that (measured the
same way). The ratios to `nn.RNN` and `nn.GRU` above are the Python loops'.

`RecurrentLayer.forward` takes these paths when training with gradients on
(`RecurrentLayer.path`); evaluation and the gradient analysis (`forward_unrolled`) run the
step-by-step twin in `seqtest.models`, and tests hold each path to the twin's outputs and
gradients.
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass

import torch

from seqtest import native

aten = torch.ops.aten


#: The largest block a per-step buffer is made of: below the mmap threshold that
#: `seqtest.allocator` sets (32 MiB), so that glibc serves the blocks from the heap and the
#: next training step reuses them instead of mapping and faulting in fresh pages.
BLOCK_BYTES = 16 << 20


def tanh_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out = tanh(x), the Python loops' tanh: PyTorch's. The compiled loops run their own
    kernel (loops.cpp: PyTorch's CPU tanh is not vectorised), within 1.35 ulp of it; tests
    swap this function for that kernel to hold the rest of the loops to the last bit."""
    return torch.tanh(x, out=out)


#: From this many multiply-adds (batch x in x out) on, the compiled loops run a step's
#: recurrent product on a weight packed by oneDNN (`packed_weight`). Measured on the 2-core
#: AMD EPYC machine, one product against PyTorch's `mm` (MKL), 1 and 2 threads: 0.54-0.70x
#: the time at [64, 128] x [128, 384 or 512] (3.1 M and 4.2 M), 0.41-0.53x at
#: [128, 256] x [256, 256 to 1024]; 0.84x and 1.19x at [64, 128] x [128, 128] (1.0 M);
#: 1.2-3.1x at [32, 64] x [64, 64 to 256] (oneDNN's fixed cost per call, about 10 us).
PACKED_MIN_MACS = 2_000_000


def packed_weight(weight: torch.Tensor, batch: int) -> torch.Tensor | None:
    """`weight` [out, in] packed by oneDNN for x weight' with x [batch, in], for the
    compiled loops' per-step products (loops.cpp, `packed_linear`), where that pays:
    float32 CPU tensors on x86-64 (where it was measured), a PyTorch built with oneDNN and
    not told to leave it (`torch.backends.mkldnn.enabled`), at least `PACKED_MIN_MACS`
    multiply-adds. None elsewhere (the loops then call PyTorch's `mm`)."""
    if not (
        platform.machine().lower() in ("x86_64", "amd64")
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and batch * weight.numel() >= PACKED_MIN_MACS
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch)


#: Below this many input features `input_weight_gradient` takes the transposed product.
SKINNY_INPUTS = 16


def input_weight_gradient(grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """dL/dW_ih = grad' inputs, [G, in], from the input term's gradient [N, G] and the
    layer's inputs [N, in], N = T * B.

    With few input features (the synthetic tasks feed 1 to 10) the CPU's matrix product is
    much slower in this order than in the transposed one, (inputs' grad)': measured on a
    2-core CPU over N = 3,200-51,200 and G = 64-1,024, the transposed order took 1/4-1/25 of
    the time with 2-10 inputs, 1/1.2-1/2.7 with 12-14, and the same with one (one and two
    threads). From 16 inputs on the two orders are within 20% of each other either way, so
    wider layers keep the direct one. ``python -m seqtest.bench --only gemm`` prints the
    ratios."""
    if inputs.shape[1] < SKINNY_INPUTS:
        return inputs.t().mm(grad).t()
    return grad.t().mm(inputs)


def steps_per_block(like: torch.Tensor, *shape: int) -> int:
    """How many steps of `shape` (in `like`'s dtype) fit in one block of `BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // (like.element_size() * math.prod(shape)))


def step_blocks(like: torch.Tensor, steps: int, per_block: int, *shape: int) -> list:
    """Uninitialised blocks [n, *shape] (dtype and device of `like`) that hold `steps` steps,
    `per_block` to a block (the last one fewer): one block at small sizes, where one
    [steps, ...] buffer is cheapest; several at large ones, where a single buffer would be
    mapped afresh (and every page of it faulted in) at each training step. Buffers made
    with the same `per_block` split at the same steps, so their blocks pair up."""
    return [
        like.new_empty(min(per_block, steps - start), *shape)
        for start in range(0, steps, per_block)
    ]


def unbind_steps(blocks: list) -> list:
    """The per-step views of `blocks`, laid end to end."""
    return [view for block in blocks for view in block.unbind(0)]


def step_buffers(like: torch.Tensor, steps: int, *shape: int) -> list[torch.Tensor]:
    """`steps` uninitialised tensors of `shape`, as views into blocks (`step_blocks`)."""
    return unbind_steps(step_blocks(like, steps, steps_per_block(like, *shape), *shape))


def sum_of(parts: list) -> torch.Tensor:
    """The sum of a block-by-block gradient's parts (the one part itself at small sizes)."""
    return functools.reduce(torch.add, parts)


def batch_first(hidden: list) -> torch.Tensor:
    """h_1 .. h_T [B, T, H], contiguous, from the blocks of h_0 .. h_T (one copy)."""
    first, *rest = hidden
    return torch.cat([first[1:].transpose(0, 1), *(b.transpose(0, 1) for b in rest)], 1)


def input_term_blocks(
    steps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, per_block: int
) -> list:
    """W x_t + b of every step [T, B, in], in blocks of `per_block` steps (`step_blocks`):
    one matrix product per block."""
    T, B, _ = steps.shape
    blocks = step_blocks(steps, T, per_block, B, weight.shape[0])
    for start, block in zip(range(0, T, per_block), blocks, strict=True):
        n = block.shape[0]
        torch.addmm(bias, steps[start : start + n].view(n * B, -1), weight.t(),
                    out=block.view(n * B, -1))  # fmt: skip
    return blocks


def run_once(ctx, cell: str, overwritten: str) -> None:
    """Mark a backward pass that overwrites what it reads as run; a second one through the same
    graph (retain_graph=True) stops with an error that says what to use instead."""
    if getattr(ctx, "spent", False):
        raise RuntimeError(
            f"the hand-written {cell} backward overwrites {overwritten} and runs once per "
            "forward; for a second backward (retain_graph=True) use the model's "
            "forward_unrolled, the step-by-step twin"
        )
    ctx.spent = True


@dataclass
class Normalisation:
    """One of the layer's normalisations, as the kernels need it. Layer norm normalises each
    row over its features; batch norm each feature over the batch, with the statistics of step
    `t` moving `running_mean[min(t, last)]` and `running_var[...]` (as `StepBatchNorm`)."""

    kind: str  # "layer" | "batch"
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    momentum: float = 0.1
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # what every step needs, made once: the per-call Python work is a fair share of a
        # small layer's step
        self.shape = self.weight.shape
        self.mask = [True, True, self.bias is not None]
        self.last = self.running_mean.shape[0] - 1 if self.kind == "batch" else 0

    def prepare(self, length: int) -> None:
        """Make the views of the running estimates that `length` steps use, once (indexing
        them at every step costs more than the rest of the call's Python work)."""
        if self.kind == "batch":
            used = slice(0, min(length, self.last + 1))
            self.means = self.running_mean[used].unbind(0)
            self.vars = self.running_var[used].unbind(0)

    def as_tuple(self) -> tuple:
        """What the compiled loops take (`seqtest.native`)."""
        return (self.kind == "layer", self.weight, self.bias, self.eps, self.momentum,
                self.running_mean, self.running_var)  # fmt: skip

    def forward(self, x: torch.Tensor, t: int):
        """(normalised x, mean, inverse std) of one step."""
        if self.kind == "layer":
            return torch.native_layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        slot = t if t < self.last else self.last
        return torch.native_batch_norm(
            x, self.weight, self.bias, self.means[slot], self.vars[slot],
            True, self.momentum, self.eps,
        )  # fmt: skip

    def backward(self, grad: torch.Tensor, x: torch.Tensor, mean, rstd, grads: list):
        """dL/dx of one step from dL/d(output); adds the step's d weight and d bias to `grads`
        (summing them step by step measured faster than passes over [T, B, ...] buffers at
        the end)."""
        if self.kind == "layer":
            d_x, d_weight, d_bias = aten.native_layer_norm_backward(
                grad, x, self.shape, mean, rstd, self.weight, self.bias, self.mask
            )
        else:
            d_x, d_weight, d_bias = aten.native_batch_norm_backward(
                grad, x, self.weight, None, None, mean, rstd, True, self.eps, self.mask
            )
        if self.bias is None:  # (CUDA's batch-norm backward returns one all the same)
            d_bias = None
        if not grads:
            grads.extend((d_weight, d_bias))
        else:
            grads[0] += d_weight
            if d_bias is not None:
                grads[1] += d_bias
        return d_x


class NormalisedLSTM(torch.autograd.Function):
    """Normalised input term [T, B, 4H] -> hidden states [B, T, H], from zero initial states.

    The input term z^x_t = N_x(W_ih x_t) + b of every step comes in time-major and already
    normalised (`RecurrentLayer.input_term`, under autograd: its statistics do not depend on
    the recurrence); its gradient, dL/dz_t, is what this function returns for it. The other
    inputs: W_hh [4H, H], the normalisations of W_hh h and of c (`Normalisation`), then the
    parameters they use, so that autograd routes their gradients: N_h's weight and bias, N_c's
    weight and bias (a missing bias is None).
    """

    @staticmethod
    def forward(ctx, inputs, w_hh, norm_h, norm_c, *norm_params):
        compiled = native.loops()
        ctx.compiled = compiled
        ctx.norms = norm_h, norm_c
        ctx.overwrite_inputs = not inputs.is_leaf
        ctx.save_for_backward(inputs, w_hh)
        if compiled is not None:  # the same loop in C++, its buffers kept there (the tape)
            norms = norm_h.as_tuple(), norm_c.as_tuple()
            packed = packed_weight(w_hh, inputs.shape[1])
            hidden, ctx.tape = compiled.forward(inputs, w_hh, *norms, BLOCK_BYTES, packed)
            return hidden
        T, B, G = inputs.shape
        H = G // 4
        w_hh_t = w_hh.t().contiguous()  # (see ElementwiseRNN)
        # every step's buffers as views, made in a few calls instead of a dozen per step
        step_a = step_buffers(inputs, T, B, G)  # a_t = W_hh h_{t-1}
        step_act = step_buffers(inputs, T, B, G)  # i, f, g, o after their activations
        step_c = step_buffers(inputs, T + 1, B, H)  # c_{t-1} at t (c_0 = 0)
        step_k = step_buffers(inputs, T, B, H)  # tanh(N_c(c_t))
        step_h = step_buffers(inputs, T + 1, B, H)  # h_{t-1} at t (h_0 = 0)
        step_c[0].zero_()
        step_h[0].zero_()
        norm_h.prepare(T)
        norm_c.prepare(T)
        ctx.steps = step_a, step_act, step_c, step_k, step_h
        ctx.stats = NormalisedLSTM._forward_steps(inputs, w_hh_t, ctx.steps, norm_h, norm_c)
        return torch.stack(step_h[1:], dim=1)

    @staticmethod
    def _forward_steps(inputs, w_hh_t, steps, norm_h, norm_c) -> list[list[torch.Tensor]]:
        """The forward loop over the step buffers; returns the statistics of N_h and N_c at
        every step, as [mean_h], [rstd_h], [mean_c], [rstd_c] (`seqtest.native` compiles the
        same loop, line by line, from loops.cpp)."""
        step_a, step_act, step_c, step_k, step_h = steps
        T, B, G = inputs.shape
        H = G // 4
        blocks = (act.chunk(4, dim=1) for act in step_act)
        step_i, step_f, step_g, step_o = zip(*blocks, strict=True)
        step_in = inputs.unbind(0)
        z = inputs.new_empty(B, G)  # z_t = z^x_t + N_h(a_t)
        z_g = z[:, 2 * H : 3 * H]
        stats = [], [], [], []
        for t in range(T):
            a = torch.mm(step_h[t], w_hh_t, out=step_a[t])
            n, mean, rstd = norm_h.forward(a, t)
            stats[0].append(mean)
            stats[1].append(rstd)
            torch.add(step_in[t], n, out=z)
            g = step_g[t]
            torch.sigmoid(z, out=step_act[t])
            tanh_into(g, z_g)
            c = torch.mul(step_f[t], step_c[t], out=step_c[t + 1])
            c.addcmul_(step_i[t], g)
            m, mean, rstd = norm_c.forward(c, t)
            stats[2].append(mean)
            stats[3].append(rstd)
            k = tanh_into(step_k[t], m)
            torch.mul(step_o[t], k, out=step_h[t + 1])
        return stats

    @staticmethod
    def backward(ctx, grad_hidden):
        run_once(ctx, "normalised-LSTM", "its input term")
        inputs, w_hh = ctx.saved_tensors
        norm_h, norm_c = ctx.norms
        # dL/dz_t (z_t = z^x_t + N_h(a_t)) is the input term's gradient; it is written over
        # the input term, which nothing reads after the forward pass
        d_inputs = inputs if ctx.overwrite_inputs else torch.empty_like(inputs)
        if ctx.compiled is not None:
            norms = norm_h.as_tuple(), norm_c.as_tuple()
            packed = packed_weight(w_hh.t(), inputs.shape[1])
            grads = ctx.compiled.backward(ctx.tape, grad_hidden, d_inputs, w_hh, *norms, packed)
            del ctx.tape  # (the step buffers: freed now, not with the graph)
        else:
            step_grad, step_dz = grad_hidden.unbind(1), d_inputs.unbind(0)
            grads = NormalisedLSTM._backward_steps(
                step_grad, step_dz, w_hh, ctx.steps, ctx.stats, norm_h, norm_c
            )
        return (d_inputs, grads[0], None, None, *grads[1:])

    @staticmethod
    def _backward_steps(step_grad, step_dz, w_hh, steps, stats, norm_h, norm_c) -> list:
        """The backward loop: writes dL/dz_t into `step_dz`; returns dL/dW_hh and the summed
        d weight and d bias of N_h, then of N_c (None for a missing bias)."""
        step_a, step_act, step_c, step_k, step_h = steps
        mean_h, rstd_h, mean_c, rstd_c = stats
        T = len(step_dz)
        B, G = step_dz[0].shape
        H = G // 4
        step_i, step_f, step_g, step_o = zip(*(a.chunk(4, dim=1) for a in step_act), strict=True)
        d_act = step_dz[0].new_empty(B, G)  # dL/d(i, f, g, o) of the current step
        d_i, d_f, d_g, d_o = d_act.chunk(4, dim=1)
        d_w_hh = torch.zeros_like(w_hh)
        grads_h, grads_c = [], []  # (d weight, d bias) of N_h, N_c, summed over the steps
        dh = step_grad[T - 1].clone()
        dc = torch.zeros_like(step_c[0])
        for t in range(T - 1, -1, -1):
            k, g, dz = step_k[t], step_g[t], step_dz[t]
            torch.mul(dh, k, out=d_o)
            d_m = aten.tanh_backward(dh * step_o[t], k)  # dL/dN_c(c_t)
            dc += norm_c.backward(d_m, step_c[t + 1], mean_c[t], rstd_c[t], grads_c)
            torch.mul(dc, g, out=d_i)
            torch.mul(dc, step_c[t], out=d_f)
            torch.mul(dc, step_i[t], out=d_g)
            dc *= step_f[t]
            # sigmoid' for every block, then tanh' over the g block
            aten.sigmoid_backward.grad_input(d_act, step_act[t], grad_input=dz)
            aten.tanh_backward.grad_input(d_g, g, grad_input=dz[:, 2 * H : 3 * H])
            da = norm_h.backward(dz, step_a[t], mean_h[t], rstd_h[t], grads_h)
            if t > 0:  # h_0 = 0: step 0 adds nothing to W_hh's gradient and has no h before
                d_w_hh.addmm_(da.t(), step_h[t])
                dh = torch.addmm(step_grad[t - 1], da, w_hh)
        return [d_w_hh, *grads_h, *grads_c]


def _derivative(activation: str, slope: float):
    """(grad, y, out) -> out = grad * d activation(p) / dp, from the activation's output
    y = activation(p) (relu, leaky relu and elu read the sign of p off y's)."""
    return {
        "tanh": lambda grad, y, out: aten.tanh_backward.grad_input(grad, y, grad_input=out),
        "sigmoid": lambda grad, y, out: aten.sigmoid_backward.grad_input(grad, y, grad_input=out),
        "relu": lambda grad, y, out: aten.threshold_backward.grad_input(grad, y, 0, grad_input=out),
        "leaky_relu": lambda grad, y, out: aten.leaky_relu_backward.grad_input(
            grad, y, slope, True, grad_input=out
        ),
        "elu": lambda grad, y, out: aten.elu_backward.grad_input(
            grad, 1.0, 1.0, 1.0, True, y, grad_input=out
        ),
    }[activation]


def _activate_(activation: str, slope: float):
    """The activation, in place."""
    return {
        "tanh": lambda p: tanh_into(p, p),
        "sigmoid": torch.sigmoid_,
        "relu": torch.relu_,
        "leaky_relu": lambda p: torch.nn.functional.leaky_relu_(p, slope),
        "elu": torch.nn.functional.elu_,
    }[activation]


#: Activations whose derivative follows from their output (prelu's slope is learned: no).
RNN_ACTIVATIONS = ("tanh", "sigmoid", "relu", "leaky_relu", "elu")


class ElementwiseRNN(torch.autograd.Function):
    """Layer input x [B, T, in] -> hidden states [B, T, H] of h_t = f(W_ih x_t + b + W_hh
    h_{t-1}) from h_0 = 0, with b = b_ih + b_hh and f one of `RNN_ACTIVATIONS`, or prelu
    with the learned slopes `prelu_weight` [H]. Prelu's derivative needs the sign of the
    pre-activation p_t, which its output does not tell where a slope is zero or negative,
    and its slopes' gradient needs p_t itself: p_t is written over the input term (which
    nothing reads afterwards) and kept for the backward pass; one prelu kernel per step
    forward, one backward kernel per step in reverse (PyTorch's)."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, bias, activation, slope, prelu_weight=None):
        B, T, _ = x.shape
        H = w_hh.shape[0]
        steps = x.transpose(0, 1).contiguous()  # [T, B, in]
        per_block = ctx.per_block = steps_per_block(x, B, H)
        inputs = input_term_blocks(steps, w_ih, bias, per_block)
        hidden = step_blocks(x, T + 1, per_block, B, H)  # h_{t-1} at step t (h_0 = 0)
        hidden[0][0].zero_()
        w_hh_t = w_hh.t().contiguous()  # measured 15% faster in addmm than the transposed view
        compiled = ctx.compiled = native.loops()
        if compiled is not None:  # the same loop in C++ (seqtest.native)
            packed = packed_weight(w_hh, B)
            compiled.rnn_forward(inputs, hidden, w_hh_t, activation, slope, prelu_weight, packed)
        else:
            steps_in, hidden_steps = unbind_steps(inputs), unbind_steps(hidden)
            each_step = zip(steps_in, hidden_steps[:-1], hidden_steps[1:], strict=True)
            if prelu_weight is not None:
                for x_t, h_prev, h in each_step:  # p_t over the input term
                    h.copy_(torch._prelu_kernel(x_t.addmm_(h_prev, w_hh_t), prelu_weight))
            else:
                activate_ = _activate_(activation, slope)
                for x_t, h_prev, h in each_step:
                    activate_(torch.addmm(x_t, h_prev, w_hh_t, out=h))
        ctx.activation = activation, slope
        ctx.hidden = hidden
        ctx.pre = inputs if prelu_weight is not None else []
        ctx.save_for_backward(steps, w_ih, w_hh, prelu_weight)
        return batch_first(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        steps, w_ih, w_hh, prelu_weight = ctx.saved_tensors
        T, B, _ = steps.shape
        H = w_hh.shape[0]
        grad_hidden = grad_hidden.transpose(0, 1)  # [T, B, H]
        d_pre = step_blocks(steps, T, ctx.per_block, B, H)  # dL/d(pre-activation) per step
        if ctx.compiled is not None:
            d_w_hh, d_prelu = ctx.compiled.rnn_backward(
                grad_hidden, ctx.hidden, d_pre, w_hh, *ctx.activation, ctx.pre, prelu_weight,
                packed_weight(w_hh.t(), B),
            )  # fmt: skip
        else:
            d_w_hh, d_prelu = ElementwiseRNN._backward_steps(
                grad_hidden, unbind_steps(ctx.hidden), unbind_steps(d_pre), w_hh,
                *ctx.activation, unbind_steps(ctx.pre), prelu_weight,
            )  # fmt: skip
        d_w_ih, d_bias, d_x = [], [], []
        for start, d in zip(range(0, T, ctx.per_block), d_pre, strict=True):
            n = d.shape[0]
            flat, x_flat = d.view(n * B, H), steps[start : start + n].view(n * B, -1)
            d_w_ih.append(input_weight_gradient(flat, x_flat))
            d_bias.append(flat.sum(0))
            if ctx.needs_input_grad[0]:
                d_x.append(flat.mm(w_ih))
        d_x = torch.cat(d_x).view(T, B, -1).transpose(0, 1) if d_x else None
        return d_x, sum_of(d_w_ih), d_w_hh, sum_of(d_bias), None, None, d_prelu

    @staticmethod
    def _backward_steps(grad_hidden, hidden, d_pre, w_hh, activation, slope, pre, prelu_weight):
        """The backward loop over per-step views (loops.cpp's `rnn_backward`, line by line):
        fills `d_pre`; returns dL/dW_hh and the prelu slopes' gradient (None without)."""
        T = len(d_pre)
        derivative = _derivative(activation, slope) if prelu_weight is None else None
        d_w_hh = torch.zeros_like(w_hh)
        d_slopes = None if prelu_weight is None else torch.zeros_like(hidden[0])  # per unit
        dh = grad_hidden[T - 1].clone()
        for t in range(T - 1, -1, -1):
            if derivative is not None:
                dp = derivative(dh, hidden[t + 1], d_pre[t])
            else:
                dp, d_slope = aten._prelu_kernel_backward(dh, pre[t], prelu_weight)
                dp = d_pre[t].copy_(dp)
                d_slopes += d_slope
            if t > 0:  # h_0 = 0: step 0 adds nothing to W_hh's gradient
                d_w_hh.addmm_(dp.t(), hidden[t])
                dh = torch.addmm(grad_hidden[t - 1], dp, w_hh)
        return d_w_hh, None if d_slopes is None else d_slopes.sum(0)


class NormalisedRNN(torch.autograd.Function):
    """Normalised input term [T, B, H] -> hidden states [B, T, H] of a layer- or batch-norm
    vanilla RNN from h_0 = 0, with f one of `RNN_ACTIVATIONS` or prelu:

        layer norm (Ba et al. 2016):         h_t = f(LN(z^x_t + W_hh h_{t-1}))
        batch norm (Cooijmans et al. 2016):  h_t = f(z^x_t + BN_t(W_hh h_{t-1}))

    The input term z^x_t, W_ih x_t + b_ih + b_hh (layer norm) or BN_x(W_ih x_t) + b_ih + b_hh
    (batch norm), comes in time-major, computed for all steps under autograd
    (`RecurrentLayer.input_term`); its gradient dL/dz^x_t is what this function returns for
    it, written over it as in `NormalisedLSTM`. The other inputs: W_hh [H, H], the
    normalisation inside the loop (`Normalisation`: LN for layer norm, BN_t for batch norm),
    the activation and its slope, prelu's slopes [H] (or None), then the normalisation's
    weight and bias (None where it has none), so that autograd routes their gradients. Per
    step: one product, one normalisation kernel, one activation in place (batch norm adds the
    input term), and their backward kernels in reverse, with the activation's derivative
    taken from its output; prelu keeps each step's pre-activation instead (see
    `ElementwiseRNN`).
    """

    @staticmethod
    def forward(ctx, inputs, w_hh, norm, activation, slope, prelu_weight, *norm_params):
        compiled = native.loops()
        ctx.compiled = compiled
        ctx.norm = norm
        ctx.activation = activation, slope
        ctx.overwrite_inputs = not inputs.is_leaf
        ctx.save_for_backward(inputs, w_hh, prelu_weight)
        if compiled is not None:  # the same loop in C++, its buffers kept there (the tape)
            hidden, ctx.tape = compiled.norm_rnn_forward(
                inputs, w_hh, norm.as_tuple(), activation, slope, prelu_weight, BLOCK_BYTES,
                packed_weight(w_hh, inputs.shape[1]),
            )  # fmt: skip
            return hidden
        T, B, H = inputs.shape
        w_hh_t = w_hh.t().contiguous()  # (see ElementwiseRNN)
        ctx.step_a = step_buffers(inputs, T, B, H)  # what the normalisation reads, per step
        norm.prepare(T)
        ctx.hidden, ctx.pre, ctx.stats = NormalisedRNN._forward_steps(
            inputs, w_hh_t, ctx.step_a, norm, activation, slope, prelu_weight
        )
        return torch.stack(ctx.hidden[1:], dim=1)

    @staticmethod
    def _forward_steps(inputs, w_hh_t, step_a, norm, activation, slope, prelu_weight):
        """The forward loop (loops.cpp's `norm_rnn_forward`, line by line): returns the hidden
        states h_0 .. h_T, prelu's pre-activations (none for the other activations) and the
        normalisation's statistics of every step, ([mean], [rstd])."""
        activate_ = _activate_(activation, slope) if prelu_weight is None else None
        inside = norm.kind == "layer"  # layer norm normalises the sum with the input term
        h = inputs.new_zeros(inputs.shape[1], w_hh_t.shape[1])
        hidden, pre, means, rstds = [h], [], [], []
        for t, z_x in enumerate(inputs.unbind(0)):
            if inside:
                a = torch.addmm(z_x, h, w_hh_t, out=step_a[t])
            else:
                a = torch.mm(h, w_hh_t, out=step_a[t])
            n, mean, rstd = norm.forward(a, t)
            if not inside:
                n += z_x
            if activate_ is not None:
                h = activate_(n)
            else:
                pre.append(n)
                h = torch._prelu_kernel(n, prelu_weight)
            hidden.append(h)
            means.append(mean)
            rstds.append(rstd)
        return hidden, pre, (means, rstds)

    @staticmethod
    def backward(ctx, grad_hidden):
        run_once(ctx, "normalised-RNN", "its input term")
        inputs, w_hh, prelu_weight = ctx.saved_tensors
        d_inputs = inputs if ctx.overwrite_inputs else torch.empty_like(inputs)
        if ctx.compiled is not None:
            grads = ctx.compiled.norm_rnn_backward(
                ctx.tape, grad_hidden, d_inputs, w_hh, ctx.norm.as_tuple(), *ctx.activation,
                prelu_weight, packed_weight(w_hh.t(), inputs.shape[1]),
            )  # fmt: skip
            del ctx.tape  # (the step buffers: freed now, not with the graph)
        else:
            grads = NormalisedRNN._backward_steps(
                grad_hidden.unbind(1), d_inputs.unbind(0), w_hh, ctx.step_a, ctx.hidden,
                ctx.pre, ctx.stats, ctx.norm, *ctx.activation, prelu_weight,
            )  # fmt: skip
        return (d_inputs, grads[0], None, None, None, *grads[1:])

    @staticmethod
    def _backward_steps(
        step_grad, step_dz, w_hh, step_a, hidden, pre, stats, norm, activation, slope,
        prelu_weight,
    ):  # fmt: skip
        """The backward loop (loops.cpp's `norm_rnn_backward`, line by line): writes dL/dz^x_t
        into `step_dz`; returns dL/dW_hh, the prelu slopes' gradient (None without) and the
        normalisation's summed d weight and d bias (None for a missing bias)."""
        derivative = _derivative(activation, slope) if prelu_weight is None else None
        inside = norm.kind == "layer"
        means, rstds = stats
        T = len(step_dz)
        d_w_hh = torch.zeros_like(w_hh)
        d_slopes = None if prelu_weight is None else torch.zeros_like(hidden[0])  # per unit
        grads: list = []  # (d weight, d bias) of the normalisation, summed over the steps
        dh = step_grad[T - 1]
        for t in range(T - 1, -1, -1):
            dz = step_dz[t]  # batch norm: dL/d(pre-activation) is dL/dz^x_t already
            if derivative is not None:
                d_pre = derivative(dh, hidden[t + 1], dz)
            else:
                d_pre, d_slope = aten._prelu_kernel_backward(dh, pre[t], prelu_weight)
                d_pre = dz.copy_(d_pre)
                d_slopes += d_slope
            da = norm.backward(d_pre, step_a[t], means[t], rstds[t], grads)
            if inside:
                dz.copy_(da)
            if t > 0:  # h_0 = 0: step 0 adds nothing to W_hh's gradient and has no h before
                d_w_hh.addmm_(da.t(), hidden[t])
                dh = torch.addmm(step_grad[t - 1], da, w_hh)
        return [d_w_hh, None if d_slopes is None else d_slopes.sum(0), *grads]


def elementwise_rnn(
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor,
    activation: str,
    slope: float = 0.0,
    prelu_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states [B, T, H] of a vanilla RNN layer (see `ElementwiseRNN`); `prelu_weight`
    [H], the slopes, with ``activation="prelu"``."""
    return ElementwiseRNN.apply(x, w_ih, w_hh, bias, activation, slope, prelu_weight)


class GRU(torch.autograd.Function):
    """Layer input x [B, T, in] -> hidden states [B, T, H] of PyTorch's GRU from h_0 = 0:

        (r, z) = sigmoid(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t-1} + b_h{r,z})
        n = tanh(W_in x_t + b_in + r (W_hn h_{t-1} + b_hn))
        h_t = (1 - z) n + z h_{t-1}

    The input term of all steps in one product; per step one `addmm`, the gates and one
    `lerp`. The gates overwrite the input term, and the backward pass writes its
    dL/d(W_hh h_{t-1} + b_hh) over W_hh h_{t-1} + b_hh: two [T, B, 3H] buffers fewer to
    allocate, fault in and free each step (a GRU layer's forward, backward and Adam step
    measured 0.92x, 0.82x and 0.83x of the time with separate buffers at (B, T, H) =
    (32, 100, 64), (64, 200, 128) and (128, 400, 256); one thread, CPU time, machine under
    load). The price: the backward pass can run only once per forward."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        B, T, _ = x.shape
        G = w_hh.shape[0]
        H = G // 3
        steps = x.transpose(0, 1).contiguous()  # [T, B, in]
        per_block = ctx.per_block = steps_per_block(x, B, G)
        # the input term of every step, turned into the gates r, z, n in place step by step
        gates = input_term_blocks(steps, w_ih, b_ih, per_block)
        recurrent = step_blocks(x, T, per_block, B, G)  # W_hh h_{t-1} + b_hh
        hidden = step_blocks(x, T + 1, per_block, B, H)  # h_{t-1} at step t (h_0 = 0)
        hidden[0][0].zero_()
        w_hh_t = w_hh.t().contiguous()  # measured 15% faster in addmm than the transposed view
        compiled = ctx.compiled = native.loops()
        if compiled is not None:  # the same loop in C++ (seqtest.native)
            packed = packed_weight(w_hh, B)
            compiled.gru_forward(gates, recurrent, hidden, w_hh_t, b_hh, packed)
        else:
            hidden_steps = unbind_steps(hidden)
            for act, rec, h_prev, h in zip(
                unbind_steps(gates), unbind_steps(recurrent), hidden_steps[:-1],
                hidden_steps[1:], strict=True,
            ):  # fmt: skip
                torch.addmm(b_hh, h_prev, w_hh_t, out=rec)
                act[:, : 2 * H].add_(rec[:, : 2 * H]).sigmoid_()
                r, z, n = act.chunk(3, dim=1)
                tanh_into(n, n.addcmul_(r, rec[:, 2 * H :]))
                torch.lerp(n, h_prev, z, out=h)
        ctx.buffers = gates, recurrent, hidden
        ctx.save_for_backward(steps, w_ih, w_hh)
        return batch_first(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        run_once(ctx, "GRU", "its saved buffers")
        steps, w_ih, w_hh = ctx.saved_tensors
        gates, recurrent, hidden = ctx.buffers
        T, B, _ = steps.shape
        G = w_hh.shape[0]
        H = G // 3
        grad_hidden = grad_hidden.transpose(0, 1)  # [T, B, H]
        # dL/d(W_hh h_{t-1} + b_hh) at every step; its r and z blocks are also the input
        # term's, whose n block is d_n (the recurrent one is d_n * r)
        d_rec = recurrent  # each step's slot is written after its last read
        d_n = step_blocks(steps, T, ctx.per_block, B, H)
        if ctx.compiled is not None:
            packed = packed_weight(w_hh.t(), B)
            ctx.compiled.gru_backward(grad_hidden, gates, recurrent, d_n, hidden, w_hh, packed)
        else:
            GRU._backward_steps(
                grad_hidden, *(unbind_steps(b) for b in (gates, recurrent, d_n, hidden)), w_hh
            )
        # the sums over the steps, block by block (the blocks pair up step for step; h_T
        # may sit in a block of its own, which zip leaves out)
        parts: dict[str, list] = {name: [] for name in ("w_hh", "b_hh", "w_rz", "w_n", "b_n")}
        d_x = []
        for start, d, h, dn in zip(range(0, T, ctx.per_block), d_rec, hidden, d_n, strict=False):
            n = d.shape[0]
            skip = 1 if start == 0 else 0  # h_0 = 0: step 0 adds nothing to W_hh's gradient
            d_flat = d.view(n * B, G)
            parts["w_hh"].append(d_flat[skip * B :].t().mm(h[skip:n].view(-1, H)))
            parts["b_hh"].append(d_flat.sum(0))
            d_rz, d_n_flat = d_flat[:, : 2 * H], dn.view(n * B, H)
            x_flat = steps[start : start + n].view(n * B, -1)
            parts["w_rz"].append(input_weight_gradient(d_rz, x_flat))
            parts["w_n"].append(input_weight_gradient(d_n_flat, x_flat))
            parts["b_n"].append(d_n_flat.sum(0))
            if ctx.needs_input_grad[0]:
                d_x.append(d_rz.mm(w_ih[: 2 * H]).addmm_(d_n_flat, w_ih[2 * H :]))
        d_b_hh = sum_of(parts["b_hh"])
        d_w_ih = torch.cat([sum_of(parts["w_rz"]), sum_of(parts["w_n"])])
        d_b_ih = torch.cat([d_b_hh[: 2 * H], sum_of(parts["b_n"])])
        d_x = torch.cat(d_x).view(T, B, -1).transpose(0, 1) if d_x else None
        return d_x, d_w_ih, sum_of(parts["w_hh"]), d_b_ih, d_b_hh

    @staticmethod
    def _backward_steps(grad_hidden, gates, recurrent, d_n_all, hidden, w_hh) -> None:
        """The backward loop over per-step views: writes dL/d(W_hh h_{t-1} + b_hh) over
        `recurrent` and dL/dn into `d_n_all` (loops.cpp's `gru_backward`, line by line)."""
        T, H = len(gates), w_hh.shape[1]
        dh = grad_hidden[T - 1].clone()
        for t in range(T - 1, -1, -1):
            r, z, n = gates[t].chunk(3, dim=1)
            d = recurrent[t]
            h_prev = hidden[t]
            through_z = dh * z  # the direct path to h_{t-1}
            d_n = aten.tanh_backward.grad_input(dh - through_z, n, grad_input=d_n_all[t])
            d_r = d_n * d[:, 2 * H :]
            torch.mul(d_n, r, out=d[:, 2 * H :])
            aten.sigmoid_backward.grad_input(d_r, r, grad_input=d[:, :H])
            aten.sigmoid_backward.grad_input(dh * (h_prev - n), z, grad_input=d[:, H : 2 * H])
            if t > 0:
                dh = torch.addmm(through_z, d, w_hh).add_(grad_hidden[t - 1])


def gru(
    x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor
) -> torch.Tensor:
    """Hidden states [B, T, H] of a GRU layer (see `GRU`)."""
    return GRU.apply(x, w_ih, w_hh, b_ih, b_hh)


def normalised_lstm(
    inputs: torch.Tensor, w_hh: torch.Tensor, norm_h: Normalisation, norm_c: Normalisation
) -> torch.Tensor:
    """Hidden states [B, T, H] of a normalised LSTM layer from its normalised input term
    [T, B, 4H] (see the module docstring)."""
    params = [p for norm in (norm_h, norm_c) for p in (norm.weight, norm.bias)]
    return NormalisedLSTM.apply(inputs, w_hh, norm_h, norm_c, *params)


def normalised_rnn(
    inputs: torch.Tensor,
    w_hh: torch.Tensor,
    norm: Normalisation,
    activation: str,
    slope: float = 0.0,
    prelu_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states [B, T, H] of a layer- or batch-norm vanilla RNN layer from its input term
    [T, B, H] (see `NormalisedRNN`); `prelu_weight` [H], the slopes, with prelu."""
    return NormalisedRNN.apply(
        inputs, w_hh, norm, activation, slope, prelu_weight, norm.weight, norm.bias
    )
