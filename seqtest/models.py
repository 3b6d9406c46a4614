"""Recurrent models behind one interface (vanilla RNN, LSTM, GRU, with a linear readout at
every step) and a deep feedforward baseline.

Every cause and remedy of vanishing gradients is a field of `ModelConfig`: the RNN's
activation, the initialisation of input and recurrent weights, the LSTM's forget-gate bias,
layer or recurrent batch normalisation, depth and residual connections.

Two forward paths share the same parameters:

* ``forward(x)`` is the training path, the fastest measured for each cell and device
  (`RecurrentLayer.path`): PyTorch's fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` kernels, a
  hand-written BPTT with compiled step loops (`seqtest.bptt`), cuDNN's tanh kernel for the
  sigmoid RNN on a GPU, or a loop over the steps with the input projection of all steps
  computed in one matrix product first.
* ``forward_unrolled(x)`` runs the cell equations one step at a time and returns every
  per-step state that the next step consumes. The gradient of the loss with respect to those
  tensors is the *total* derivative dL/dh_t through the recurrence. (The gradient of the
  fused module's output holds only the direct term: the recurrence runs inside the kernel and
  never touches it.) This is the path the gradient analysis uses.

Shapes are batch-first: x [B, T, input_size] -> output [B, T, output_size].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seqtest.bptt import (
    RNN_ACTIVATIONS,
    SKINNY_INPUTS,
    Normalisation,
    elementwise_rnn,
    gru,
    normalised_lstm,
    normalised_rnn,
)
from seqtest.errors import ConfigError, require, require_choice, require_positive_int
from seqtest.init import SCHEMES, init_gate_blocks

CELLS = ("rnn", "lstm", "gru", "mlp")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
ACTIVATIONS = ("tanh", "sigmoid", "relu", "leaky_relu", "elu", "prelu")
FUSED_ACTIVATIONS = ("tanh", "relu")  # what nn.RNN runs itself
NORMS = ("none", "layer", "batch")
# up to this many inputs, normalisations of W_ih x take their statistics from the weights and
# the inputs' covariance instead of from the [B, T, G*H] product (seqtest.bptt)
FEW_INPUTS = 8


@dataclass
class ModelConfig:
    """What `model/<name>.yaml` holds. `name` is the preset's name, for results only."""

    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    activation: str = "tanh"  # vanilla RNN and MLP
    leaky_slope: float = 0.01  # leaky_relu's slope; prelu's initial slope
    forget_bias: float = 1.0  # LSTM: initial forget-gate bias (b_ih + b_hh)
    init_input: str = "default"  # scheme for input weights (seqtest.init)
    init_recurrent: str = "default"  # scheme for recurrent weights
    init_gain: float = 1.0  # gain of xavier / orthogonal / identity
    init_std: float = 0.01  # std of `normal`
    norm: str = "none"  # none | layer (Ba et al. 2016) | batch (Cooijmans et al. 2016)
    bn_max_steps: int = 1000  # recurrent batch norm: per-step statistics up to here
    residual: bool = False  # add each layer's input to its output (layers 2..L)
    name: str = ""

    def __post_init__(self) -> None:
        require_choice("model.cell", self.cell, CELLS)
        require_positive_int("model.hidden_size", self.hidden_size)
        require_positive_int("model.num_layers", self.num_layers)
        require_choice("model.activation", self.activation, ACTIVATIONS)
        require(
            self.cell in ("rnn", "mlp") or self.activation == "tanh",
            "model.activation",
            self.activation,
            f"tanh for cell {self.cell!r} (only the vanilla RNN and the MLP take another)",
        )
        require(
            isinstance(self.leaky_slope, int | float) and 0 <= self.leaky_slope < 1,
            "model.leaky_slope",
            self.leaky_slope,
            "a number in [0, 1)",
        )
        require(
            isinstance(self.forget_bias, int | float),
            "model.forget_bias",
            self.forget_bias,
            "a number",
        )
        require_choice("model.init_input", self.init_input, SCHEMES)
        require_choice("model.init_recurrent", self.init_recurrent, SCHEMES)
        for name in ("init_gain", "init_std"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and value > 0
            require(ok, f"model.{name}", value, "a positive number")
        require_choice("model.norm", self.norm, NORMS)
        require(
            self.norm == "none" or self.cell in ("rnn", "lstm") or self.norm == "batch",
            "model.norm",
            self.norm,
            f"none or batch for cell {self.cell!r} (layer norm: rnn and lstm)",
        )
        require(
            self.norm == "none" or self.cell != "gru",
            "model.norm",
            self.norm,
            "none for cell 'gru' (normalisation is built for rnn and lstm)",
        )
        require_positive_int("model.bn_max_steps", self.bn_max_steps)
        require(isinstance(self.residual, bool), "model.residual", self.residual, "true or false")

    @property
    def fused(self) -> bool:
        """Whether PyTorch's fused kernel computes this cell exactly."""
        plain_activation = self.cell != "rnn" or self.activation in FUSED_ACTIVATIONS
        return self.cell != "mlp" and self.norm == "none" and plain_activation


def activation_function(name: str, slope: float, width: int) -> nn.Module:
    """The activation as a module (prelu has a learnable slope per unit)."""
    return {
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(slope),
        "elu": nn.ELU,
        "prelu": lambda: nn.PReLU(width, init=slope if slope > 0 else 0.25),
    }[name]()


class StepBatchNorm(nn.Module):
    """Recurrent batch normalisation (Cooijmans et al. 2016): separate statistics for each time
    step up to `max_steps` (steps beyond share the last), one gamma and beta for all steps,
    gamma initialised to 0.1. Training uses the batch's statistics and updates the step's
    running estimates; evaluation uses the running estimates."""

    def __init__(self, width: int, max_steps: int, beta: bool = False, momentum: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), 0.1))
        self.bias = nn.Parameter(torch.zeros(width)) if beta else None
        self.momentum = momentum
        self.eps = 1e-5
        self.register_buffer("running_mean", torch.zeros(max_steps, width))
        self.register_buffer("running_var", torch.ones(max_steps, width))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Normalise one step, x [B, F]: one `F.batch_norm` on the step's slot of the running
        estimates (the same arithmetic as `forward_sequence` in a single kernel, which also
        moves the slot's estimates in place)."""
        if self.training and x.shape[0] < 2:  # batch_norm wants two samples to train on
            return self.forward_sequence(x.unsqueeze(1), first_step=step).squeeze(1)
        slot = min(step, self.running_mean.shape[0] - 1)
        return F.batch_norm(
            x, self.running_mean[slot], self.running_var[slot], self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )  # fmt: skip

    def forward_sequence(self, x: torch.Tensor, first_step: int = 0) -> torch.Tensor:
        """Normalise consecutive steps at once, x [B, T, F] (each step by its own statistics)."""
        B, T, width = x.shape
        if self.training and first_step + T <= self.running_mean.shape[0] and B > 1:
            # every step owns its slot: one batch-norm kernel over [B, T*F], each (step,
            # feature) a channel (measured 1.4x faster than the passes below at B=64, T=200,
            # F=512, forward and backward)
            slots = slice(first_step, first_step + T)
            out = F.batch_norm(
                x.reshape(B, T * width),
                self.running_mean[slots].view(-1),
                self.running_var[slots].view(-1),
                self.weight.repeat(T),
                self.bias.repeat(T) if self.bias is not None else None,
                True, self.momentum, self.eps,
            )  # fmt: skip
            return out.view(B, T, width)
        if self.training:
            # mean and centred square (var_mean over the batch dimension is many times slower)
            mean = x.mean(0)
            centred = x - mean
            var = centred.square().mean(0)
            n = x.shape[0]
            self._update(first_step, mean.detach(), var.detach() * (n / max(n - 1, 1)))
        else:
            last = self.running_mean.shape[0] - 1
            slots = torch.arange(first_step, first_step + x.shape[1], device=x.device)
            slots = slots.clamp(max=last)
            var = self.running_var[slots]
            centred = x - self.running_mean[slots]
        out = centred * (torch.rsqrt(var + self.eps) * self.weight)
        return out + self.bias if self.bias is not None else out

    def forward_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        shift: torch.Tensor | None = None,
        time_major: bool = False,
    ) -> torch.Tensor:
        """``forward_sequence(F.linear(x, weight)) + shift`` for x [B, T, in] ([T, B, F] with
        `time_major`, the hand-written LSTM's layout). With few inputs, without the passes
        over the [B, T, F] product: its batch mean is the inputs' mean times W and its batch
        variance w_f' C_t w_f, from each step's input covariance C_t [in, in]. The product is
        formed once, from the centred inputs, scaled and shifted in the same pass."""
        if not self.training or x.shape[-1] > FEW_INPUTS:
            out = self.forward_sequence(F.linear(x, weight))
            if time_major:
                out = out.transpose(0, 1).contiguous()
            return out + shift if shift is not None else out
        n = x.shape[0]
        mean_x = x.mean(0)  # [T, in]
        centred = x - mean_x
        cov = torch.einsum("bti,btj->tij", centred, centred) / n  # [T, in, in]
        var = torch.einsum("fi,tij,fj->tf", weight, cov, weight)  # [T, F]
        mean = F.linear(mean_x, weight)
        self._update(0, mean.detach(), var.detach() * (n / max(n - 1, 1)))
        scale = torch.rsqrt(var + self.eps) * self.weight
        bias = self.bias
        if shift is not None:
            bias = shift if bias is None else bias + shift
        if time_major:  # step t's product with W scaled by step t's statistics: one pass
            scaled = (weight * scale.unsqueeze(-1)).transpose(1, 2)  # [T, in, F]
            steps = centred.transpose(0, 1)
            if bias is None:
                return torch.bmm(steps, scaled)
            return torch.baddbmm(bias, steps, scaled)
        out = F.linear(centred, weight) * scale
        return out + bias if bias is not None else out

    @torch.no_grad()
    def _update(self, first_step: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Move the running estimates of steps first_step.. towards the batch's, in step order:
        steps below the last slot each own theirs; the rest update the last slot in turn."""
        last = self.running_mean.shape[0] - 1
        own = max(0, min(mean.shape[0], last - first_step))
        if own:
            window = slice(first_step, first_step + own)
            self.running_mean[window].lerp_(mean[:own], self.momentum)
            self.running_var[window].lerp_(var[:own], self.momentum)
        for t in range(own, mean.shape[0]):
            self.running_mean[last].lerp_(mean[t], self.momentum)
            self.running_var[last].lerp_(var[t], self.momentum)


@dataclass
class States:
    """Per-step states of the unrolled forward pass, one list entry per layer.

    ``h[l][t]`` is the hidden state of layer ``l`` after step ``t`` ([B, H]): the tensor the
    next step and the next layer consume, so ``autograd.grad(loss, h[l][t])`` is the total
    derivative. ``c`` holds the LSTM cell states (empty for other cells); ``pre`` holds each
    step's pre-activations [B, G*H] in PyTorch's gate order (for saturation measurements).
    """

    h: list[list[torch.Tensor]] = field(default_factory=list)
    c: list[list[torch.Tensor]] = field(default_factory=list)
    pre: list[list[torch.Tensor]] = field(default_factory=list)


def sigmoid_rnn_on_tanh_kernel(
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """The sigmoid RNN h_t = sigmoid(W x_t + b_ih + U h_{t-1} + b_hh) from h_0 = 0, [B, T, in]
    -> [B, T, H], run on PyTorch's fused tanh RNN (cuDNN's kernel on a GPU).

    Since sigmoid(z) = (1 + tanh(z/2)) / 2, the state g_t = 2 h_t - 1 follows a tanh RNN:
    g_t = tanh(W/2 x_t + b_ih/2 + U/4 g_{t-1} + (b_hh + U 1/2)/2), from g_0 = -1; then
    h_t = (g_t + 1)/2. The same function to rounding (tested against the cell equations);
    autograd differentiates the weight transform."""
    weights = [w_ih * 0.5, w_hh * 0.25, b_ih * 0.5, (b_hh + 0.5 * w_hh.sum(1)) * 0.5]
    g_0 = x.new_full((1, x.shape[0], w_hh.shape[0]), -1.0)
    with warnings.catch_warnings():  # cuDNN copies these small weights into its own buffer
        warnings.filterwarnings("ignore", "RNN module weights are not part of single")
        g = torch._VF.rnn_tanh(x, g_0, weights, True, 1, 0.0, training, False, True)[0]
    return g.mul(0.5).add_(0.5)


class RecurrentLayer(nn.Module):
    """One recurrent layer. Its weights live in a one-layer ``nn.RNN/LSTM/GRU`` (PyTorch's
    layout and gate order), which also runs the fused path when the cell is plain."""

    def __init__(self, config: ModelConfig, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.twin_loop = False  # `train_on_twin_loop`
        cell, H = config.cell, config.hidden_size
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        extra = {}
        if cell == "rnn":
            fused_ok = config.activation in FUSED_ACTIVATIONS
            extra = {"nonlinearity": config.activation if fused_ok else "tanh"}
        self.fused = kind(input_size, H, batch_first=True, **extra)
        self.activation = activation_function(config.activation, config.leaky_slope, H)
        G = GATES[cell]
        if config.norm == "layer":
            if cell == "lstm":  # Ba et al. 2016: LN(W_h h) + LN(W_x x) + b; h = o tanh(LN(c))
                self.norm_h, self.norm_x, self.norm_c = (nn.LayerNorm(n) for n in (G * H, G * H, H))
            else:  # h = f(LN(W_h h + W_x x + b))
                self.norm_pre = nn.LayerNorm(H)
        elif config.norm == "batch":  # BN(W_h h) + BN(W_x x) + b (LSTM: h = o tanh(BN(c)))
            self.norm_h = StepBatchNorm(G * H, config.bn_max_steps)
            self.norm_x = StepBatchNorm(G * H, config.bn_max_steps)
            if cell == "lstm":
                self.norm_c = StepBatchNorm(H, config.bn_max_steps, beta=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        config, G = self.config, GATES[self.config.cell]
        w_ih, w_hh, b_ih, b_hh = self.weights()
        init_gate_blocks(w_ih.data, G, config.init_input, config.init_gain, config.init_std)
        init_gate_blocks(w_hh.data, G, config.init_recurrent, config.init_gain, config.init_std)
        if config.cell == "lstm":
            H = config.hidden_size
            with torch.no_grad():
                b_ih[H : 2 * H].fill_(config.forget_bias)
                b_hh[H : 2 * H].zero_()

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_ih, W_hh, b_ih, b_hh) in PyTorch's gate order."""
        f = self.fused
        return f.weight_ih_l0, f.weight_hh_l0, f.bias_ih_l0, f.bias_hh_l0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, in] -> hidden states [B, T, H], on the path `path` chooses."""
        path = self.path(x)
        w_ih, w_hh, b_ih, b_hh = self.weights()
        if path == "fused":
            return self.fused(x)[0]
        if path == "tanh_kernel":
            return sigmoid_rnn_on_tanh_kernel(x, w_ih, w_hh, b_ih, b_hh, self.training)
        if path == "bptt" and self.config.cell == "rnn":
            config = self.config
            slopes = self.activation.weight if config.activation == "prelu" else None
            if config.norm != "none":
                (norm,) = self.normalisations()
                return normalised_rnn(
                    self.input_term(x), w_hh, norm, config.activation, config.leaky_slope, slopes
                )
            return elementwise_rnn(
                x, w_ih, w_hh, b_ih + b_hh, config.activation, config.leaky_slope, slopes
            )
        if path == "bptt" and self.config.cell == "gru":
            return gru(x, w_ih, w_hh, b_ih, b_hh)
        if path == "bptt":
            return normalised_lstm(self.input_term(x), w_hh, *self.normalisations())
        hs, _, _ = self.unroll(x)
        return torch.stack(hs, dim=1)

    def path(self, x: torch.Tensor) -> str:
        """How `forward` computes this layer, the fastest measured for the cell (benchmarks:
        docs/performance.md; each path is tested against the twin `unroll`):

        * "bptt": training with gradients on, a vanilla RNN (with an activation of
          `seqtest.bptt.RNN_ACTIVATIONS`; on the CPU, with prelu or with layer or batch norm
          too), a GRU, or a layer- or batch-norm LSTM (batch norm needs two samples for batch
          statistics): the hand-written BPTT of `seqtest.bptt`;
          the plain LSTM keeps `nn.LSTM`, whose fused CPU kernel is faster than any loop.
          (The normalised and prelu RNNs' loops have not been measured on a GPU; there they
          keep the twin's loop.)
        * "fused": otherwise, cells PyTorch's kernels compute exactly (no autograd graph to
          build in evaluation, so the kernel is the fastest there), and on GPUs always for
          them: there cuDNN fuses the whole sequence;
        * "tanh_kernel": the sigmoid RNN on a GPU, as the tanh RNN it is in disguise
          (`sigmoid_rnn_on_tanh_kernel`): cuDNN's kernel instead of a loop that launches
          kernels step by step (4-15x the tanh RNN's step time on an H200);
        * "loop": the rest, the twin's step-by-step loop; and every layer of a model given to
          `train_on_twin_loop`.
        """
        if self.twin_loop:
            return "loop"
        config = self.config
        if x.device.type != "cpu":
            if config.fused:
                return "fused"
            if config.cell == "rnn" and config.norm == "none" and config.activation == "sigmoid":
                return "tanh_kernel"
        if self.training and torch.is_grad_enabled():
            batch_statistics = config.norm != "batch" or x.shape[0] >= 2
            if config.cell == "rnn":
                on_cpu = x.device.type == "cpu"
                if config.norm == "none":
                    if config.activation in RNN_ACTIVATIONS or on_cpu:  # (on_cpu: prelu)
                        return "bptt"
                elif on_cpu and batch_statistics:
                    return "bptt"
            elif config.cell == "gru":
                return "bptt"
            elif config.cell == "lstm" and config.norm != "none" and batch_statistics:
                return "bptt"
        return "fused" if config.fused else "loop"

    def normalisations(self) -> tuple[Normalisation, ...]:
        """The normalisations inside the step loop, as `seqtest.bptt` takes them: the LSTM's
        of W_hh h and of c; the RNN's one, of the pre-activation (layer norm) or of W_hh h
        (batch norm)."""
        if self.config.cell == "lstm":
            modules = (self.norm_h, self.norm_c)
        else:
            modules = (self.norm_pre if self.config.norm == "layer" else self.norm_h,)
        if self.config.norm == "layer":
            return tuple(Normalisation("layer", n.weight, n.bias, n.eps) for n in modules)
        return tuple(
            Normalisation(
                "batch", n.weight, n.bias, n.eps, n.momentum, n.running_mean, n.running_var
            )
            for n in modules
        )

    def input_term(self, x: torch.Tensor) -> torch.Tensor:
        """A normalised LSTM's or RNN's input term N_x(W_ih x) + b_ih + b_hh of every step,
        time-major [T, B, G*H], as the hand-written BPTT takes it (autograd differentiates
        it); the layer-norm RNN normalises after adding the recurrent term, so its input
        term is W_ih x + b_ih + b_hh.

        The same values as `project`, computed with fewer passes over [T, B, G*H]: with few
        inputs (`FEW_INPUTS`), layer norm's statistics come from the weights (the feature
        mean of W x is the rows' mean times x, its variance x' S x with S the covariance of
        W's columns, [in, in]) and batch norm's from each step's input covariance, so the
        product is written once, already normalised and shifted. Measured on a 2-core CPU,
        normalising each step inside the loop instead cost one normalisation kernel forward
        and backward and two matrix products per step (docs/performance.md)."""
        w_ih, _, b_ih, b_hh = self.weights()
        if self.config.norm == "batch":  # (forward_linear adds N_x's own shift, if any)
            return self.norm_x.forward_linear(x, w_ih, b_ih + b_hh, time_major=True)
        steps = x.transpose(0, 1)  # [T, B, in]
        if self.config.cell == "rnn":
            if x.shape[-1] >= SKINNY_INPUTS:
                return F.linear(steps, w_ih, b_ih + b_hh)
            # few inputs: one product per step, so that autograd forms W_ih's gradient in
            # the faster order (seqtest.bptt.input_weight_gradient) and sums it over steps
            # (forward and backward: 0.21-0.41x the time of one F.linear, one thread, with 2
            # inputs at the benchmark's three sizes and with 10 at the middle one)
            return torch.baddbmm(b_ih + b_hh, steps, w_ih.t().expand(x.shape[1], -1, -1))
        norm_x = self.norm_x
        shift = b_ih + b_hh + norm_x.bias
        if x.shape[-1] > FEW_INPUTS:
            return F.layer_norm(F.linear(steps, w_ih), norm_x.normalized_shape, norm_x.weight,
                                shift, norm_x.eps)  # fmt: skip
        centred = w_ih - w_ih.mean(0)  # W x - mean_f (W x) = centred x
        covariance = centred.t() @ centred / w_ih.shape[0]  # var_f (W x) = x' S x
        var = ((steps @ covariance) * steps).sum(-1, keepdim=True)
        scaled = steps * torch.rsqrt(var + norm_x.eps)
        # one product per step with the same weight (batched; measured 0.78x the time of one
        # F.linear over [T*B, in], forward and backward, at B=64, T=200, H=128)
        weight = (centred * norm_x.weight[:, None]).t().expand(x.shape[1], -1, -1)
        return torch.baddbmm(shift, scaled, weight)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The input term of every step at once, [B, T, G*H]: W_ih x + b_ih for plain cells;
        for normalised ones the normalised W_ih x (the per-step statistics of batch norm are
        over the batch, so all steps can be normalised together) plus both biases."""
        w_ih, _, b_ih, b_hh = self.weights()
        norm = self.config.norm
        if norm == "none":
            return F.linear(x, w_ih, b_ih)
        if norm == "batch":
            projected = self.norm_x.forward_linear(x, w_ih)
        else:
            projected = F.linear(x, w_ih)
            if self.config.cell == "lstm":
                projected = self.norm_x(projected)
        return projected + (b_ih + b_hh)

    def unroll(self, x: torch.Tensor):
        """Run the steps one at a time: (h list, c list (LSTM), pre-activation list)."""
        projected = self.project(x)
        B, H = x.shape[0], self.config.hidden_size
        state = (x.new_zeros(B, H), x.new_zeros(B, H))
        hs, cs, pres = [], [], []
        for t, xp in enumerate(projected.unbind(1)):
            state, pre = self.step(xp, state, t)
            hs.append(state[0])
            if self.config.cell == "lstm":
                cs.append(state[1])
            pres.append(pre)
        return hs, cs, pres

    def step(self, xp: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], t: int):
        """One step. `xp` is the step's input term from `project`; `state` is (h, c) (c is
        used by the LSTM alone). Returns the new state and the step's pre-activations [B, G*H].
        """
        config = self.config
        _, w_hh, _, b_hh = self.weights()
        h, c = state
        norm = config.norm
        if norm == "batch":
            hp = self.norm_h(F.linear(h, w_hh), t) + xp
        elif norm == "layer" and config.cell == "lstm":
            hp = self.norm_h(F.linear(h, w_hh)) + xp
        elif norm == "layer":
            hp = xp + F.linear(h, w_hh)
        else:
            hp = xp + F.linear(h, w_hh, b_hh)
        if config.cell == "rnn":
            pre = self.norm_pre(hp) if norm == "layer" else hp
            return (self.activation(pre), c), pre
        if config.cell == "lstm":
            i, f, g, o = hp.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_out = c
            if norm == "layer":
                c_out = self.norm_c(c)
            elif norm == "batch":
                c_out = self.norm_c(c, t)
            return (torch.sigmoid(o) * torch.tanh(c_out), c), hp
        # gru: the n gate sees r * (W_hn h + b_hn), so it needs the two projections apart
        x_r, x_z, x_n = xp.chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n_pre = x_n + r * h_n
        h = (1 - z) * torch.tanh(n_pre) + z * h
        return (h, c), torch.cat([x_r + h_r, x_z + h_z, n_pre], dim=-1)


