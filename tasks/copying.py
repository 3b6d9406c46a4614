"""Copy memory (Hochreiter & Schmidhuber 1997; the variant of Arjovsky et al. 2016).

Definition. Tokens: 0 is the blank, 1..K are the K data classes (``alphabet_size``, 8 by
default) and K+1 is the delimiter. A sequence holds S (``num_symbols``, 10 by default)
symbols drawn uniformly with replacement from the data classes, then T-1 blanks (T is
``length``, the delay), one delimiter, then S blanks: T + 2S steps in all. Inputs are one-hot
over the K+2 tokens. The target is a blank for the first T+S steps and then the S symbols in
their original order; the output has K+1 classes (blank and data). Cross-entropy is scored
at every one of the T+2S steps.

Example, S = 3, K = 8, T = 4::

    input   5 2 7 0 0 0 9 0 0 0
    target  0 0 0 0 0 0 0 5 2 7

Baseline S ln K / (T + 2S) (10 ln 8 / (T + 20) by default). A predictor that remembers
nothing, but knows the step index, outputs a blank with certainty for the first T+S steps
(loss 0) and the uniform distribution over the K data classes at the S recall steps (loss
ln K each); averaged over all T+2S steps this gives S ln K / (T+2S).

Solved: accuracy on the S recall steps (``val_metric``, "recall_accuracy") of at least
``solved_accuracy`` (0.99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqtest.errors import require, require_positive_int
from seqtest.tasks._base import Batch, register_task
from seqtest.tasks._common import AccuracyTask


@register_task("copying")
@dataclass
class CopyingTask(AccuracyTask):
    length: int = 100
    num_symbols: int = 10
    alphabet_size: int = 8
    solved_accuracy: float = 0.99

    loss_kind = "cross_entropy"
    metric_name = "recall_accuracy"
    baseline_formula = "S ln K / (T + 2S): ln K at each of the S recall steps, 0 elsewhere"

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require_positive_int("task.num_symbols", self.num_symbols)
        require_positive_int("task.alphabet_size", self.alphabet_size)
        require(
            0 < self.solved_accuracy <= 1,
            "task.solved_accuracy",
            self.solved_accuracy,
            "a number in (0, 1]",
        )
        self.input_size = self.alphabet_size + 2
        self.output_size = self.alphabet_size + 1

    @property
    def seq_len(self) -> int:
        return self.length + 2 * self.num_symbols

    @property
    def delimiter(self) -> int:
        return self.alphabet_size + 1

    @property
    def recall_start(self) -> int:
        """First step whose target is a recalled symbol."""
        return self.length + self.num_symbols

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        S, device = self.num_symbols, generator.device
        symbols = torch.randint(
            1, self.alphabet_size + 1, (batch_size, S), generator=generator, device=device
        )
        tokens = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        tokens[:, :S] = symbols
        tokens[:, self.recall_start - 1] = self.delimiter
        x = F.one_hot(tokens, self.input_size).float()
        y = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        y[:, self.recall_start :] = symbols
        return Batch(x, y, self.scored_steps_mask(batch_size, device))

    @property
    def baseline_loss(self) -> float:
        return self.num_symbols * math.log(self.alphabet_size) / self.seq_len

    def metric(self, output: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Accuracy on the S recall steps alone (the blanks are easy and would dilute it)."""
        recall = slice(self.recall_start, None)
        return (output[:, recall].argmax(-1) == y[:, recall]).float().mean()

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions[:, : self.num_symbols] = True
        return positions
