"""Every config in conf/ composes, and what it describes can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seqtest.errors import ConfigError
from seqtest.models import ModelConfig, build_model
from seqtest.run import build_task
from seqtest.tasks._base import registered_tasks
from seqtest.train import TrainConfig
from tests.conftest import TINY

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_are_not_empty():
    assert {"adding", "copying"} <= set(options("task"))
    assert {"rnn", "lstm", "gru"} <= set(options("model"))
    assert {"adam", "rmsprop", "sgd"} <= set(options("optim"))


@pytest.mark.parametrize("task", options("task"))
def test_every_task_config_instantiates(make_cfg, task, monkeypatch):
    monkeypatch.delenv("SEQTEST_MNIST_DIR", raising=False)
    cfg = make_cfg(f"task={task}")
    if "mnist" in task:  # needs the user's data files: without them, a clear error
        with pytest.raises(ConfigError, match="task.data_dir"):
            build_task(cfg)
        return
    built = build_task(cfg)
    assert built.name in registered_tasks()  # a file is a task or a preset of one
    assert built.baseline_loss > 0


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds(make_cfg, model):
    cfg = make_cfg(f"model={model}")
    config = ModelConfig(**OmegaConf.to_container(cfg.model))
    assert config.name == model
    build_model(config, 2, 1, seq_len=5)


@pytest.mark.parametrize("optim", options("optim"))
def test_every_optimiser_config_instantiates(make_cfg, optim):
    cfg = make_cfg(f"optim={optim}")
    instantiate(cfg.optim)(build_model(ModelConfig(hidden_size=4), 2, 1).parameters())


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_fused_optimisers_take_the_steps_of_pytorchs_per_tensor_loop(make_cfg, optim):
    """adam and sgd run PyTorch's fused kernel (one kernel for all parameters: the speed the
    benchmark's `optimizer` records show) and take the same steps as with `optim.fused=false`:
    20 steps on the same gradients end within float64 rounding."""
    runs = []
    for overrides in ([f"optim={optim}"], [f"optim={optim}", "optim.fused=false"]):
        torch.manual_seed(0)
        model = build_model(ModelConfig(hidden_size=4), 2, 1).double()
        runs.append((model, instantiate(make_cfg(*overrides).optim)(model.parameters())))
    (fused, fused_optimizer), (loop, loop_optimizer) = runs
    assert fused_optimizer.defaults["fused"] and not loop_optimizer.defaults["fused"]
    start = [p.detach().clone() for p in fused.parameters()]
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in start]
        for model, optimizer in runs:
            for parameter, grad in zip(model.parameters(), grads, strict=True):
                parameter.grad = grad.clone()
            optimizer.step()
    for a, b, before in zip(fused.parameters(), loop.parameters(), start, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert (a - before).norm() > 1e-5  # the steps moved every tensor


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}")
    TrainConfig(**OmegaConf.to_container(cfg.train))
    build_task(cfg)


def test_public_override_keys_exist(make_cfg):
    cfg = make_cfg(
        "task=copying", "task.length=7", "model=gru", "model.hidden_size=5", "model.num_layers=2",
        "optim=sgd", "optim.lr=0.5", "train.steps=3", "train.batch_size=2", "train.eval_every=1",
        "train.clip=0", "train.early_stop=false", "seed=4", "device=cpu",
    )  # fmt: skip
    assert (cfg.task.length, cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers) == (
        7, "gru", 5, 2,
    )  # fmt: skip
    assert (cfg.optim.lr, cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (
        0.5, 3, 2, 1,
    )  # fmt: skip
    assert (cfg.train.clip, cfg.train.early_stop, cfg.seed, cfg.device) == (0, False, 4, "cpu")


def test_tf32_rounding_is_off_unless_a_run_asks_for_it(make_cfg):
    """A run turns TF32 off in cuDNN and in float32 matrix products, whatever it was before
    (PyTorch's default lets cuDNN use it), and on with ``tf32=true``."""
    from seqtest.run import Setup, configure_torch

    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        Setup(make_cfg(*TINY))
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        Setup(make_cfg(*TINY, "tf32=true"))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        configure_torch(torch.get_num_threads())
