"""The training loop: one loop for every task and every model.

Each step: sample a batch -> forward -> task loss on the scored steps (the readout runs on the
task's `scored_steps` only) -> backward -> clip the global gradient norm -> optimiser step.
Every `eval_every` steps (and at step 0 and the last step) the model is evaluated on a fixed
validation set; the gradient probe, when given, runs at the evaluations it asks for. Per-step
quantities (loss, pre-clip norm, whether anything went non-finite) are accumulated on the
device and read only at evaluation, so the loop never waits for the device between
evaluations.

The loop stops early when the task is solved (`early_stop`), when the loss or the gradient
becomes non-finite (status "diverged"), or when `should_stop()` says so (status
"interrupted", after a checkpoint). Checkpoints hold the whole loop state, so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from seqtest.checkpoint import save_checkpoint
from seqtest.errors import require, require_choice, require_positive_int
from seqtest.tasks._base import Batch, Task

#: Every status a run can end with; all but "interrupted" mean the run is finished.
STATUSES = ("solved", "unsolved", "diverged", "interrupted")
CLIP_MODES = ("norm", "value", "none")


@dataclass
class TrainConfig:
    """What the `train:` block of the config holds."""

    steps: int = 3000
    batch_size: int = 64
    eval_every: int = 100
    clip: float = 1.0  # threshold: max global gradient norm (norm) or max |gradient| (value)
    clip_mode: str = "norm"  # norm | value | none
    early_stop: bool = True
    val_size: int = 1000
    val_seed: int = 1234
    progress: bool = True
    checkpoint_every: int = 0  # steps between checkpoints; 0: only when interrupted

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "val_size"):
            require_positive_int(f"train.{name}", getattr(self, name))
        require(
            isinstance(self.clip, int | float) and self.clip >= 0,
            "train.clip",
            self.clip,
            "a number >= 0 (0 disables clipping)",
        )
        require_choice("train.clip_mode", self.clip_mode, CLIP_MODES)
        require(
            isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
            "train.checkpoint_every",
            self.checkpoint_every,
            "an integer >= 0 (0: checkpoint only when interrupted)",
        )

    @property
    def clipping(self) -> bool:
        return self.clip_mode != "none" and self.clip > 0


@dataclass
class TrainResult:
    records: list[dict] = field(default_factory=list)
    steps: int = 0
    solved_at_step: int | None = None
    status: str = "unsolved"
    #: For a diverged run: the first step whose loss or gradient was non-finite, and which.
    nonfinite_step: int | None = None
    nonfinite: str | None = None


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
    return {
        "val_loss": loss_sum / weight_sum,
        "val_metric": metric_sum / count if has_metric else None,
    }


def clip_gradients(
    parameters: list[torch.Tensor], threshold: float, mode: str = "norm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients in place and return (the global norm before clipping, whether this
    step was clipped). `norm` rescales all gradients so their global norm is at most
    `threshold`; `value` clamps every entry to [-threshold, threshold]; `none` (or a
    threshold of 0) only measures."""
    grads = [p.grad for p in parameters if p.grad is not None]
    # the multi-tensor ops `clip_grad_norm_` uses: one kernel for all the tensors on a GPU,
    # where a loop launches one per tensor (on the CPU they run that loop themselves)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if mode == "none" or threshold <= 0:
        return norm, torch.zeros((), dtype=torch.bool, device=norm.device)
    if mode == "norm":  # the same scaling as torch.nn.utils.clip_grad_norm_
        scale = (threshold / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale)
        return norm, norm > threshold
    largest = torch.stack(torch._foreach_norm(grads, math.inf)).max()  # the largest |entry|
    for g in grads:
        g.clamp_(-threshold, threshold)
    return norm, largest > threshold


