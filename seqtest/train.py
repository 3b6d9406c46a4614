"""The training loop: one loop for every task and every model.

Each step: sample a batch -> forward -> task loss on the scored steps -> backward -> clip the
global gradient norm -> optimiser step. Every `eval_every` steps (and at step 0 and the last
step) the model is evaluated on a fixed validation set. Per-step quantities are accumulated
on the device and read only at evaluation, so the loop never waits for the device between
evaluations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from seqtest.errors import require, require_positive_int
from seqtest.tasks._base import Batch, Task


@dataclass
class TrainConfig:
    """What the `train:` block of the config holds."""

    steps: int = 3000
    batch_size: int = 64
    eval_every: int = 100
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    early_stop: bool = True
    val_size: int = 1000
    val_seed: int = 1234
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "val_size"):
            require_positive_int(f"train.{name}", getattr(self, name))
        require(self.clip >= 0, "train.clip", self.clip, "a number >= 0 (0 disables clipping)")


@dataclass
class TrainResult:
    records: list[dict] = field(default_factory=list)
    steps: int = 0
    solved_at_step: int | None = None


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch: Batch, chunk: int = 500) -> dict:
    """Validation loss (and the task's metric) over a fixed batch, in chunks to bound memory."""
    was_training = model.training
    model.eval()
    loss_sum, metric_sum, weight_sum, count = 0.0, 0.0, 0.0, 0
    for start in range(0, batch.x.shape[0], chunk):
        x, y, mask = (t[start : start + chunk] for t in batch)
        output = model(x)
        weight = float(mask.sum())
        loss_sum += float(task.loss(output, y, mask)) * weight
        weight_sum += weight
        metric = task.metric(output, y, mask)
        if metric is not None:
            metric_sum += float(metric) * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    has_metric = task.metric_name is not None
    return {"val_loss": loss_sum / weight_sum, "val_metric": metric_sum / count if has_metric else None}


def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Return the global gradient norm before clipping; scale gradients down to `max_norm`
    when it is exceeded (max_norm = 0: measure only)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def train(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    *,
    data_generator: torch.Generator,
    val_batch: Batch,
    on_eval: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `model` on `task` for `config.steps` steps (fewer if solved and early_stop)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    device = val_batch.x.device
    result = TrainResult()
    start = time.perf_counter()

    def log(step: int, train_loss, grad_norm, clipped) -> dict:
        record = {"step": step, "train_loss": train_loss, **evaluate(model, task, val_batch)}
        record |= {"grad_norm": grad_norm, "clip_fraction": clipped}
        record["elapsed_s"] = time.perf_counter() - start
        result.records.append(record)
        if result.solved_at_step is None and math.isfinite(record["val_loss"]) and task.solved(record):
            result.solved_at_step = step
        if on_eval is not None:
            on_eval(record)
        return record

    log(0, None, None, None)
    bar = tqdm(total=config.steps, disable=not config.progress or None, leave=False, desc="train")
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    clipped_sum = torch.zeros((), device=device)
    since_eval = 0
    model.train()
    for step in range(1, config.steps + 1):
        x, y, mask = task.sample(config.batch_size, data_generator)
        loss = task.loss(model(x), y, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(parameters, config.clip)
        optimizer.step()

        loss_sum += loss.detach()
        norm_sum += norm
        if config.clip > 0:
            clipped_sum += (norm > config.clip).to(clipped_sum.dtype)
        since_eval += 1
        result.steps = step
        bar.update()
        if step % config.eval_every == 0 or step == config.steps:
            record = log(
                step,
                float(loss_sum) / since_eval,
                float(norm_sum) / since_eval,
                float(clipped_sum) / since_eval if config.clip > 0 else None,
            )
            bar.set_postfix(
                loss=f"{record['train_loss']:.4g}",
                val_over_baseline=f"{record['val_loss'] / task.baseline_loss:.3g}",
            )
            loss_sum.zero_(), norm_sum.zero_(), clipped_sum.zero_()
            since_eval = 0
            if config.early_stop and result.solved_at_step is not None:
                break
    bar.close()
    return result
