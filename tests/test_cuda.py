"""On a CUDA device: every model's training path computes what autograd through the CPU twin
computes, the training step never waits for the device, and a run trains and probes end to
end. Skipped where no GPU is available (CI has none); run them on a machine that has one:
``pytest tests/test_cuda.py``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from seqtest.gradients import probe
from seqtest.models import build_model
from seqtest.results import read_metrics, read_summary
from seqtest.run import Setup
from seqtest.tasks._base import Batch
from seqtest.tasks.adding import AddingTask
from seqtest.train import _Accumulators, clip_gradients, train_step
from tests.conftest import TINY, gradients, run_seqtest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Every cell and knob that chooses its own path (`RecurrentLayer.path`): the fused kernels
#: (cuDNN on a GPU), the hand-written BPTT, the step-by-step loop, and the feedforward MLP.
MODELS = {
    "rnn": dict(cell="rnn"),
    "rnn_relu": dict(cell="rnn", activation="relu"),
    "rnn_sigmoid": dict(cell="rnn", activation="sigmoid"),
    "rnn_layer_norm": dict(cell="rnn", norm="layer"),
    "rnn_batch_norm": dict(cell="rnn", norm="batch"),
    "lstm": dict(cell="lstm"),
    "gru": dict(cell="gru"),
    "ln_lstm": dict(cell="lstm", norm="layer"),
    "bn_lstm": dict(cell="lstm", norm="batch", bn_max_steps=4),
    "mlp": dict(cell="mlp", activation="relu"),
}
#: The path each takes on a GPU (`RecurrentLayer.path`; the MLP has none).
GPU_PATHS = {
    "rnn": "fused", "rnn_relu": "fused", "rnn_sigmoid": "tanh_kernel", "rnn_layer_norm": "loop",
    "rnn_batch_norm": "loop", "lstm": "fused", "gru": "fused", "ln_lstm": "bptt",
    "bn_lstm": "bptt", "mlp": None,
}  # fmt: skip
#: The synthetic tasks (the image tasks read data sets and are left out).
TASKS = [
    "adding", "copying", "associative_recall", "delayed_xor", "multiplication",
    "noiseless_memorisation", "random_permutation", "selective_copy", "temporal_order",
]  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_every_training_path_on_cuda_matches_autograd_through_the_cpu_twin(name):
    """In float64, a two-layer model training on the GPU (whatever path it takes there)
    against autograd through its step-by-step twin on the CPU: outputs, the gradients of
    the input and of every parameter (each nonzero), and the buffers after the pass."""
    torch.manual_seed(0)
    T = 10
    model = build_model(dict(hidden_size=6, num_layers=2, **MODELS[name]), 3, 2, T).double()
    twin = copy.deepcopy(model)
    on_gpu = model.cuda()
    x = torch.randn(5, T, 3, dtype=torch.float64)
    weights = torch.randn(5, T, 2, dtype=torch.float64)
    paths = {layer.path(x.cuda()) for layer in getattr(on_gpu, "layers", [])}
    assert paths == ({GPU_PATHS[name]} if GPU_PATHS[name] else set())
    out, grads = gradients(on_gpu, x.cuda(), weights.cuda())
    out_twin, grads_twin = gradients(twin, x, weights, unrolled=True)
    assert out.is_cuda
    assert torch.allclose(out.cpu(), out_twin, rtol=1e-9, atol=1e-12)
    names = ["x"] + [n for n, _ in twin.named_parameters()]
    for n, a, b in zip(names, grads, grads_twin, strict=True):
        assert b.abs().max() > 0, n
        assert torch.allclose(a.cpu(), b, rtol=1e-9, atol=1e-12), n
    for (n, a), b in zip(on_gpu.named_buffers(), twin.buffers(), strict=True):
        assert torch.allclose(a.cpu(), b, atol=1e-12), n


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_on_cuda_matches_pytorch(mode):
    """`clip_gradients` (multi-tensor kernels on a GPU) against PyTorch's own clipping of
    the same gradients, large enough to be clipped: the norm, the flag and the gradients."""
    torch.manual_seed(0)
    grads = [torch.randn(*shape, device="cuda") for shape in ((8, 3), (8,), (2, 8), (2,))]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    norm, clipped = clip_gradients(ours, 0.5, mode)
    if mode == "norm":
        expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        assert torch.allclose(norm, expected, rtol=1e-6)
    else:
        torch.nn.utils.clip_grad_value_(theirs, 0.5)
    assert bool(clipped)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)


def _setup(make_cfg, *overrides: str) -> Setup:
    return Setup(make_cfg("device=cuda", *TINY, *overrides))


def _steps_never_wait(setup: Setup, steps: int = 3) -> None:
    """Run two warm-up steps (cuDNN plans, the optimiser's state), then `steps` more as the
    loop does, with every host-device synchronisation an error."""
    config, sums = setup.train_config, _Accumulators(setup.device)
    parameters = [p for p in setup.model.parameters() if p.requires_grad]
    setup.model.train()

    def step(number: int) -> None:
        loss, norm, clipped = train_step(
            setup.model, setup.task, setup.optimizer, parameters, config, setup.data_generator
        )
        sums.add(number, loss, norm, clipped)

    for number in (1, 2):
        step(number)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for number in range(3, 3 + steps):
            step(number)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(sums.loss)


@pytest.mark.parametrize("model", ["rnn", "lstm", "gru", "rnn_relu", "ln_lstm", "bn_lstm", "mlp"])
def test_the_training_step_never_waits_for_the_device(model, make_cfg):
    """No `.item()`, no copy to the host, no data-dependent shape in a step: the loop queues
    steps ahead of the GPU and reads its sums only at evaluations. The clip modes cover
    both branches of `clip_gradients`."""
    for clip_mode in ("norm", "value"):
        _steps_never_wait(
            _setup(
                make_cfg,
                f"model={model}",
                "task=adding",
                "task.length=20",
                f"train.clip_mode={clip_mode}",
            )  # fmt: skip
        )


@pytest.mark.parametrize("task", TASKS)
def test_no_task_makes_the_training_step_wait_for_the_device(task, make_cfg):
    """Every synthetic task samples its batches on the device without a synchronisation."""
    _steps_never_wait(_setup(make_cfg, "model=lstm", f"task={task}"))


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "bn_lstm"])
def test_the_gradient_probe_on_cuda_matches_the_cpu(name):
    """One probe (`seqtest.gradients.probe`, float64) of the same model and batch on the GPU
    and on the CPU: ||dL/dh_t|| of every layer and step, the input gradients, the Jacobian
    spectra, the saturation and the Lyapunov exponents (by autograd for the batch-norm
    LSTM) agree."""
    torch.manual_seed(0)
    task = AddingTask(length=12)
    config = dict(hidden_size=8, num_layers=2, **MODELS[name])
    model = build_model(config, task.input_size, task.output_size, task.seq_len).double()
    batch = task.sample(16, torch.Generator().manual_seed(1))
    on_cpu = probe(model, task, batch, dtype=torch.float64)
    on_gpu_batch = Batch(*(t.cuda() for t in batch))
    on_gpu = probe(copy.deepcopy(model).cuda(), task, on_gpu_batch, dtype=torch.float64)
    for key in (
        "h_grad",
        "x_grad",
        "spectral_radius",
        "max_singular",
        "saturation",
        "lyapunov",
        "loss",
    ):
        a, b = np.asarray(on_gpu[key], dtype=float), np.asarray(on_cpu[key], dtype=float)
        assert np.all(np.isfinite(b)), key
        assert key == "saturation" or np.abs(b).max() > 0, key  # (no unit may saturate)
        assert np.allclose(a, b, rtol=1e-7, atol=1e-12), key


@pytest.mark.parametrize("model", ["lstm", "bn_lstm"])
def test_a_run_on_cuda_trains_probes_and_records_its_device(model, tmp_path):
    """`seqtest device=cuda` end to end: the summary names the device, and the gradient
    probes are recorded at steps 0, 20 and 40 for every layer and time step."""
    done = run_seqtest(
        f"model={model}", "task=adding", "task.length=30", "device=cuda", "train.steps=40",
        "train.eval_every=20", "analysis.every=20", *TINY,
        f"hydra.run.dir={tmp_path}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["device"] == "cuda"
    assert summary["status"] in ("solved", "unsolved")
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 20, 40]
    probes = np.load(tmp_path / "gradients.npz")
    assert probes["steps"].tolist() == [0, 20, 40]
    h_grad = probes["h_grad"]
    assert h_grad.shape[::2] == (3, 30) and np.all(np.isfinite(h_grad)) and h_grad.max() > 0
