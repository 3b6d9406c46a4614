"""Random permutation, or one-bit memory (Hochreiter & Schmidhuber 1997, experiment 2b;
Pascanu et al. 2013).

Definition. Tokens: 0 and 1 are the two bit symbols, 2..V-1 the noise symbols
(``vocab_size`` V, 100 by default as in Pascanu et al.). Inputs are one-hot over the V
tokens. A sequence of T steps (``length``) starts with a bit symbol b, drawn uniformly from
{0, 1}; the other T-1 steps hold noise symbols drawn uniformly and independently (so they
carry nothing about b). The target is b at the last step, two classes; only the last step's
output is scored, by cross-entropy; the metric is the accuracy there.

Example, V = 100, T = 6::

    input   1 57 3 88 12 40
    target                1   (the first symbol, scored at the last step)

Baseline ln 2. The bit is uniform and independent of the noise, so a predictor that
remembers nothing outputs (1/2, 1/2): cross-entropy ln 2.

Solved: accuracy at the last step (``val_metric``) of at least ``solved_accuracy`` (0.99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqtest.errors import require, require_positive_int
from seqtest.tasks._base import Batch, register_task
from seqtest.tasks._common import AccuracyTask


@register_task("random_permutation")
@dataclass
class RandomPermutationTask(AccuracyTask):
    length: int = 100
    vocab_size: int = 100
    solved_accuracy: float = 0.99

    loss_kind = "cross_entropy"
    metric_name = "accuracy"
    scored_steps = slice(-1, None)  # the last step alone
    baseline_formula = "ln 2: the first symbol is a fair coin, independent of the noise"
    output_size = 2

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require(self.length >= 2, "task.length", self.length, "an integer >= 2")
        require_positive_int("task.vocab_size", self.vocab_size)
        require(
            self.vocab_size >= 3,
            "task.vocab_size",
            self.vocab_size,
            "an integer >= 3 (two bit symbols and at least one noise symbol)",
        )
        require(
            0 < self.solved_accuracy <= 1,
            "task.solved_accuracy",
            self.solved_accuracy,
            "a number in (0, 1]",
        )
        self.input_size = self.vocab_size

    @property
    def seq_len(self) -> int:
        return self.length

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        T, device = self.length, generator.device
        tokens = torch.randint(
            2, self.vocab_size, (batch_size, T), generator=generator, device=device
        )
        bit = torch.randint(0, 2, (batch_size,), generator=generator, device=device)
        tokens[:, 0] = bit
        y = torch.zeros(batch_size, T, dtype=torch.long, device=device)
        y[:, -1] = bit
        x = F.one_hot(tokens, self.input_size).float()
        return Batch(x, y, self.scored_steps_mask(batch_size, device))

    @property
    def baseline_loss(self) -> float:
        return math.log(2)

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions[:, 0] = True
        return positions
