"""`run(cfg)`: build the task, the model and the optimiser from a composed config, train, and
write the run folder. A plain function: Hydra's entry point (`seqtest.cli`) is a thin wrapper.

Run folder (besides Hydra's `.hydra/`):

* ``metrics.jsonl``: one record per evaluation (see `seqtest.train`), gradient-probe fields
  (``grad_decay_rate``, ``grad_half_life``, ``top_lyapunov``, ...) at the evaluations probed.
* ``summary.json``: the run's outcome (see `summarise`), with ``gradients.init`` / ``.final``.
* ``gradients.npz``: every gradient probe (see `seqtest.gradients`), and its figures.
* ``model.pt``: the final parameters (a state dict), for `mode=analyze`.
* ``checkpoint.pt``: while a run is unfinished (interrupted, or checkpointing on a cadence).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seqtest.allocator import keep_freed_memory, use_huge_pages
from seqtest.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_weights, save_atomic
from seqtest.errors import ConfigError, require, require_choice
from seqtest.gradients import GRADIENTS_FILE, AnalysisConfig, GradientTracker
from seqtest.models import ModelConfig, build_model, count_parameters
from seqtest.results import (
    METRICS_FILE,
    SUMMARY_FILE,
    exclusive_folder,
    read_summary,
    write_json,
    write_jsonl,
)
from seqtest.tasks._base import Task
from seqtest.train import STATUSES, TrainConfig, TrainResult, train

DEVICES = ("auto", "cpu", "cuda")
MODEL_FILE = "model.pt"
FINISHED = tuple(status for status in STATUSES if status != "interrupted")


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


def configure_torch(threads: int | None, tf32: bool = False) -> None:
    # Large buffers freed at the end of a step stay in the heap for the next one instead of
    # being unmapped and faulted in again (seqtest.allocator; SEQTEST_MALLOC=default opts out).
    keep_freed_memory()
    # (effective only if no tensor exists yet; the commands set it when they start)
    use_huge_pages()
    # Vanishing gradients are tiny numbers; subnormal floats make CPU steps many times slower.
    # Flushing them to zero hides nothing the analysis reports: it flags every step whose
    # gradient norm is below the smallest normal float as underflow, flushed or not.
    torch.set_flush_denormal(True)
    # cuDNN's RNN kernels round float32 products to TF32 by default (on Ampere and newer):
    # measured on an H200, 3e-4 relative error in the outputs and gradients of nn.LSTM,
    # nn.GRU and nn.RNN against float64, 1e-5 to 2e-7 without, at -11% to +17% of the time
    # (docs/performance.md). The CPU and the probes never round so; `tf32=true` opts in.
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if threads:
        torch.set_num_threads(int(threads))


def _container(node: DictConfig | None) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


class Setup:
    """Everything a run is made of, validated and built before any file is written."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.train_config = TrainConfig(**_container(cfg.train))
        self.model_config = ModelConfig(**_container(cfg.model))
        self.analysis_config = AnalysisConfig(**_container(cfg.get("analysis")))
        self.task = build_task(cfg)
        every, eval_every = self.analysis_config.every, self.train_config.eval_every
        require(
            every % eval_every == 0,
            "analysis.every",
            every,
            f"a multiple of train.eval_every ({eval_every}): probes run at evaluations",
        )
        lr = cfg.optim.get("lr")
        require(isinstance(lr, int | float) and lr > 0, "optim.lr", lr, "a positive number")
        tf32 = cfg.get("tf32", False)
        require(isinstance(tf32, bool), "tf32", tf32, "true or false")
        configure_torch(cfg.get("threads"), tf32)

        torch.manual_seed(derived_seed(cfg.seed, "init"))
        if self.model_config.cell == "mlp":
            check_last_step_task(self.task)
        task = self.task
        self.model = build_model(
            self.model_config, task.input_size, task.output_size, task.seq_len
        ).to(self.device)
        self.optimizer = instantiate_checked(cfg.optim)(self.model.parameters())
        # validation set and gradient-probe batch: fixed, from their own generator
        val_generator = torch.Generator(self.device).manual_seed(self.train_config.val_seed)
        self.val_batch = self.task.validation_batch(self.train_config.val_size, val_generator)
        self.task.check_scored_steps(self.val_batch.mask)
        self.probe_batch = self.task.validation_batch(
            self.analysis_config.batch_size, val_generator
        )
        self.data_generator = torch.Generator(self.device).manual_seed(
            derived_seed(cfg.seed, "data")
        )


def check_last_step_task(task: Task) -> None:
    """The feedforward baseline answers once, at the last step: the task must score nothing
    else."""
    mask = task.sample(8, torch.Generator().manual_seed(0)).mask
    require(
        not bool(mask[:, :-1].any()),
        "model",
        "mlp",
        f"a task scored at the last step only (task {task.name!r} scores "
        f"{int(mask.any(0).sum())} of its {mask.shape[1]} steps); use rnn, lstm or gru",
    )


def task_parameters(task: Task) -> dict:
    """The task's dataclass fields that JSON can hold (so variants of one task stay apart)."""
    simple = (str, int, float, bool, type(None))
    values = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    return {name: value for name, value in values.items() if isinstance(value, simple)}


