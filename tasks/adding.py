"""The adding problem (Hochreiter & Schmidhuber 1997; the variant of Le et al. 2015 and
Arjovsky et al. 2016).

Definition. Each input step has two channels: a value drawn from U[0, 1] and a marker in
{0, 1}. Exactly two steps are marked. With ``placement="halves"`` (the default) one marker
is uniform over the first half, steps [0, T//2), and the other uniform over the second
half, [T//2, T). With ``placement="anywhere"`` (the TCN benchmark variant, Bai et al. 2018)
the two markers are two distinct steps uniform over the whole sequence. The target is the
sum of the two marked values; only the last step's output is scored, by mean squared error.

With ``placement="hochreiter"`` (experiment 4 of Hochreiter & Schmidhuber 1997) the values
are drawn from U[-1, 1], the first marker is uniform over the first ten steps,
[0, min(10, T//2)), the second is uniform over the first half, [0, T//2), excluding the
first marker's step (so it may come before it), and the target is 0.5 + (x1 + x2) / 4.
Unlike the paper, the sequence length is fixed, the first and last steps carry no -1
marker, and a marked first step keeps its value. T must be at least 4.

Example, T = 6, markers at steps 1 and 4::

    value  0.31 0.72 0.05 0.90 0.44 0.18
    marker 0    1    0    0    1    0
    target                            1.16   (= 0.72 + 0.44, scored at the last step)

Baseline 1/6. A predictor that remembers nothing can only output a constant; the best one
is E[x1 + x2] = 1, and its MSE is Var[x1 + x2] = 2 * Var[U(0,1)] = 2/12 = 1/6. With
``placement="hochreiter"`` it is Var[0.5 + (x1 + x2)/4] = 2 * Var[U(-1,1)] / 16 = 2 * (1/3)
/ 16 = 1/24.

Solved: validation MSE below ``solved_mse`` (0.01, i.e. 6% of the baseline, the threshold
commonly used since Le et al. 2015 to separate learning from guessing the mean). For
``placement="hochreiter"`` the same 6% of its baseline is ``solved_mse=0.0025``
(``task=adding_hochreiter`` sets it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtest.errors import require, require_choice, require_positive_int
from seqtest.tasks._base import Batch, Task, register_task

PLACEMENTS = ("halves", "anywhere", "hochreiter")


def marker_positions(
    placement: str, T: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two marked steps of each sequence, [batch_size] each, as the docstring defines."""
    device, shape = generator.device, (batch_size,)
    if placement == "halves":
        first = torch.randint(0, T // 2, shape, generator=generator, device=device)
        second = torch.randint(T // 2, T, shape, generator=generator, device=device)
        return first, second
    if placement == "anywhere":  # two distinct steps, uniform over the sequence
        first = torch.randint(0, T, shape, generator=generator, device=device)
        second = torch.randint(0, T - 1, shape, generator=generator, device=device)
    else:  # hochreiter: first in [0, min(10, T//2)), second in [0, T//2) minus the first
        first = torch.randint(0, min(10, T // 2), shape, generator=generator, device=device)
        second = torch.randint(0, T // 2 - 1, shape, generator=generator, device=device)
    return first, second + (second >= first).long()


def marked_input(
    values: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input [batch_size, T, 2] (the values, and markers that are 1 at the two marked
    steps) and the two marked values [batch_size, 2]. By scatter and gather: indexing with
    a Python number would copy it to the device at every batch, a wait for the device on a
    GPU."""
    marked = torch.stack([first, second], dim=1)  # [batch_size, 2]
    markers = torch.zeros_like(values).scatter_(1, marked, 1.0)
    return torch.stack([values, markers], dim=-1), values.gather(1, marked)


@register_task("adding")
@dataclass
class AddingTask(Task):
    length: int = 100
    placement: str = "halves"
    solved_mse: float = 0.01

    loss_kind = "mse"
    scored_steps = slice(-1, None)  # the last step alone
    baseline_formula = "Var[x1+x2] = 1/6 (halves, anywhere); Var[0.5+(x1+x2)/4] = 1/24 (hochreiter)"
    input_size = 2
    output_size = 1

    def __post_init__(self) -> None:
        require_positive_int("task.length", self.length)
        require(self.length >= 2, "task.length", self.length, "an integer >= 2 (two markers)")
        require_choice("task.placement", self.placement, PLACEMENTS)
        if self.placement == "hochreiter":
            require(self.length >= 4, "task.length", self.length, "an integer >= 4 (hochreiter)")
        require(self.solved_mse > 0, "task.solved_mse", self.solved_mse, "a positive number")

    @property
    def seq_len(self) -> int:
        return self.length

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        T, device = self.length, generator.device
        values = torch.rand(batch_size, T, generator=generator, device=device)
        hochreiter = self.placement == "hochreiter"
        if hochreiter:
            values = 2 * values - 1
        x, pair = marked_input(values, *marker_positions(self.placement, T, batch_size, generator))
        y = torch.zeros(batch_size, T, 1, device=device)
        y[:, -1, 0] = pair.sum(1)
        if hochreiter:
            y[:, -1, 0] = 0.5 + y[:, -1, 0] / 4
        return Batch(x, y, self.scored_steps_mask(batch_size, device))

    @property
    def baseline_loss(self) -> float:
        return 1.0 / 24.0 if self.placement == "hochreiter" else 1.0 / 6.0

    def solved(self, metrics: dict) -> bool:
        return metrics["val_loss"] < self.solved_mse

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1] > 0.5
