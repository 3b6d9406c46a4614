"""The multiplication problem (Hochreiter & Schmidhuber 1997, experiment 5; Pascanu et al.
2013).

Definition. The adding problem (``adding.py``) with the product of the two marked values
as the target. Each input step has two channels: a value drawn from U[0, 1] and a marker
in {0, 1}; exactly two steps are marked, placed as in the adding task (``placement``:
``halves``, one marker uniform over [0, T//2) and one over [T//2, T); ``anywhere``, two
distinct steps uniform over the sequence; ``hochreiter``, one uniform over the first ten
steps [0, min(10, T//2)) and one over the first half [0, T//2), distinct). The values are
U[0, 1] for every placement, as in the paper's experiment 5. The target is x1 * x2; only
the last step's output is scored, by mean squared error.

Example, T = 6, markers at steps 1 and 4::

    value  0.31 0.72 0.05 0.90 0.44 0.18
    marker 0    1    0    0    1    0
    target                            0.3168   (= 0.72 * 0.44, scored at the last step)

Baseline 7/144 (about 0.0486). A predictor that remembers nothing outputs a constant; the
best one is E[x1 x2] = E[x1] E[x2] = 1/4 (the values are independent), with MSE
Var[x1 x2] = E[x1^2] E[x2^2] - (1/4)^2 = (1/3)^2 - 1/16 = 1/9 - 1/16 = 7/144.

Solved: validation MSE below ``solved_mse`` (0.003, about 6% of the baseline, the same
fraction as the adding task's 0.01 of 1/6).

Measured with the default LSTM (hidden 128, Adam 1e-3, batch 64, clip 1, validation every
100 steps), CPU: at T = 50 it is solved at step 1400, 1400 and 1200 (seeds 0, 1, 2), well
within the default budget of 3000 steps; the loss sits at the baseline for about 1000
steps, then drops. At T = 100 it is solved at step 3300 (seed 0: just past the default
budget; ``train.steps=4000`` covers it) and 2800 (seed 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtest.errors import require, require_choice, require_positive_int
from seqtest.tasks._base import Batch, Task, register_task
from seqtest.tasks.adding import PLACEMENTS, marked_input, marker_positions


@register_task("multiplication")
@dataclass
class MultiplicationTask(Task):
    length: int = 100
    placement: str = "halves"
    solved_mse: float = 0.003

    loss_kind = "mse"
    scored_steps = slice(-1, None)  # the last step alone
    baseline_formula = "Var[x1 x2] = E[x^2]^2 - E[x]^4 = 1/9 - 1/16 = 7/144, x ~ U[0,1]"
    input_size = 2
    output_size = 1

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require_choice("task.placement", self.placement, PLACEMENTS)
        least = 4 if self.placement == "hochreiter" else 2
        require(self.length >= least, "task.length", self.length, f"an integer >= {least}")
        require(self.solved_mse > 0, "task.solved_mse", self.solved_mse, "a positive number")

    @property
    def seq_len(self) -> int:
        return self.length

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        T, device = self.length, generator.device
        values = torch.rand(batch_size, T, generator=generator, device=device)
        x, pair = marked_input(values, *marker_positions(self.placement, T, batch_size, generator))
        y = torch.zeros(batch_size, T, 1, device=device)
        y[:, -1, 0] = pair.prod(1)
        return Batch(x, y, self.scored_steps_mask(batch_size, device))

    @property
    def baseline_loss(self) -> float:
        return 7.0 / 144.0

    def solved(self, metrics: dict) -> bool:
        return metrics["val_loss"] < self.solved_mse

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1] > 0.5
