"""The training loop and `run(cfg)`: clipping order, metrics, early stop, results, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from seqtest.errors import ConfigError
from seqtest.models import build_model
from seqtest.results import read_metrics, read_summary
from seqtest.run import run
from seqtest.tasks._base import Batch
from seqtest.tasks.adding import AddingTask
from seqtest.tasks.copying import CopyingTask
from seqtest.train import TrainConfig, train, train_step
from tests.conftest import TINY


def test_clipping_happens_after_backward_and_before_step():
    torch.manual_seed(0)
    task = AddingTask(length=6)
    model = build_model(dict(cell="rnn", hidden_size=8), task.input_size, task.output_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e3)  # huge gradients are clipped
    seen = []
    real_step = optimizer.step

    def checking_step(*args, **kwargs):
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads), "step ran before backward"
        seen.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
        return real_step(*args, **kwargs)

    optimizer.step = checking_step
    g = torch.Generator().manual_seed(0)
    config = TrainConfig(steps=5, batch_size=4, eval_every=5, clip=1e-3, progress=False)
    result = train(model, task, optimizer, config, data_generator=g, val_batch=task.sample(8, g))
    assert len(seen) == 5
    assert max(seen) <= 1e-3 * (1 + 1e-5)  # every step saw the clipped gradient
    assert result.records[-1]["grad_norm"] > 1e-3  # the logged norm is the pre-clip one
    assert result.records[-1]["clip_fraction"] == 1.0


def test_run_writes_metrics_and_summary(make_cfg, tmp_path):
    cfg = make_cfg("task.length=8", "train.steps=30", "train.eval_every=10", *TINY)
    summary = run(cfg, tmp_path)
    assert read_summary(tmp_path) == json.loads(json.dumps(summary))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 10, 20, 30]
    fields = {"step", "train_loss", "val_loss", "val_metric", "grad_norm", "elapsed_s"}
    assert fields <= set(records[-1])
    for key in ["task", "model", "length", "seed", "status", "steps", "best_val_loss",
                "final_val_loss", "baseline_loss", "loss_ratio", "solved_at_step",
                "num_params", "wall_time_s", "steps_per_s"]:  # fmt: skip
        assert key in summary, key
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in records)
    assert summary["loss_ratio"] == pytest.approx(summary["final_val_loss"] / (1 / 6))
    assert summary["status"] == "unsolved" and summary["solved_at_step"] is None
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_same_seed_same_losses_different_seed_different_losses(make_cfg, tmp_path):
    def losses(seed, where):
        cfg = make_cfg("task=copying", "task.length=5", "train.steps=20", f"seed={seed}", *TINY)
        summary = run(cfg, tmp_path / where)
        return [r["val_loss"] for r in read_metrics(tmp_path / where)], summary

    a, sa = losses(1, "a")
    b, sb = losses(1, "b")
    c, _ = losses(2, "c")
    assert a == b
    assert (
        sa["final_val_loss"] == sb["final_val_loss"] and sa["best_val_loss"] == sb["best_val_loss"]
    )
    assert a != c


def test_early_stop_at_the_first_solved_evaluation(make_cfg, tmp_path):
    # an absurdly loose criterion is met at the first evaluation after step 0
    cfg = make_cfg("task.length=6", "task.solved_mse=10", "train.steps=50", "train.eval_every=5",
                   *TINY)  # fmt: skip
    summary = run(cfg, tmp_path)
    assert summary["status"] == "solved"
    assert summary["solved_at_step"] == 0  # already "solved" at initialisation
    assert summary["steps"] == 5  # stopped at the first evaluation after training began


def test_without_early_stop_the_budget_is_used(make_cfg, tmp_path):
    cfg = make_cfg("task.length=6", "task.solved_mse=10", "train.steps=12", "train.eval_every=5",
                   "train.early_stop=false", *TINY)  # fmt: skip
    summary = run(cfg, tmp_path)
    assert summary["steps"] == 12 and summary["status"] == "solved"
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 5, 10, 12]


def test_training_learns_a_short_adding_problem(make_cfg, tmp_path):
    cfg = make_cfg("task.length=5", "model=lstm", "model.hidden_size=16", "train.steps=400",
                   "train.eval_every=100", "optim.lr=0.01", "train.progress=false",
                   "train.val_size=256", "train.early_stop=false")  # fmt: skip
    summary = run(cfg, tmp_path)
    assert summary["loss_ratio"] < 0.3


def test_results_are_readable_by_others_as_the_umask_allows(tmp_path):
    import os

    from seqtest.results import write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "mlp"])
def test_a_training_step_reads_out_only_the_scored_steps_and_loses_nothing(cell):
    """The adding task scores its last step alone (`scored_steps`): the readout sees one step,
    and the loss and every gradient equal those of the readout over all T steps."""
    task = AddingTask(length=9)
    torch.manual_seed(0)
    model = build_model(dict(cell=cell, hidden_size=8), 2, 1, task.seq_len).double()
    x, y, mask = task.sample(6, torch.Generator().manual_seed(1))
    x, y = x.double(), y.double()

    def loss_and_grads(full: bool):
        model.zero_grad()
        steps = slice(None) if full else task.scored_steps
        loss = task.loss(model(x, steps), y[:, steps], mask[:, steps])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    seen = []
    hook = model.readout.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    sliced, full = loss_and_grads(full=False), loss_and_grads(full=True)
    hook.remove()
    if cell != "mlp":  # the feedforward baseline answers at the last step only anyway
        assert seen == [(6, 1, 8), (6, 9, 8)]
        seen.clear()
        model.float().readout.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        config = TrainConfig(batch_size=6, progress=False)
        train_step(model, task, optimizer, list(model.parameters()), config, torch.Generator())
        assert seen == [(6, 1, 8)]  # the training loop passes the task's scored steps
    assert torch.allclose(sliced[0], full[0], rtol=1e-12, atol=0)
    for a, b in zip(sliced[1], full[1], strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


class MisdeclaredCopyingTask(CopyingTask):
    """Copy memory scores every step; this one claims to score the last step alone."""

    scored_steps = slice(-1, None)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        x, y, _ = super().sample(batch_size, generator)
        return Batch(x, y, torch.ones(y.shape, dtype=torch.bool))


def test_a_task_that_scores_outside_its_declared_steps_is_refused(make_cfg, tmp_path):
    """A too narrow `scored_steps` would drop scored steps from the training loss silently;
    the run refuses it, naming the task and the step, before it writes anything."""
    cfg = make_cfg(
        "task=copying", f"task._target_={__name__}.MisdeclaredCopyingTask", "task.length=5",
        "task.num_symbols=2", *TINY,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"'copying'.*scored_steps=slice\(-1, None, None\)"):
        run(cfg, tmp_path)
    assert not any(p.name != ".seqtest.lock" for p in tmp_path.iterdir())


def test_the_training_loss_is_the_plain_mean_when_the_batch_has_the_shared_mask(monkeypatch):
    """A batch whose mask is the task's shared `scored_steps_mask` is scored at every step the
    model reads out, so `train_step` asks for the unweighted mean (mask None): the same loss
    and gradients, bit for bit, as with the mask. A batch with a mask of its own (a copy here)
    is weighted by it."""
    task = AddingTask(length=12)
    model = build_model(dict(cell="lstm", hidden_size=8), task.input_size, task.output_size)
    seen = []
    real_loss = task.loss
    monkeypatch.setattr(
        task, "loss", lambda o, y, mask=None: seen.append(mask) or real_loss(o, y, mask)
    )
    config = TrainConfig(steps=1, batch_size=4, progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parameters = list(model.parameters())
    train_step(model, task, optimizer, parameters, config, torch.Generator().manual_seed(0))
    assert seen == [None]
    real_sample = task.sample

    def sample_with_own_mask(*args):
        batch = real_sample(*args)
        return batch._replace(mask=batch.mask.clone())

    monkeypatch.setattr(task, "sample", sample_with_own_mask)
    train_step(model, task, optimizer, parameters, config, torch.Generator().manual_seed(0))
    assert seen[1] is not None and seen[1].shape == (4, 1) and bool(seen[1].all())
    monkeypatch.undo()
    for loss_task in (task, CopyingTask(length=5)):
        batch = loss_task.sample(6, torch.Generator().manual_seed(1))
        C = loss_task.output_size
        output = torch.randn(6, loss_task.seq_len, C, requires_grad=True)
        plain = loss_task.loss(output, batch.y, None)
        (plain_grad,) = torch.autograd.grad(plain, output)
        weighted = loss_task.loss(output, batch.y, torch.ones_like(batch.mask))
        (weighted_grad,) = torch.autograd.grad(weighted, output)
        assert torch.equal(plain, weighted) and torch.equal(plain_grad, weighted_grad)
