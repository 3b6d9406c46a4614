"""Selective copy (Jing et al. 2019; Gu & Dao 2023).

Definition. Tokens: 0 is the blank, 1..K the K data symbols (``alphabet_size``, 8 by
default), K+1 the delimiter. Inputs are one-hot over the K+2 tokens. The first T steps
(``length``) are the data region: S of them (``num_symbols``, 10 by default), a uniformly
random S-subset of the T steps, hold data symbols drawn uniformly with replacement; the
others are blank. Step T holds the delimiter, and the S steps after it are blank: T + 1 + S
steps in all. The targets are the S data symbols in the order they appeared, at the last S
steps, as classes 0..K-1 (symbol s is class s-1). Only those S recall steps are scored, by
cross-entropy; the metric is the accuracy on them. Unlike the copy task, where the symbols
occupy the first S steps, the model must select them from wherever they fall.

Example, T = 8, S = 3, K = 4 (delimiter 5)::

    input   0 3 0 0 1 0 4 0 5 0 0 0
    target                    2 0 3   (symbols 3, 1, 4 as classes; scored only here)

Baseline ln K. The symbols are uniform and independent of their positions, so at each
recall step a predictor that remembers nothing outputs the uniform distribution over the K
symbols: cross-entropy ln K, averaged over the S scored steps.

Solved: accuracy on the recall steps (``val_metric``) of at least ``solved_accuracy``
(0.99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqtest.errors import require, require_positive_int
from seqtest.tasks._base import Batch, register_task
from seqtest.tasks._common import AccuracyTask, distinct_sorted_positions


@register_task("selective_copy")
@dataclass
class SelectiveCopyTask(AccuracyTask):
    length: int = 100
    num_symbols: int = 10
    alphabet_size: int = 8
    solved_accuracy: float = 0.99

    loss_kind = "cross_entropy"
    metric_name = "recall_accuracy"
    baseline_formula = "ln K at each of the S scored recall steps"

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require_positive_int("task.num_symbols", self.num_symbols)
        require(
            self.num_symbols <= self.length,
            "task.num_symbols",
            self.num_symbols,
            f"an integer <= task.length ({self.length}): the symbols occupy distinct steps",
        )
        require_positive_int("task.alphabet_size", self.alphabet_size)
        require(
            self.alphabet_size >= 2, "task.alphabet_size", self.alphabet_size, "an integer >= 2"
        )
        require(
            0 < self.solved_accuracy <= 1,
            "task.solved_accuracy",
            self.solved_accuracy,
            "a number in (0, 1]",
        )
        self.input_size = self.alphabet_size + 2
        self.output_size = self.alphabet_size

    @property
    def seq_len(self) -> int:
        return self.length + 1 + self.num_symbols

    @property
    def delimiter(self) -> int:
        return self.alphabet_size + 1

    @property
    def scored_steps(self) -> slice:
        return slice(self.length + 1, None)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        T, S, device = self.length, self.num_symbols, generator.device
        positions = distinct_sorted_positions(batch_size, T, S, generator)
        symbols = torch.randint(
            1, self.alphabet_size + 1, (batch_size, S), generator=generator, device=device
        )
        tokens = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        tokens.scatter_(1, positions, symbols)
        tokens[:, T] = self.delimiter
        y = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        y[:, T + 1 :] = symbols - 1
        mask = self.scored_steps_mask(batch_size, device)
        return Batch(F.one_hot(tokens, self.input_size).float(), y, mask)

    @property
    def baseline_loss(self) -> float:
        return math.log(self.alphabet_size)

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions[:, : self.length] = x[:, : self.length, 1 : self.alphabet_size + 1].sum(-1) > 0.5
        return positions
