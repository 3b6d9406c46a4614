"""Multi-query associative recall (Ba et al. 2016; the MQAR variant of Arora et al. 2023).

Definition. Tokens: 0 is the blank, 1..Kk the keys (``key_vocab``), Kk+1..Kk+Kv the values
(``value_vocab``). Inputs are one-hot over the 1 + Kk + Kv tokens. A sequence presents P
key-value pairs (``num_pairs``) as 2P steps k1 v1 k2 v2 ...; the P keys are distinct,
drawn uniformly without replacement, and each value is drawn uniformly and independently
(two keys may share a value). Then come T blanks (``length``, the delay; 0 is allowed),
then Q queries (``num_queries``, Q <= P): the keys of Q distinct pairs chosen uniformly, in
random order. 2P + T + Q steps in all. At each query step the target is the value paired
with the queried key, as a class 0..Kv-1 (value token Kk+1+j is class j). Only the Q query
steps are scored, by cross-entropy; the metric is the accuracy on them.

Example, P = 3, Q = 2, T = 2, Kk = Kv = 4 (keys 1-4, values 5-8)::

    input   3 6 1 8 4 6 0 0 1 4
    target                  3 1   (1 -> 8 is class 3; 4 -> 6 is class 1; scored only here)

Baseline ln Kv. The values are uniform and independent of the keys, so at each query step
a predictor that remembers nothing (it sees the queried key, which says nothing of its
value) outputs the uniform distribution over the Kv values: cross-entropy ln Kv, averaged
over the Q scored steps.

Solved: accuracy on the query steps (``val_metric``) of at least ``solved_accuracy``
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


@register_task("associative_recall")
@dataclass
class AssociativeRecallTask(AccuracyTask):
    length: int = 50
    num_pairs: int = 8
    num_queries: int = 8
    key_vocab: int = 16
    value_vocab: int = 16
    solved_accuracy: float = 0.99

    loss_kind = "cross_entropy"
    metric_name = "query_accuracy"
    baseline_formula = "ln Kv at each of the Q scored query steps"

    def __post_init__(self) -> None:
        require(
            isinstance(self.length, int) and not isinstance(self.length, bool) and self.length >= 0,
            "task.length",
            self.length,
            "an integer >= 0",
        )
        for name in ("num_pairs", "num_queries", "key_vocab", "value_vocab"):
            require_positive_int(f"task.{name}", getattr(self, name))
        require(
            self.num_pairs <= self.key_vocab,
            "task.num_pairs",
            self.num_pairs,
            f"an integer <= task.key_vocab ({self.key_vocab}): the keys are distinct",
        )
        require(
            self.num_queries <= self.num_pairs,
            "task.num_queries",
            self.num_queries,
            f"an integer <= task.num_pairs ({self.num_pairs}): each pair is queried once at most",
        )
        require(self.value_vocab >= 2, "task.value_vocab", self.value_vocab, "an integer >= 2")
        require(
            0 < self.solved_accuracy <= 1,
            "task.solved_accuracy",
            self.solved_accuracy,
            "a number in (0, 1]",
        )
        self.input_size = 1 + self.key_vocab + self.value_vocab
        self.output_size = self.value_vocab

    @property
    def seq_len(self) -> int:
        return 2 * self.num_pairs + self.length + self.num_queries

    @property
    def query_start(self) -> int:
        """First query (scored) step."""
        return 2 * self.num_pairs + self.length

    @property
    def scored_steps(self) -> slice:
        return slice(self.query_start, None)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        P, Q, device = self.num_pairs, self.num_queries, generator.device
        order = torch.rand(batch_size, self.key_vocab, generator=generator, device=device)
        keys = order.argsort(dim=1)[:, :P] + 1
        values = torch.randint(
            0, self.value_vocab, (batch_size, P), generator=generator, device=device
        )
        pick = torch.rand(batch_size, P, generator=generator, device=device)
        queried = pick.argsort(dim=1)[:, :Q]
        tokens = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        tokens[:, 0 : 2 * P : 2] = keys
        tokens[:, 1 : 2 * P : 2] = values + self.key_vocab + 1
        tokens[:, self.query_start :] = keys.gather(1, queried)
        y = torch.zeros(batch_size, self.seq_len, dtype=torch.long, device=device)
        y[:, self.query_start :] = values.gather(1, queried)
        mask = self.scored_steps_mask(batch_size, device)
        return Batch(F.one_hot(tokens, self.input_size).float(), y, mask)

    @property
    def baseline_loss(self) -> float:
        return math.log(self.value_vocab)

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        """The key and value steps of the queried pairs, and the query steps themselves."""
        P, start = self.num_pairs, self.query_start
        tokens = x.argmax(-1)
        keys, queries = tokens[:, 0 : 2 * P : 2], tokens[:, start:]
        queried = (keys[:, :, None] == queries[:, None, :]).any(-1)  # [B, P]
        positions = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions[:, 0 : 2 * P : 2] = queried
        positions[:, 1 : 2 * P : 2] = queried
        positions[:, start:] = True
        return positions
