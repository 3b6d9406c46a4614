"""`run(cfg)`: build the task, the model and the optimiser from a composed config, train, and
write the run folder. A plain function: Hydra's entry point (`seqtest.cli`) is a thin wrapper.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seqtest.errors import ConfigError, require_choice
from seqtest.models import ModelConfig, build_model, count_parameters
from seqtest.results import METRICS_FILE, SUMMARY_FILE, write_json, write_jsonl
from seqtest.tasks._base import Task
from seqtest.train import TrainConfig, train

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    require_choice("device", name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid: no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed per purpose (init, training data), derived from the run's seed."""
    key = {"init": 0, "data": 1}[purpose]
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def instantiate_checked(node: DictConfig, **kwargs):
    """`hydra.utils.instantiate`, re-raising our ConfigError as itself instead of wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def build_task(cfg: DictConfig) -> Task:
    return instantiate_checked(cfg.task)


def configure_torch(threads: int | None) -> None:
    # Vanishing gradients are tiny numbers; subnormal floats make CPU steps many times slower.
    # Flushing them to zero changes nothing the analysis reports: it measures underflow itself.
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(int(threads))


def summarise(cfg: DictConfig, task: Task, model, result, wall_time: float) -> dict:
    records = result.records
    final = records[-1]
    val_losses = [r["val_loss"] for r in records]
    return {
        "task": task.name,
        "model": cfg.model.get("name") or cfg.model.cell,
        "length": getattr(task, "length", task.seq_len),
        "seed": cfg.seed,
        "status": "solved" if result.solved_at_step is not None else "unsolved",
        "steps": result.steps,
        "best_val_loss": min(val_losses),
        "final_val_loss": final["val_loss"],
        "final_val_metric": final["val_metric"],
        "metric_name": task.metric_name,
        "baseline_loss": task.baseline_loss,
        "loss_ratio": final["val_loss"] / task.baseline_loss,
        "solved_at_step": result.solved_at_step,
        "num_params": count_parameters(model),
        "wall_time_s": wall_time,
        "steps_per_s": result.steps / wall_time if wall_time > 0 else None,
        "seq_len": task.seq_len,
        "cell": cfg.model.cell,
        "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers,
    }


def run(cfg: DictConfig, out_dir: str | Path = ".") -> dict:
    """Train one configuration and write `metrics.jsonl` and `summary.json` to `out_dir`.

    Everything is validated before the first file is written, so bad input leaves no results.
    Returns the summary.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    train_config = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    model_config = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    task = build_task(cfg)
    configure_torch(cfg.get("threads"))

    torch.manual_seed(derived_seed(cfg.seed, "init"))
    model = build_model(model_config, task.input_size, task.output_size).to(device)
    optimizer = instantiate_checked(cfg.optim)(model.parameters())
    val_batch = task.sample(
        train_config.val_size, torch.Generator(device).manual_seed(train_config.val_seed)
    )
    data_generator = torch.Generator(device).manual_seed(derived_seed(cfg.seed, "data"))

    records: list[dict] = []

    def on_eval(record: dict) -> None:
        records.append(record)
        write_jsonl(out_dir / METRICS_FILE, records)

    result = train(
        model,
        task,
        optimizer,
        train_config,
        data_generator=data_generator,
        val_batch=val_batch,
        on_eval=on_eval,
    )
    summary = summarise(cfg, task, model, result, time.perf_counter() - started)
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary
