"""Small pieces shared by several task files (not a task: files starting with `_` are not
scanned by the registry)."""

from __future__ import annotations

import torch

from seqtest.tasks._base import Task


def masked_accuracy(output: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of scored (sample, step) pairs whose arg-max class equals the target.

    Every task that uses it scores the same number of steps in every sequence, so this is
    also the mean over sequences of their per-sequence accuracy."""
    correct = (output.argmax(-1) == y) & mask
    return correct.sum().float() / mask.sum()


def distinct_sorted_positions(
    batch_size: int, n: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """Long [batch_size, k]: for each row a uniformly random k-subset of range(n), ascending."""
    keys = torch.rand(batch_size, n, generator=generator, device=generator.device)
    return keys.argsort(dim=1)[:, :k].sort(dim=1).values


class AccuracyTask(Task):
    """Base of the classification tasks judged by accuracy on their scored steps: the metric
    is `masked_accuracy`, and the task is solved when it reaches the `solved_accuracy` field
    that each subclass declares."""

    solved_accuracy: float

    def metric(self, output: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_accuracy(output, y, mask)

    def solved(self, metrics: dict) -> bool:
        return metrics["val_metric"] >= self.solved_accuracy