def summarise(setup: Setup, result: TrainResult, wall_time: float) -> dict:
    cfg, task = setup.cfg, setup.task
    records = result.records
    final = records[-1]
    finite_losses = [r["val_loss"] for r in records if np.isfinite(r["val_loss"])]
    return {
        "task": task.name,
        "task_params": task_parameters(task),
        "model": cfg.model.get("name") or cfg.model.cell,
        "length": getattr(task, "length", task.seq_len),
        "seed": cfg.seed,
        "status": result.status,
        "steps": result.steps,
        "best_val_loss": min(finite_losses) if finite_losses else None,
        "final_val_loss": final["val_loss"],
        "final_val_metric": final["val_metric"],
        "metric_name": task.metric_name,
        "baseline_loss": task.baseline_loss,
        "loss_ratio": final["val_loss"] / task.baseline_loss,
        "solved_at_step": result.solved_at_step,
        "diverged_at_step": result.nonfinite_step,
        "nonfinite": result.nonfinite,
        "num_params": count_parameters(setup.model),
        "wall_time_s": wall_time,
        "steps_per_s": result.steps / wall_time if wall_time > 0 else None,
        "seq_len": task.seq_len,
        "cell": cfg.model.cell,
        "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers,
        "device": str(setup.device),  # where it trained: "cpu" or "cuda"
    }


@contextmanager
def stop_requests():
    """While active, SIGINT and SIGTERM (what SLURM sends before it kills a job) only set a
    flag; the loop finishes its step, checkpoints and stops. Yields a dict holding the signal."""
    received: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def run(cfg: DictConfig, out_dir: str | Path = ".") -> dict:
    """Train one configuration and write the run folder `out_dir`.

    Everything is validated before the first file is written, so bad input leaves no results.
    With ``resume=true``, a folder whose summary says the run finished is left as it is (its
    summary is returned), and an unfinished one continues from its checkpoint.
    Returns the summary.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    setup = Setup(cfg)
    with exclusive_folder(out_dir):
        return _train_and_write(cfg, setup, out_dir, started)


def _train_and_write(cfg: DictConfig, setup: Setup, out_dir: Path, started: float) -> dict:
    """`run` after validation, with the run folder held."""
    checkpoint_path = out_dir / CHECKPOINT_FILE
    resume_from = None
    if cfg.get("resume"):
        try:
            previous = read_summary(out_dir)
        except (FileNotFoundError, ValueError):
            previous = None
        if previous is not None and previous.get("status") in FINISHED:
            return previous
        if checkpoint_path.exists():
            resume_from = load_checkpoint(checkpoint_path)
            started -= resume_from["loop"]["elapsed_s"]

    tracker = GradientTracker(setup.model, setup.task, setup.probe_batch, setup.analysis_config)
    if resume_from is not None and (out_dir / GRADIENTS_FILE).exists():
        tracker.load(out_dir / GRADIENTS_FILE, upto_step=resume_from["step"])
    records = list(resume_from["loop"]["records"]) if resume_from else []

    def on_eval(record: dict) -> None:
        records.append(record)
        write_jsonl(out_dir / METRICS_FILE, records)

    def probe(step: int) -> dict:
        tracker.record(step)
        tracker.save(out_dir / GRADIENTS_FILE)
        return tracker.metrics_record()

    with stop_requests() as stop:
        result = train(
            setup.model,
            setup.task,
            setup.optimizer,
            setup.train_config,
            data_generator=setup.data_generator,
            val_batch=setup.val_batch,
            on_eval=on_eval,
            probe=probe if setup.analysis_config.enabled else None,
            probe_every=setup.analysis_config.every,
            checkpoint_path=checkpoint_path,
            resume_from=resume_from,
            should_stop=lambda: stop["signal"] is not None,
        )
    summary = summarise(setup, result, time.perf_counter() - started)
    if setup.analysis_config.enabled:
        summary["gradients"] = tracker.summary()
    if result.status == "interrupted":
        received = stop["signal"]
        summary["interrupted_by"] = signal.Signals(received).name if received else None
    else:
        save_atomic(out_dir / MODEL_FILE, setup.model.state_dict())
        checkpoint_path.unlink(missing_ok=True)
        if setup.analysis_config.enabled and setup.analysis_config.plots and tracker.probes:
            from seqtest.plots import plot_gradients

            plot_gradients(out_dir / GRADIENTS_FILE, out_dir)
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def analyze(cfg: DictConfig, out_dir: str | Path = ".") -> dict:
    """Probe a model's gradients without training (``seqtest mode=analyze``).

    With ``from_run=RUN_DIR`` the task and model come from that run's recorded config and
    the parameters from its ``model.pt`` (or, for an unfinished run, its checkpoint);
    otherwise the model is freshly initialised from ``seed``. Writes ``gradients.npz``, the
    figures and ``analysis.json`` (the probe's digest) to `out_dir`, and returns the digest.
    """
    out_dir = Path(out_dir)
    source = cfg.get("from_run")
    if source:
        source = Path(source)
        recorded = source / ".hydra" / "config.yaml"
        require(recorded.exists(), "from_run", str(source), "a run folder with .hydra/config.yaml")
        previous = OmegaConf.load(recorded)
        cfg = cfg.copy()
        cfg.task, cfg.model = previous.task, previous.model
    setup = Setup(cfg)
    if source:
        weights = source / MODEL_FILE
        if weights.exists():
            state = load_weights(weights)
        else:
            state = load_checkpoint(source / CHECKPOINT_FILE)["model"]
        setup.model.load_state_dict(state)
    tracker = GradientTracker(setup.model, setup.task, setup.probe_batch, setup.analysis_config)
    tracker.record(0)
    tracker.save(out_dir / GRADIENTS_FILE)
    digest = {
        "task": setup.task.name,
        "model": cfg.model.get("name") or cfg.model.cell,
        "length": getattr(setup.task, "length", setup.task.seq_len),
        "from_run": str(source) if source else None,
        **tracker.metrics_record(),
    }
    if setup.analysis_config.plots:
        from seqtest.plots import plot_gradients

        plot_gradients(out_dir / GRADIENTS_FILE, out_dir)
    write_json(out_dir / "analysis.json", digest)
    return digest
