"""Delayed XOR / parity with a set lag.

Definition. The input is one channel of bits b_t in {0, 1}, each an independent fair coin,
over T steps (``length``). With lag L (``lag``) and n bits (``num_bits``, 2 by default:
XOR; more: parity), the target at step t is

    y_t = b_t XOR b_{t-L} XOR ... XOR b_{t-(n-1)L},

defined for t >= (n-1)L, two classes. ``score="all"`` scores every step from (n-1)L on
(the model must carry a sliding window of the last (n-1)L bits); ``score="last"`` scores
the last step only (the model must keep the n-1 bits at the known steps T-1-L, ..., and
nothing else). Scored steps are judged by cross-entropy; the metric is the accuracy on them.

Example, L = 2, n = 2, score all::

    input   1 0 0 1 1 1 0
    target      1 1 1 0 1   (b_t XOR b_{t-2}; steps 0 and 1 are not scored)

Baseline ln 2. Each target contains b_{t-L}, a fair coin independent of everything else in
that target's view at step t, so the target is a fair coin given the current input and the
step index: a predictor that remembers nothing outputs (1/2, 1/2), cross-entropy ln 2.

Solved: accuracy on the scored steps (``val_metric``) of at least ``solved_accuracy``
(0.99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqtest.errors import require, require_choice, require_positive_int
from seqtest.tasks._base import Batch, register_task
from seqtest.tasks._common import AccuracyTask

SCORES = ("all", "last")


@register_task("delayed_xor")
@dataclass
class DelayedXorTask(AccuracyTask):
    length: int = 100
    lag: int = 10
    num_bits: int = 2
    score: str = "all"
    solved_accuracy: float = 0.99

    loss_kind = "cross_entropy"
    metric_name = "accuracy"
    baseline_formula = "ln 2: b_{t-L} is a fair coin the current input says nothing about"
    input_size = 1
    output_size = 2

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require_positive_int("task.lag", self.lag)
        require_positive_int("task.num_bits", self.num_bits)
        require(self.num_bits >= 2, "task.num_bits", self.num_bits, "an integer >= 2")
        require(
            self.length > (self.num_bits - 1) * self.lag,
            "task.length",
            self.length,
            f"an integer > (num_bits - 1) * lag = {(self.num_bits - 1) * self.lag}",
        )
        require_choice("task.score", self.score, SCORES)
        require(
            0 < self.solved_accuracy <= 1,
            "task.solved_accuracy",
            self.solved_accuracy,
            "a number in (0, 1]",
        )

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def first_scored(self) -> int:
        return self.length - 1 if self.score == "last" else (self.num_bits - 1) * self.lag

    @property
    def scored_steps(self) -> slice:
        return slice(self.first_scored, None)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        T, L, device = self.length, self.lag, generator.device
        bits = torch.randint(0, 2, (batch_size, T), generator=generator, device=device)
        y = torch.zeros(batch_size, T, dtype=torch.long, device=device)
        start = (self.num_bits - 1) * L
        for j in range(self.num_bits):
            y[:, start:] ^= bits[:, start - j * L : T - j * L]
        return Batch(bits.unsqueeze(-1).float(), y, self.scored_steps_mask(batch_size, device))

    @property
    def baseline_loss(self) -> float:
        return math.log(2)

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Every step whose bit enters a scored target."""
        T, L = self.length, self.lag
        scored = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        scored[:, self.first_scored :] = True
        positions = torch.zeros_like(scored)
        for j in range(self.num_bits):
            positions[:, : T - j * L] |= scored[:, j * L :]
        return positions
