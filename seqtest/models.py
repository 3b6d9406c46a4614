"""Recurrent models behind one interface: vanilla RNN, LSTM and GRU with a linear readout at
every step.

Two forward paths share the same parameters:

* ``forward(x)`` runs PyTorch's fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` kernels: the fast
  path used for training.
* ``forward_unrolled(x)`` runs the same cell equations one step at a time in Python and
  returns every per-step state that the next step consumes. The gradient of the loss with
  respect to those tensors is the *total* derivative dL/dh_t through the recurrence. (The
  gradient of the fused module's output holds only the direct term: the recurrence runs
  inside the kernel and never touches it.) This is the path the gradient analysis uses.

Shapes are batch-first: x [B, T, input_size] -> output [B, T, output_size].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seqtest.errors import require, require_choice, require_positive_int

CELLS = ("rnn", "lstm", "gru")
ACTIVATIONS = ("tanh", "relu")


@dataclass
class ModelConfig:
    """What `model/<name>.yaml` holds. `name` is the preset's name, for results only."""

    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    activation: str = "tanh"  # vanilla RNN only
    forget_bias: float = 1.0  # LSTM only: initial forget-gate bias (b_ih + b_hh)
    name: str = ""

    def __post_init__(self) -> None:
        require_choice("model.cell", self.cell, CELLS)
        require_positive_int("model.hidden_size", self.hidden_size)
        require_positive_int("model.num_layers", self.num_layers)
        require_choice("model.activation", self.activation, ACTIVATIONS)
        require(
            self.cell == "rnn" or self.activation == "tanh",
            "model.activation",
            self.activation,
            f"tanh for cell {self.cell!r} (only the vanilla RNN takes another activation)",
        )


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


class RecurrentModel(nn.Module):
    """A stack of recurrent layers and a linear readout applied at every step."""

    def __init__(self, config: ModelConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        extra = {"nonlinearity": config.activation} if config.cell == "rnn" else {}
        self.rnn = kind(
            input_size, config.hidden_size, num_layers=config.num_layers, batch_first=True, **extra
        )
        self.readout = nn.Linear(config.hidden_size, output_size)
        if config.cell == "lstm":
            self._set_forget_bias(config.forget_bias)

    def _set_forget_bias(self, value: float) -> None:
        H = self.config.hidden_size
        with torch.no_grad():
            for layer in range(self.config.num_layers):
                getattr(self.rnn, f"bias_ih_l{layer}")[H : 2 * H].fill_(value)
                getattr(self.rnn, f"bias_hh_l{layer}")[H : 2 * H].zero_()

    @property
    def cell(self) -> str:
        return self.config.cell

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        """(W_ih, W_hh, b_ih, b_hh) of one layer, in PyTorch's gate order."""
        return tuple(
            getattr(self.rnn, f"{name}_l{layer}")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def recurrent_weight(self, layer: int) -> torch.Tensor:
        return getattr(self.rnn, f"weight_hh_l{layer}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(x)
        return self.readout(hidden)

    def forward_unrolled(self, x: torch.Tensor) -> tuple[torch.Tensor, States]:
        """The same function as `forward`, one step at a time, returning every state."""
        states = States()
        layer_input = x
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
            projected = F.linear(layer_input, w_ih, b_ih)  # [B, T, G*H], all steps at once
            hs, cs, pres = self._unroll_layer(projected, w_hh, b_hh)
            states.h.append(hs)
            states.pre.append(pres)
            if cs:
                states.c.append(cs)
            layer_input = torch.stack(hs, dim=1)
        return self.readout(layer_input), states

    def _unroll_layer(self, projected: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor):
        B, H = projected.shape[0], self.config.hidden_size
        h = projected.new_zeros(B, H)
        c = projected.new_zeros(B, H)
        hs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        pres: list[torch.Tensor] = []
        for xp in projected.unbind(1):
            hp = F.linear(h, w_hh, b_hh)
            if self.cell == "rnn":
                pre = xp + hp
                h = torch.tanh(pre) if self.config.activation == "tanh" else torch.relu(pre)
            elif self.cell == "lstm":
                pre = xp + hp
                i, f, g, o = pre.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                cs.append(c)
            else:  # gru
                x_r, x_z, x_n = xp.chunk(3, dim=-1)
                h_r, h_z, h_n = hp.chunk(3, dim=-1)
                r = torch.sigmoid(x_r + h_r)
                z = torch.sigmoid(x_z + h_z)
                n = torch.tanh(x_n + r * h_n)
                h = (1 - z) * n + z * h
                pre = torch.cat([x_r + h_r, x_z + h_z, x_n + r * h_n], dim=-1)
            hs.append(h)
            pres.append(pre)
        return hs, cs, pres


def build_model(config: ModelConfig | dict, input_size: int, output_size: int) -> RecurrentModel:
    """Build the model a `model/` config describes, sized for a task's inputs and outputs."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig(**dict(config))
    return RecurrentModel(config, input_size, output_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
