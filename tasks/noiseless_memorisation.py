"""Noiseless memorisation (Martens & Sutskever 2011; Pascanu et al. 2013).

Definition. Tokens: 0 is the blank, 1..K the K pattern symbols (``alphabet_size``, 2 by
default: bits), K+1 the trigger. Inputs are one-hot over the K+2 tokens. A sequence holds a
pattern of S symbols (``num_symbols``, 5 by default: the "5-bit" problem) drawn uniformly
with replacement, then T-1 blanks (T is ``length``, the delay), the trigger, then S blanks:
T + 2S steps, the layout of the copy task (``copying.py``). The targets are the S pattern
symbols, in order, at the last S steps, as classes 0..K-1 (symbol s is class s-1). Only
those S recall steps are scored, by cross-entropy; nothing is asked of the other steps
(the copy task, by contrast, also scores its blanks). The metric is the accuracy on the
recall steps. Unlike the noisy variants, nothing but blanks separates pattern and recall.

Example, S = 5, K = 2, T = 4 (symbols 1 and 2 are the bits, 3 the trigger)::

    input   2 1 1 2 1 0 0 0 3 0 0 0 0 0
    target                    1 0 0 1 0   (scored only here)

Baseline ln K (ln 2 by default). The pattern symbols are uniform and independent, so at
each recall step a predictor that remembers nothing outputs the uniform distribution over
the K symbols: cross-entropy ln K, averaged over the S scored steps.

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
from seqtest.tasks._common import AccuracyTask


@register_task("noiseless_memorisation")
@dataclass
class NoiselessMemorisationTask(AccuracyTask):
    length: int = 100
    num_symbols: int = 5
    alphabet_size: int = 2
    solved_accuracy: float = 0.99

    loss_kind = "cross_entropy"
    metric_name = "recall_accuracy"
    baseline_formula = "ln K at each of the S scored recall steps"

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require_positive_int("task.num_symbols", self.num_symbols)
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
        return self.length + 2 * self.num_symbols

    @property
    def trigger(self) -> int:
        return self.alphabet_size + 1

    @property
    def recall_start(self) -> int:
        """First scored step."""
        return self.length + self.num_symbols

    @property
    def scored_steps(self) -> slice:
        return slice(self.recall_start, None)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        S, device = self.num_symbols, generator.device
        pattern = torch.randint(
            1, self.alphabet_size + 1, (batch_size, S), generator=generator, device=device
        )
        tokens = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        tokens[:, :S] = pattern
        tokens[:, self.recall_start - 1] = self.trigger
        y = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        y[:, self.recall_start :] = pattern - 1
        mask = self.scored_steps_mask(batch_size, device)
        return Batch(F.one_hot(tokens, self.input_size).float(), y, mask)

    @property
    def baseline_loss(self) -> float:
        return math.log(self.alphabet_size)

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions[:, : self.num_symbols] = True
        return positions