def train_on_twin_loop(model: nn.Module, on: bool = True) -> nn.Module:
    """Make every recurrent layer of `model` run the twin's step loop (`RecurrentLayer.path`
    "loop"), in training too, whatever path it would take (``on=False`` undoes it): the
    reference that the hand-written and fused paths are tested and measured against
    (`seqtest.bench.path_records`). Returns `model`."""
    for module in model.modules():
        if isinstance(module, RecurrentLayer):
            module.twin_loop = on
    return model


class RecurrentModel(nn.Module):
    """A stack of recurrent layers and a linear readout applied at every step."""

    def __init__(self, config: ModelConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        sizes = [input_size] + [config.hidden_size] * (config.num_layers - 1)
        self.layers = nn.ModuleList(RecurrentLayer(config, size) for size in sizes)
        self.readout = nn.Linear(config.hidden_size, output_size)

    @property
    def cell(self) -> str:
        return self.config.cell

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        """(W_ih, W_hh, b_ih, b_hh) of one layer, in PyTorch's gate order."""
        return self.layers[layer].weights()

    def recurrent_weight(self, layer: int) -> torch.Tensor:
        return self.layers[layer].weights()[1]

    def _residual(self, layer: int, layer_input: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + layer_input if self.config.residual and layer > 0 else out

    def forward(self, x: torch.Tensor, steps: slice = slice(None)) -> torch.Tensor:
        """Outputs [B, T', output_size] at the time steps `steps` (default: every step). The
        training loop passes the task's `scored_steps`, so a task scored at its last step
        pays for one readout, not T."""
        hidden = x
        for index, layer in enumerate(self.layers):
            hidden = self._residual(index, hidden, layer(hidden))
        return self.readout(hidden[:, steps])

    def forward_unrolled(self, x: torch.Tensor) -> tuple[torch.Tensor, States]:
        """The same function as `forward`, one step at a time, returning every state."""
        states = States()
        hidden = x
        for index, layer in enumerate(self.layers):
            hs, cs, pres = layer.unroll(hidden)
            states.h.append(hs)
            states.pre.append(pres)
            if cs:
                states.c.append(cs)
            hidden = self._residual(index, hidden, torch.stack(hs, dim=1))
        return self.readout(hidden), states


class FeedforwardModel(nn.Module):
    """The deep feedforward baseline: the whole sequence, flattened, through `num_layers`
    hidden layers (Linear -> [batch norm] -> activation) to the task's output at the last step.

    Depth plays the part of time: ``forward_unrolled`` returns the activation a_l of every
    hidden layer as ``States.h[0][l]``, so the gradient analysis measures ||dL/da_l|| per layer
    and fits its decay over depth. Only tasks scored at the last step alone fit it.
    """

    cell = "mlp"

    def __init__(self, config: ModelConfig, input_size: int, output_size: int, seq_len: int):
        super().__init__()
        self.config = config
        self.seq_len = seq_len
        H = config.hidden_size
        sizes = [input_size * seq_len] + [H] * config.num_layers
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(H) if config.norm == "batch" else nn.Identity() for _ in self.linears
        )
        self.activations = nn.ModuleList(
            activation_function(config.activation, config.leaky_slope, H) for _ in self.linears
        )
        self.readout = nn.Linear(H, output_size)
        # the first layer takes the input scheme, the square hidden-to-hidden ones the
        # recurrent scheme: the depth analogue of input and recurrent weights
        for index, linear in enumerate(self.linears):
            scheme = config.init_input if index == 0 else config.init_recurrent
            init_gate_blocks(linear.weight.data, 1, scheme, config.init_gain, config.init_std)

    @property
    def num_layers(self) -> int:
        return 1  # one "layer" whose "steps" are the hidden layers

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.seq_len:
            raise ConfigError(
                f"model=mlp reads sequences of exactly {self.seq_len} steps; got {x.shape[1]}"
            )

    def _output(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], x.shape[1], self.readout.out_features)
        return torch.cat([out[:, :-1], self.readout(last).unsqueeze(1)], dim=1)

    def forward(self, x: torch.Tensor, steps: slice = slice(None)) -> torch.Tensor:
        return self.forward_unrolled(x)[0][:, steps]

    def forward_unrolled(self, x: torch.Tensor) -> tuple[torch.Tensor, States]:
        self._check(x)
        a = x.flatten(1)
        hs, pres = [], []
        for linear, norm, activation in zip(
            self.linears, self.norms, self.activations, strict=True
        ):
            pre = norm(linear(a))
            a = activation(pre)
            hs.append(a)
            pres.append(pre)
        return self._output(x, a), States(h=[hs], pre=[pres])

    def recurrent_weight(self, layer: int) -> None:
        return None


def build_model(
    config: ModelConfig | dict, input_size: int, output_size: int, seq_len: int | None = None
) -> nn.Module:
    """Build the model a `model/` config describes, sized for a task's inputs and outputs
    (the feedforward baseline also needs the sequence length)."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig(**dict(config))
    if config.cell == "mlp":
        require(seq_len is not None, "model.cell", "mlp", "a task with a fixed sequence length")
        return FeedforwardModel(config, input_size, output_size, seq_len)
    return RecurrentModel(config, input_size, output_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
