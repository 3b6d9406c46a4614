"""Shared fixtures: compose configs from the packaged `seqtest.conf` without running Hydra's app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# Tests are tiny and run side by side with other processes on small machines.
torch.set_num_threads(1)


@pytest.fixture
def restore_threads():
    """For tests that change torch's thread count: the count set above, back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg():
    """Compose the app's config with overrides, as the command line would."""

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_module(config_module="seqtest.conf", version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _make


def gradients(model, x, weights, unrolled=False):
    """Output and gradients of sum(output * weights) w.r.t. x and every parameter, through
    the model's training path or (`unrolled`) through its step-by-step twin."""
    x = x.detach().clone().requires_grad_()
    out = model.forward_unrolled(x)[0] if unrolled else model(x)
    return out, torch.autograd.grad((out * weights).sum(), [x, *model.parameters()])


TINY = ("model.hidden_size=8", "train.batch_size=8", "train.val_size=32", "train.progress=false")


def run_seqtest(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m seqtest ARGS` in `cwd`, as a user would run it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "seqtest", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