def train_step(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step: sample a batch, forward, task loss, backward, clip, optimiser step.
    Returns (the loss, the gradient norm before clipping, whether it was clipped), detached and
    on the device. The loop runs this; `seqtest.bench` times it."""
    x, y, mask = task.sample(config.batch_size, generator)
    steps = task.scored_steps  # the readout and the loss skip the steps no sample scores
    # a task that scores the same steps in every sequence hands out one shared mask, True on
    # exactly those steps: the loss is then the plain mean over the output
    shared = mask is task.scored_steps_mask(len(mask), mask.device)
    loss = task.loss(model(x, steps), y[:, steps], None if shared else mask[:, steps])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm, clipped = clip_gradients(parameters, config.clip, config.clip_mode)
    optimizer.step()
    return loss.detach(), norm.detach(), clipped


class _Accumulators:
    """Per-step sums kept on the device between evaluations."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.clipped = torch.zeros((), device=device)
        # first step with a non-finite loss / gradient norm (-1: none yet)
        self.bad_loss_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_grad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.count = 0

    def add(self, step: int, loss: torch.Tensor, norm: torch.Tensor, clipped: torch.Tensor) -> None:
        self.loss += loss
        self.norm += norm
        self.clipped += clipped.to(self.clipped.dtype)
        for first, value in ((self.bad_loss_step, loss), (self.bad_grad_step, norm)):
            first.copy_(torch.where((first < 0) & ~torch.isfinite(value), step, first))
        self.count += 1

    def nonfinite(self) -> tuple[int | None, str | None]:
        loss_step, grad_step = int(self.bad_loss_step), int(self.bad_grad_step)
        if loss_step < 0 and grad_step < 0:
            return None, None
        if loss_step >= 0 and (grad_step < 0 or loss_step <= grad_step):
            return loss_step, "loss"
        return grad_step, "gradient"

    def means(self, clipping: bool) -> tuple[float | None, float | None, float | None]:
        if self.count == 0:
            return None, None, None
        clipped = float(self.clipped) / self.count if clipping else None
        return float(self.loss) / self.count, float(self.norm) / self.count, clipped

    def reset(self) -> None:
        for total in (self.loss, self.norm, self.clipped):
            total.zero_()
        self.count = 0

    def state_dict(self) -> dict:
        names = ("loss", "norm", "clipped", "bad_loss_step", "bad_grad_step")
        return {name: getattr(self, name).cpu() for name in names} | {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if name == "count":
                self.count = value
            else:
                getattr(self, name).copy_(value)


def train(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    *,
    data_generator: torch.Generator,
    val_batch: Batch,
    on_eval: Callable[[dict], None] | None = None,
    probe: Callable[[int], dict] | None = None,
    probe_every: int = 0,
    checkpoint_path: Path | None = None,
    resume_from: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `model` on `task` for `config.steps` steps (fewer if solved, diverged or stopped).

    `probe(step)` runs at step 0, at every evaluation whose step is a multiple of
    `probe_every`, and at the last evaluation; its fields join that evaluation's record.
    `resume_from` is a checkpoint's content (see `seqtest.checkpoint`).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    device = val_batch.x.device
    result = TrainResult()
    sums = _Accumulators(device)
    elapsed_before = 0.0
    first_step = 1
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        data_generator.set_state(resume_from["data_generator"])
        loop = resume_from["loop"]
        result.records = list(loop["records"])
        result.solved_at_step = loop["solved_at_step"]
        result.steps = resume_from["step"]
        sums.load_state_dict(loop["sums"])
        elapsed_before = loop["elapsed_s"]
        first_step = resume_from["step"] + 1
    start = time.perf_counter() - elapsed_before

    def checkpoint(step: int) -> None:
        if checkpoint_path is None:
            return
        loop = {
            "records": result.records,
            "solved_at_step": result.solved_at_step,
            "sums": sums.state_dict(),
            "elapsed_s": time.perf_counter() - start,
        }
        save_checkpoint(
            checkpoint_path,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "data_generator": data_generator.get_state(),
                "loop": loop,
            },
        )

    def log(step: int, last: bool = False, may_probe: bool = True) -> dict:
        """Evaluate, probe when due, record. The probe also runs at the run's last evaluation,
        which is the one where the task is first solved when training stops early."""
        train_loss, grad_norm, clipped = sums.means(config.clipping)
        record = {"step": step, "train_loss": train_loss, **evaluate(model, task, val_batch)}
        record |= {"grad_norm": grad_norm, "clip_fraction": clipped}
        if (
            result.solved_at_step is None
            and math.isfinite(record["val_loss"])
            and task.solved(record)
        ):
            result.solved_at_step = step
        stops_here = last or (config.early_stop and result.solved_at_step is not None)
        due = step == 0 or stops_here or (probe_every and step % probe_every == 0)
        if probe is not None and may_probe and due:
            record |= probe(step)
        record["elapsed_s"] = time.perf_counter() - start
        result.records.append(record)
        if on_eval is not None:
            on_eval(record)
        sums.reset()
        return record

    if resume_from is None:
        log(0)
    bar = tqdm(
        total=config.steps, initial=first_step - 1, disable=not config.progress or None,
        leave=False, desc="train",
    )  # fmt: skip
    model.train()
    for step in range(first_step, config.steps + 1):
        loss, norm, clipped = train_step(model, task, optimizer, parameters, config, data_generator)
        sums.add(step, loss, norm, clipped)
        result.steps = step
        bar.update()

        last = step == config.steps
        evaluate_now = step % config.eval_every == 0 or last
        checkpoint_now = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        stop_now = should_stop is not None and should_stop()
        if not (evaluate_now or checkpoint_now or stop_now):
            continue
        bad_step, what = sums.nonfinite()
        if bad_step is not None:
            result.status, result.nonfinite_step, result.nonfinite = "diverged", bad_step, what
            log(step, may_probe=False)
            break
        if evaluate_now:
            record = log(step, last=last)
            bar.set_postfix(
                loss=f"{record['train_loss']:.4g}",
                val_over_baseline=f"{record['val_loss'] / task.baseline_loss:.3g}",
            )
            if config.early_stop and result.solved_at_step is not None:
                break
        if stop_now and not last:
            checkpoint(step)
            result.status = "interrupted"
            break
        if checkpoint_now and not last:
            checkpoint(step)
    bar.close()
    if result.status not in ("diverged", "interrupted"):
        result.status = "solved" if result.solved_at_step is not None else "unsolved"
    return result
