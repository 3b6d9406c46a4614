"""The task contract and the task registry.

A task is a seeded, vectorised generator of sequences plus everything needed to judge a
model on them: the loss, which output steps are scored, the loss of the best predictor
that remembers nothing (`baseline_loss`), and when the task counts as solved.

Tensors are batch-first everywhere:

    x     [B, T, input_size]  float inputs
    y     [B, T, output_size] float targets (loss_kind "mse"),
          or [B, T] class indices (loss_kind "cross_entropy")
    mask  [B, T]              bool, True where the output is scored; never outside the
                              task's `scored_steps`, the steps training reads out

A task knows nothing about models; a model knows nothing about tasks.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pkgutil
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from seqtest.errors import ConfigError

LOSS_KINDS = ("mse", "cross_entropy")


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


class Task(ABC):
    """Base class of every task; subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str]
    loss_kind: ClassVar[str]
    #: Name of the task's accuracy-like metric (None where the task defines none).
    metric_name: ClassVar[str | None] = None
    #: The baseline as a formula of the parameters, for listings (`seqtest-tasks`).
    baseline_formula: ClassVar[str | None] = None
    #: The time steps that any sample may score, as a slice of the time axis. Training applies
    #: the readout and the loss to these steps only (a task scored at its last step alone
    #: declares ``slice(-1, None)``), which saves the readout of every unscored step. Every
    #: step of the mask must lie inside it; a run checks that on its validation set
    #: (`check_scored_steps`). The default, every step, is always correct. A task whose scored
    #: range depends on its parameters overrides this with a property.
    scored_steps: ClassVar[slice] = slice(None)

    input_size: int
    output_size: int

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Total number of time steps of one sequence."""

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Draw a batch on `generator.device`, using only `generator` for randomness."""

    def validation_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """The fixed validation set. Synthetic tasks draw it like training data (from their own
        seeded generator); tasks with a data set draw it from their held-out split."""
        return self.sample(batch_size, generator)

    @property
    @abstractmethod
    def baseline_loss(self) -> float:
        """Analytic loss of the best predictor that remembers nothing of the input."""

    @abstractmethod
    def solved(self, metrics: dict) -> bool:
        """Whether validation metrics (`val_loss`, `val_metric`) meet the solved criterion."""

    @abstractmethod
    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Bool [B, T]: the input steps that carry the information the targets depend on."""

    def loss(
        self, output: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss over the scored (sample, step) pairs; `mask` None: every pair of `output`
        is scored. Training passes None for a batch whose mask is the task's shared
        `scored_steps_mask` of the steps it reads out: the same number, without the two
        passes over the weights and their gradient (on a GPU, a dozen kernel launches
        fewer per step)."""
        if self.loss_kind == "mse":
            if mask is None and output.shape[-1] == 1:
                return F.mse_loss(output, y)  # (the mean below, in one kernel and its backward)
            per_step = (output - y).pow(2).mean(-1)
        else:
            classes = output.shape[-1]
            per_step = F.cross_entropy(
                output.reshape(-1, classes), y.reshape(-1), reduction="none"
            ).view(output.shape[:-1])
        if mask is None:
            return per_step.mean()
        weight = mask.to(output.dtype)
        return (per_step * weight).sum() / weight.sum()

    def scored_steps_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Bool [batch_size, seq_len], True on `scored_steps`: the mask of a task that scores
        the same steps in every sequence. Made once per shape and shared by every batch (no
        mask is allocated per training step), so it must not be modified."""
        start, stop, stride = self.scored_steps.indices(self.seq_len)
        return _steps_mask(batch_size, self.seq_len, start, stop, stride, torch.device(device))

    def check_scored_steps(self, mask: torch.Tensor) -> None:
        """Raise `ConfigError` if `mask` scores a step outside `scored_steps`: training would
        silently leave that step out of the loss."""
        outside = torch.ones(mask.shape[1], dtype=torch.bool, device=mask.device)
        outside[self.scored_steps] = False
        scored_outside = (mask.any(0) & outside).nonzero()
        if len(scored_outside):
            step = int(scored_outside[0])
            raise ConfigError(
                f"task {self.name!r} declares scored_steps={self.scored_steps} "
                f"but its mask scores step {step} of {mask.shape[1]}: widen scored_steps "
                "(slice(None) scores every step)"
            )

    def metric(
        self, output: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """The task's accuracy-like metric on a batch, or None."""
        return None


@functools.lru_cache(maxsize=32)
def _steps_mask(
    batch_size: int, T: int, start: int, stop: int, stride: int, device: torch.device
) -> torch.Tensor:
    mask = torch.zeros(batch_size, T, dtype=torch.bool, device=device)
    mask[:, start:stop:stride] = True
    return mask


# ---------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Task]] = {}


def _where(cls: type) -> str:
    """Where a class is defined, as `file:line (module.Class)`; the real path, so a module
    reached through a symlinked folder is still recognised as the same definition."""
    try:
        line = inspect.getsourcelines(cls)[1]
        path = os.path.realpath(inspect.getsourcefile(cls) or "?")
        return f"{path}:{line} ({cls.__qualname__})"
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def register_task(name: str):
    """Class decorator: register a task under `name`. A name registered twice is an error."""

    def decorate(cls: type[Task]) -> type[Task]:
        previous = _REGISTRY.get(name)
        if previous is not None and _where(previous) != _where(cls):
            raise ConfigError(
                f"task name {name!r} is registered twice: "
                f"by {_where(previous)} and by {_where(cls)}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_tasks() -> dict[str, type[Task]]:
    """All tasks shipped with seqtest (importing every module of the package) plus any already
    registered from elsewhere."""
    package = importlib.import_module("seqtest.tasks")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"seqtest.tasks.{info.name}")
    return dict(sorted(_REGISTRY.items()))
