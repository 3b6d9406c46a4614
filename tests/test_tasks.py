"""Each task matches its documented definition, and its baseline matches simulation."""

from __future__ import annotations

import math

import pytest
import torch

from seqtest.errors import ConfigError
from seqtest.tasks._base import Task, register_task, registered_tasks
from seqtest.tasks.adding import AddingTask
from seqtest.tasks.copying import CopyingTask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ adding


@pytest.mark.parametrize("placement", ["halves", "anywhere"])
def test_adding_shapes_markers_and_targets(placement):
    T, B = 11, 500
    x, y, mask = AddingTask(length=T, placement=placement).sample(B, gen())
    assert x.shape == (B, T, 2) and y.shape == (B, T, 1) and mask.shape == (B, T)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers.sum(1) == 2).all()  # exactly two distinct marked steps
    if placement == "halves":
        assert (markers[:, : T // 2].sum(1) == 1).all()
        assert (markers[:, T // 2 :].sum(1) == 1).all()
    else:  # both markers can fall anywhere, including the same half
        first_half = markers[:, : T // 2].sum(1)
        assert set(first_half.unique().tolist()) == {0.0, 1.0, 2.0}
    # target recomputed independently: sum of values where marked, scored at the last step only
    assert torch.allclose(y[:, -1, 0], (values * markers).sum(1))
    assert mask[:, -1].all() and not mask[:, :-1].any()
    assert (AddingTask(length=T).informative_positions(x) == (markers == 1)).all()


def test_adding_markers_cover_their_ranges_uniformly():
    T = 10
    x, _, _ = AddingTask(length=T).sample(20000, gen())
    counts = x[..., 1].sum(0)
    expected = 20000 / (T // 2)
    assert torch.allclose(counts, torch.full((T,), expected), rtol=0.08)


def test_adding_baseline_by_monte_carlo():
    task = AddingTask(length=20)
    # the best memoryless predictor: the constant mean target, estimated on one sample ...
    _, y_fit, _ = task.sample(50000, gen(1))
    constant = y_fit[:, -1].mean()
    # ... and scored on another
    x, y, mask = task.sample(50000, gen(2))
    loss = task.loss(constant.expand_as(y), y, mask).item()
    assert loss == pytest.approx(task.baseline_loss, rel=0.02)
    assert task.baseline_loss == pytest.approx(1 / 6)


# ------------------------------------------------------------------------------------ copying


def test_copying_layout_and_targets():
    T, S, K = 7, 4, 5
    task = CopyingTask(length=T, num_symbols=S, alphabet_size=K)
    x, y, mask = task.sample(300, gen())
    assert task.seq_len == T + 2 * S
    assert x.shape == (300, T + 2 * S, K + 2) and y.shape == (300, T + 2 * S)
    assert task.input_size == K + 2 and task.output_size == K + 1
    tokens = x.argmax(-1)
    assert (x.sum(-1) == 1).all()  # one-hot
    symbols = tokens[:, :S]
    assert ((symbols >= 1) & (symbols <= K)).all()
    assert (tokens[:, S : S + T - 1] == 0).all()  # T-1 blanks
    assert (tokens[:, S + T - 1] == K + 1).all()  # the delimiter
    assert (tokens[:, S + T :] == 0).all()  # S blanks
    assert (y[:, : T + S] == 0).all()
    assert (y[:, T + S :] == symbols).all()
    assert mask.all()
    assert task.informative_positions(x)[:, :S].all()
    assert not task.informative_positions(x)[:, S:].any()


def test_copying_symbols_are_uniform_over_the_alphabet():
    x, _, _ = CopyingTask(length=3, alphabet_size=8).sample(5000, gen())
    counts = torch.bincount(x.argmax(-1)[:, :10].flatten(), minlength=10)[1:9].float()
    assert torch.allclose(counts, torch.full((8,), counts.mean().item()), rtol=0.05)


@pytest.mark.parametrize("T,S,K", [(30, 10, 8), (5, 3, 4)])
def test_copying_baseline_by_monte_carlo(T, S, K):
    task = CopyingTask(length=T, num_symbols=S, alphabet_size=K)
    # best memoryless predictor: per-step empirical class frequencies of the targets
    _, y_fit, _ = task.sample(20000, gen(1))
    freq = torch.stack([torch.bincount(col, minlength=K + 1) for col in y_fit.T]).float()
    log_probs = (freq / freq.sum(1, keepdim=True)).clamp_min(1e-12).log()
    x, y, mask = task.sample(20000, gen(2))
    loss = task.loss(log_probs.expand(y.shape[0], -1, -1), y, mask).item()
    assert loss == pytest.approx(task.baseline_loss, rel=0.02)
    assert task.baseline_loss == pytest.approx(S * math.log(K) / (T + 2 * S))


def test_copying_recall_accuracy():
    task = CopyingTask(length=5, num_symbols=3, alphabet_size=4)
    x, y, mask = task.sample(10, gen())
    perfect = torch.nn.functional.one_hot(y, task.output_size).float()
    assert task.metric(perfect, y, mask).item() == 1.0
    assert task.solved({"val_loss": 0.0, "val_metric": 1.0})
    assert not task.solved({"val_loss": 0.0, "val_metric": 0.9})


# ------------------------------------------------------------------------------------ shared


@pytest.mark.parametrize("task", [AddingTask(length=9), CopyingTask(length=9)])
def test_sampling_is_deterministic_per_seed(task):
    a, b, c = task.sample(4, gen(3)), task.sample(4, gen(3)), task.sample(4, gen(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize(
    "factory,field",
    [
        (lambda: AddingTask(length=0), "task.length"),
        (lambda: AddingTask(placement="middle"), "task.placement"),
        (lambda: CopyingTask(num_symbols=0), "task.num_symbols"),
        (lambda: CopyingTask(alphabet_size=-1), "task.alphabet_size"),
    ],
)
def test_bad_task_parameters_name_the_field(factory, field):
    with pytest.raises(ConfigError, match=field):
        factory()


def test_registry_lists_tasks_and_rejects_a_second_registration():
    tasks = registered_tasks()
    assert tasks["adding"] is AddingTask and tasks["copying"] is CopyingTask
    with pytest.raises(ConfigError, match=r"registered twice.*adding\.py.*test_tasks\.py"):

        @register_task("adding")
        class Impostor(Task):  # noqa: F841
            pass
