"""Weight-initialisation schemes by name, applied per gate block.

A recurrent layer's weight matrices stack one block per gate ([G*H, in]); each scheme is
applied to every block separately, so "orthogonal" makes each gate's recurrent matrix
orthogonal and "identity" makes each one the identity (times `gain`), as in the papers that
introduced them.

| scheme | what it draws | source |
|---|---|---|
| `default` | PyTorch's own: U(-1/sqrt(H), 1/sqrt(H)) | |
| `xavier_uniform`, `xavier_normal` | var 2 gain^2 / (fan_in + fan_out) | Glorot & Bengio 2010 |
| `kaiming_uniform`, `kaiming_normal` | variance 2 / fan_in (relu gain; He init) | He et al. 2015 |
| `orthogonal` | a random orthogonal matrix times `gain` | Saxe et al. 2014 |
| `identity` | `gain` times the identity (with relu: the IRNN) | Le et al. 2015 |
| `normal` | N(0, std^2): with a small std, the "weights too small" cause | |
"""

from __future__ import annotations

import torch
from torch import nn

from seqtest.errors import require

SCHEMES = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
    "identity",
    "normal",
)


@torch.no_grad()
def init_block(weight: torch.Tensor, scheme: str, gain: float = 1.0, std: float = 0.01) -> None:
    """Initialise one 2-D weight block in place by `scheme`. `default` leaves it untouched."""
    if scheme == "default":
        return
    if scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight, gain=gain)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight, gain=gain)
    elif scheme == "kaiming_uniform":
        nn.init.kaiming_uniform_(weight, nonlinearity="relu")
    elif scheme == "kaiming_normal":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=gain)
    elif scheme == "identity":
        require(
            weight.shape[0] == weight.shape[1],
            "init scheme",
            "identity",
            f"a square matrix (got {tuple(weight.shape)}): use it for recurrent weights",
        )
        weight.copy_(torch.eye(weight.shape[0], dtype=weight.dtype) * gain)
    elif scheme == "normal":
        nn.init.normal_(weight, mean=0.0, std=std)
    else:  # pragma: no cover - check_scheme rejects it first
        raise ValueError(scheme)


def init_gate_blocks(
    weight: torch.Tensor, gates: int, scheme: str, gain: float = 1.0, std: float = 0.01
) -> None:
    """Apply `scheme` to each of the `gates` row blocks of a stacked weight matrix."""
    for block in weight.chunk(gates, dim=0):
        init_block(block, scheme, gain, std)
