"""The task library: each task against an independent reading of its documented definition.

For every task: shapes and masks, targets recomputed from the inputs alone, determinism per
seed, the analytic baseline against a Monte-Carlo simulation of the best memoryless
predictor (within 2%), the informative positions, the metric and the solved criterion, the
YAML file that configures it, and a short end-to-end run through the command line.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from seqtest.errors import ConfigError
from seqtest.results import read_summary
from seqtest.tasks._base import registered_tasks
from seqtest.tasks._images import MNIST_FILES, read_idx, write_idx
from seqtest.tasks.adding import AddingTask
from seqtest.tasks.associative_recall import AssociativeRecallTask
from seqtest.tasks.delayed_xor import DelayedXorTask
from seqtest.tasks.multiplication import MultiplicationTask
from seqtest.tasks.noiseless_memorisation import NoiselessMemorisationTask
from seqtest.tasks.random_permutation import RandomPermutationTask
from seqtest.tasks.selective_copy import SelectiveCopyTask
from seqtest.tasks.sequential_mnist import PermutedMNISTTask, SequentialMNISTTask
from seqtest.tasks.temporal_order import TemporalOrder3BitTask, TemporalOrderTask, windows

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens_of(x: torch.Tensor) -> torch.Tensor:
    """Token indices of a one-hot input, after checking that it is one-hot."""
    assert ((x == 0) | (x == 1)).all() and (x.sum(-1) == 1).all()
    return x.argmax(-1)


def memoryless_loss(task, n_fit: int, n_eval: int) -> float:
    """Loss of the best predictor that knows the step index but remembers no input: per step,
    the mean target (MSE) or the target class frequencies (cross-entropy), estimated on one
    sample and scored, on the scored steps only, on another."""
    _, y_fit, mask_fit = task.sample(n_fit, gen(1))
    _, y, mask = task.sample(n_eval, gen(2))
    steps = mask_fit.any(0).nonzero()[:, 0].tolist()
    assert set(steps) >= set(mask.any(0).nonzero()[:, 0].tolist())
    losses = []
    for t in steps:
        fit, target, scored = y_fit[mask_fit[:, t], t], y[:, t], mask[:, t]
        if task.loss_kind == "mse":
            per_sample = (target - fit.mean(0)).pow(2).mean(-1)
        else:
            freq = torch.bincount(fit, minlength=task.output_size).double() / len(fit)
            per_sample = -freq.clamp_min(1e-12).log()[target]
        losses.append(per_sample[scored].double())
    return torch.cat(losses).mean().item()


# ---------------------------------------------------------------------------- MNIST files


def write_mnist(folder: Path, n_train: int = 150, n_test: int = 40, gz: bool = False) -> Path:
    """Small MNIST-format IDX files of random 28 x 28 images with known labels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    sparse = rng.random((n_train, 28, 28)) < 0.3  # MNIST-like: mostly background
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)) * sparse,
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }  # fmt: skip
    for role, name in MNIST_FILES.items():
        write_idx(folder / f"{name}{suffix}", arrays[role])
    return folder


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


def find_rows(images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of each row of x (pixels [B, P]) among the rows of images [N, P]; -1 if absent."""
    equal = (x[:, None, :] == images[None, :, :]).all(-1)  # [B, N]
    return torch.where(equal.any(1), equal.float().argmax(1), torch.tensor(-1))


# ------------------------------------------------------------------------ adding, hochreiter


def test_adding_hochreiter_layout_and_targets():
    T, B = 30, 4000
    task = AddingTask(length=T, placement="hochreiter")
    x, y, mask = task.sample(B, gen())
    values, markers = x[..., 0], x[..., 1]
    assert x.shape == (B, T, 2) and y.shape == (B, T, 1)
    assert ((values >= -1) & (values < 1)).all() and (values < 0).any()
    assert (markers.sum(1) == 2).all() and (markers[:, T // 2 :] == 0).all()
    assert (markers[:, :10].sum(1) >= 1).all()  # one marker in the first ten steps
    assert torch.allclose(y[:, -1, 0], 0.5 + (values * markers).sum(1) / 4)
    assert mask[:, -1].all() and not mask[:, :-1].any()
    assert torch.equal(task.informative_positions(x), markers == 1)
    assert task.baseline_loss == pytest.approx(1 / 24)


def test_adding_hochreiter_marker_distribution():
    """First marker uniform on [0, W), W = min(10, T//2); second uniform on [0, H) minus the
    first, H = T//2. So P(step s marked) = 1/W + (1 - 1/W)/(H - 1) for s < W, 1/(H-1) for
    W <= s < H, and 0 beyond."""
    T, B = 40, 40000
    H, W = T // 2, 10
    x, _, _ = AddingTask(length=T, placement="hochreiter").sample(B, gen())
    frequency = x[..., 1].mean(0)
    expected = torch.zeros(T)
    expected[:W] = 1 / W + (1 - 1 / W) / (H - 1)
    expected[W:H] = 1 / (H - 1)
    assert torch.allclose(frequency, expected, atol=0.006)
    # a short sequence: the first window is the whole first half
    x, _, _ = AddingTask(length=6, placement="hochreiter").sample(B, gen())
    assert (x[:, :3, 1].sum(1) == 2).all()


def test_adding_hochreiter_baseline_by_monte_carlo():
    task = AddingTask(length=20, placement="hochreiter")
    assert memoryless_loss(task, 50000, 50000) == pytest.approx(task.baseline_loss, rel=0.02)


def test_adding_hochreiter_needs_four_steps():
    with pytest.raises(ConfigError, match="task.length"):
        AddingTask(length=3, placement="hochreiter")


# ---------------------------------------------------------------------------- multiplication


@pytest.mark.parametrize("placement", ["halves", "anywhere", "hochreiter"])
def test_multiplication_targets(placement):
    T, B = 24, 2000
    task = MultiplicationTask(length=T, placement=placement)
    x, y, mask = task.sample(B, gen())
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all() and (markers.sum(1) == 2).all()
    if placement == "halves":
        assert (markers[:, : T // 2].sum(1) == 1).all()
    if placement == "hochreiter":
        assert (markers[:, T // 2 :] == 0).all() and (markers[:, :10].sum(1) >= 1).all()
    marked = values[markers == 1].view(B, 2)
    assert torch.allclose(y[:, -1, 0], marked[:, 0] * marked[:, 1])
    assert (y[:, :-1] == 0).all() and mask[:, -1].all() and not mask[:, :-1].any()
    assert torch.equal(task.informative_positions(x), markers == 1)


def test_multiplication_baseline_by_monte_carlo():
    task = MultiplicationTask(length=20)
    assert task.baseline_loss == pytest.approx(7 / 144)
    assert memoryless_loss(task, 100000, 100000) == pytest.approx(task.baseline_loss, rel=0.02)


# ---------------------------------------------------------------------------- temporal order


def test_temporal_order_windows_follow_the_paper_at_length_100():
    assert windows(100, 2) == [(10, 20), (50, 60)]
    assert windows(100, 3) == [(10, 20), (36, 46), (63, 73)]


@pytest.mark.parametrize("k,T", [(2, 50), (3, 50), (2, 10), (3, 100)])
def test_temporal_order_layout_and_targets(k, T):
    task = TemporalOrderTask(length=T, num_symbols=k)
    B = 3000
    x, y, mask = task.sample(B, gen())
    assert x.shape == (B, T, 8) and y.shape == (B, T) and task.output_size == 2**k
    tokens = tokens_of(x)
    assert (tokens[:, 0] == 6).all() and (tokens[:, -1] == 7).all()
    relevant = (tokens == 4) | (tokens == 5)
    assert (relevant.sum(1) == k).all()
    for start, stop in windows(T, k):  # exactly one relevant symbol per window, all steps used
        assert (relevant[:, start:stop].sum(1) == 1).all()
        assert relevant[:, start:stop].any(0).all()
    assert ((tokens[:, 1:-1] <= 5) & ((tokens[:, 1:-1] <= 3) | relevant[:, 1:-1])).all()
    # recompute the class: relevant symbols in order, X = 0, Y = 1, earliest most significant
    for b in range(50):
        bits = [int(t == 5) for t in tokens[b][relevant[b]].tolist()]
        assert y[b, -1].item() == int("".join(map(str, bits)), 2)
    assert (y[:, :-1] == 0).all() and mask[:, -1].all() and not mask[:, :-1].any()
    assert torch.equal(task.informative_positions(x), relevant)
    counts = torch.bincount(y[:, -1], minlength=2**k).float()  # classes uniform
    assert torch.allclose(counts, torch.full_like(counts, B / 2**k), rtol=0.15)


@pytest.mark.parametrize("task", [TemporalOrderTask(length=40), TemporalOrder3BitTask(length=40)])
def test_temporal_order_baseline_by_monte_carlo(task):
    assert task.baseline_loss == pytest.approx(task.num_symbols * math.log(2))
    assert memoryless_loss(task, 20000, 20000) == pytest.approx(task.baseline_loss, rel=0.02)


def test_temporal_order_3bit_is_registered_with_three_symbols():
    task = TemporalOrder3BitTask()
    assert task.name == "temporal_order_3bit" and task.num_symbols == 3
    assert task.baseline_loss == pytest.approx(math.log(8))
    assert TemporalOrderTask().name == "temporal_order"


def test_temporal_order_too_short_names_the_least_length():
    with pytest.raises(ConfigError, match=r"task.length=9 .* >= 10"):
        TemporalOrderTask(length=9)


# ------------------------------------------------------------------------ random permutation


def test_random_permutation_layout_and_targets():
    T, V, B = 15, 12, 2000
    task = RandomPermutationTask(length=T, vocab_size=V)
    x, y, mask = task.sample(B, gen())
    assert x.shape == (B, T, V) and y.shape == (B, T) and task.output_size == 2
    tokens = tokens_of(x)
    assert ((tokens[:, 0] == 0) | (tokens[:, 0] == 1)).all()
    assert (tokens[:, 1:] >= 2).all()  # noise never repeats a bit symbol
    assert set(tokens[:, 1:].unique().tolist()) == set(range(2, V))
    assert torch.equal(y[:, -1], tokens[:, 0]) and (y[:, :-1] == 0).all()
    assert mask[:, -1].all() and not mask[:, :-1].any()
    informative = task.informative_positions(x)
    assert informative[:, 0].all() and not informative[:, 1:].any()


# -------------------------------------------------------------------- noiseless memorisation


def test_noiseless_memorisation_layout_and_targets():
    T, S, K, B = 6, 5, 2, 500
    task = NoiselessMemorisationTask(length=T, num_symbols=S, alphabet_size=K)
    x, y, mask = task.sample(B, gen())
    assert task.seq_len == T + 2 * S and x.shape == (B, T + 2 * S, K + 2)
    assert task.output_size == K
    tokens = tokens_of(x)
    pattern = tokens[:, :S]
    assert ((pattern >= 1) & (pattern <= K)).all()
    assert (tokens[:, S : S + T - 1] == 0).all() and (tokens[:, S + T - 1] == K + 1).all()
    assert (tokens[:, S + T :] == 0).all()
    assert torch.equal(y[:, S + T :], pattern - 1)
    assert mask[:, S + T :].all() and not mask[:, : S + T].any()
    informative = task.informative_positions(x)
    assert informative[:, :S].all() and not informative[:, S:].any()


# ---------------------------------------------------------------------------- selective copy


def test_selective_copy_layout_and_targets():
    T, S, K, B = 12, 4, 5, 500
    task = SelectiveCopyTask(length=T, num_symbols=S, alphabet_size=K)
    x, y, mask = task.sample(B, gen())
    assert task.seq_len == T + 1 + S and x.shape == (B, T + 1 + S, K + 2)
    tokens = tokens_of(x)
    data = tokens[:, :T]
    assert ((data >= 0) & (data <= K)).all() and ((data > 0).sum(1) == S).all()
    assert (tokens[:, T] == K + 1).all() and (tokens[:, T + 1 :] == 0).all()
    for b in range(B):  # targets: the data symbols in order of appearance
        assert y[b, T + 1 :].tolist() == [t - 1 for t in data[b][data[b] > 0].tolist()]
    assert mask[:, T + 1 :].all() and not mask[:, : T + 1].any()
    informative = task.informative_positions(x)
    assert torch.equal(informative[:, :T], data > 0) and not informative[:, T:].any()
    # positions spread over the whole data region, including its first and last step
    assert (data > 0).any(0).all()


# ------------------------------------------------------------------------ associative recall


def test_associative_recall_layout_and_targets():
    P, Q, T, Kk, Kv, B = 4, 3, 5, 6, 7, 400
    task = AssociativeRecallTask(length=T, num_pairs=P, num_queries=Q, key_vocab=Kk, value_vocab=Kv)
    x, y, mask = task.sample(B, gen())
    L = 2 * P + T + Q
    assert task.seq_len == L and x.shape == (B, L, 1 + Kk + Kv) and task.output_size == Kv
    tokens = tokens_of(x)
    for b in range(B):
        row = tokens[b].tolist()
        keys, values = row[0 : 2 * P : 2], row[1 : 2 * P : 2]
        assert all(1 <= k <= Kk for k in keys) and len(set(keys)) == P
        assert all(Kk < v <= Kk + Kv for v in values)
        assert row[2 * P : 2 * P + T] == [0] * T
        queries = row[2 * P + T :]
        assert len(set(queries)) == Q and set(queries) <= set(keys)
        pairs = dict(zip(keys, values, strict=True))
        assert y[b, 2 * P + T :].tolist() == [pairs[q] - Kk - 1 for q in queries]
        informative = task.informative_positions(x[b : b + 1])[0].tolist()
        expected = [False] * L
        for i, key in enumerate(keys):
            expected[2 * i] = expected[2 * i + 1] = key in queries
        expected[2 * P + T :] = [True] * Q
        assert informative == expected
    assert mask[:, 2 * P + T :].all() and not mask[:, : 2 * P + T].any()


def test_associative_recall_allows_no_delay_and_rejects_bad_sizes():
    assert AssociativeRecallTask(length=0).seq_len == 2 * 8 + 8
    with pytest.raises(ConfigError, match="task.num_queries"):
        AssociativeRecallTask(num_pairs=4, num_queries=5)
    with pytest.raises(ConfigError, match="task.num_pairs"):
        AssociativeRecallTask(num_pairs=20, key_vocab=16)


# ------------------------------------------------------------------------------ delayed xor


@pytest.mark.parametrize("n,score", [(2, "all"), (3, "all"), (2, "last"), (3, "last")])
def test_delayed_xor_targets(n, score):
    T, L, B = 20, 3, 300
    task = DelayedXorTask(length=T, lag=L, num_bits=n, score=score)
    x, y, mask = task.sample(B, gen())
    assert x.shape == (B, T, 1) and y.shape == (B, T)
    bits = x[..., 0].long().tolist()
    first = T - 1 if score == "last" else (n - 1) * L
    for b in range(B):
        for t in range((n - 1) * L, T):
            assert y[b, t].item() == sum(bits[b][t - j * L] for j in range(n)) % 2
    assert mask[:, first:].all() and not mask[:, :first].any()
    informative = task.informative_positions(x)[0].tolist()
    used = {t - j * L for t in range(first, T) for j in range(n)}
    assert informative == [t in used for t in range(T)]


@pytest.mark.parametrize("score", ["all", "last"])
def test_delayed_xor_baseline_by_monte_carlo(score):
    task = DelayedXorTask(length=30, lag=4, score=score)
    assert memoryless_loss(task, 20000, 20000) == pytest.approx(math.log(2), rel=0.02)


def test_delayed_xor_needs_a_scored_step():
    with pytest.raises(ConfigError, match="task.length"):
        DelayedXorTask(length=10, lag=10)


# ------------------------------------------------- baselines of the symbol tasks, by simulation

SYMBOL_TASKS = [
    RandomPermutationTask(length=20, vocab_size=20),
    NoiselessMemorisationTask(length=10),
    NoiselessMemorisationTask(length=5, num_symbols=4, alphabet_size=6),
    SelectiveCopyTask(length=20, num_symbols=5),
    AssociativeRecallTask(length=5),
]


@pytest.mark.parametrize("task", SYMBOL_TASKS, ids=lambda t: t.name)
def test_symbol_task_baseline_by_monte_carlo(task):
    assert memoryless_loss(task, 10000, 10000) == pytest.approx(task.baseline_loss, rel=0.02)


# ---------------------------------------------------------------------------- MNIST, digits


def test_idx_files_round_trip_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name), array)
    with gzip.open(tmp_path / "a-idx3-ubyte.gz", "rb") as file:
        assert file.read(4) == bytes([0, 0, 8, 3])
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_mnist_layout_targets_and_splits(mnist_dir):
    task = SequentialMNISTTask(data_dir=str(mnist_dir), holdout=30)
    assert task.seq_len == 784 and task.input_size == 1 and task.output_size == 10
    train_images = torch.from_numpy(read_idx(mnist_dir / MNIST_FILES["train_images"]).copy())
    train_images = train_images.reshape(150, 784)
    train_labels = torch.from_numpy(read_idx(mnist_dir / MNIST_FILES["train_labels"]).copy())
    x, y, mask = task.sample(200, gen())
    assert x.shape == (200, 784, 1) and ((x >= 0) & (x <= 1)).all()
    rows = find_rows(train_images.float() / 255, x[..., 0])
    assert (rows >= 0).all() and (rows < 120).all()  # training split only: not the last 30
    assert torch.equal(y[:, -1], train_labels[rows].long()) and (y[:, :-1] == 0).all()
    assert mask[:, -1].all() and not mask[:, :-1].any()
    assert torch.equal(task.informative_positions(x), x[..., 0] > 0)
    # validation: the held-out 30, without replacement, fixed by the generator
    val = task.validation_batch(1000, gen(5))
    rows = find_rows(train_images.float() / 255, val.x[..., 0])
    assert sorted(rows.tolist()) == list(range(120, 150))
    assert torch.equal(val.y[:, -1], train_labels[rows].long())
    assert torch.equal(task.validation_batch(10, gen(5)).x, val.x[:10])
    # test: the t10k files, in order; holdout=0 validates on them
    test_images = torch.from_numpy(read_idx(mnist_dir / MNIST_FILES["test_images"]).copy())
    test = task.test_batch()
    assert torch.equal(test.x[..., 0], test_images.reshape(40, 784).float() / 255)
    on_test = SequentialMNISTTask(data_dir=str(mnist_dir), holdout=0).validation_batch(40, gen())
    assert sorted(find_rows(test.x[..., 0], on_test.x[..., 0]).tolist()) == list(range(40))


def test_permuted_mnist_applies_one_fixed_permutation(mnist_dir):
    plain = SequentialMNISTTask(data_dir=str(mnist_dir), holdout=30)
    permuted = PermutedMNISTTask(data_dir=str(mnist_dir), holdout=30)
    again = PermutedMNISTTask(data_dir=str(mnist_dir), holdout=30, permutation_seed=0)
    other = PermutedMNISTTask(data_dir=str(mnist_dir), holdout=30, permutation_seed=1)
    a, b = plain.sample(16, gen(3)), permuted.sample(16, gen(3))
    order = torch.randperm(784, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.x, a.x[:, order]) and torch.equal(a.y, b.y)
    assert not torch.equal(order, torch.arange(784))
    assert torch.equal(again.sample(16, gen(3)).x, b.x)
    assert not torch.equal(other.sample(16, gen(3)).x, b.x)
    assert torch.equal(permuted.test_batch().x, plain.test_batch().x[:, order])


def test_mnist_reads_gzip_files(tmp_path):
    folder = write_mnist(tmp_path / "gz", gz=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}.gz" for n in MNIST_FILES.values()
    )
    task = SequentialMNISTTask(data_dir=str(folder), holdout=10)
    assert task.sample(4, gen()).x.shape == (4, 784, 1)


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="task.data_dir is required.*train-images-idx3-ubyte"):
        SequentialMNISTTask()
    with pytest.raises(ConfigError, match="no such folder"):
        SequentialMNISTTask(data_dir=str(tmp_path / "absent"))
    folder = write_mnist(tmp_path / "partial")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"missing: t10k-labels-idx1-ubyte$"):
        SequentialMNISTTask(data_dir=str(folder))


def test_mnist_holdout_must_leave_training_examples(mnist_dir):
    with pytest.raises(ConfigError, match="task.holdout"):
        SequentialMNISTTask(data_dir=str(mnist_dir))  # default 5000 > 150 examples


def test_mnist_baseline_by_monte_carlo(mnist_dir):
    task = SequentialMNISTTask(data_dir=str(mnist_dir), holdout=30)
    labels = torch.from_numpy(read_idx(mnist_dir / MNIST_FILES["train_labels"]).copy())[:120]
    p = torch.bincount(labels.long(), minlength=10).double() / 120
    assert task.baseline_loss == pytest.approx(float(-(p * p.log()).sum()))
    assert memoryless_loss(task, 4000, 4000) == pytest.approx(task.baseline_loss, rel=0.02)


def test_sequential_digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from seqtest.tasks.sequential_digits import SequentialDigitsTask

    digits = sklearn_datasets.load_digits()
    task = SequentialDigitsTask()
    assert task.seq_len == 64 and task.output_size == 10
    x, y, mask = task.sample(300, gen())
    images = torch.from_numpy(digits.data).float() / 16
    rows = find_rows(images, x[..., 0])
    # training split: the first 1437 (duplicate images may match an earlier copy)
    assert (rows >= 0).all() and (rows < 1437).all()
    assert torch.equal(y[:, -1], torch.from_numpy(digits.target)[rows])
    assert mask[:, -1].all() and not mask[:, :-1].any()
    val = task.validation_batch(1000, gen())
    assert len(val.x) == 360
    assert sorted(val.y[:, -1].tolist()) == sorted(digits.target[1437:].tolist())
    assert memoryless_loss(task, 20000, 20000) == pytest.approx(task.baseline_loss, rel=0.02)
    assert task.baseline_loss == pytest.approx(math.log(10), rel=0.001)
    permuted = SequentialDigitsTask(permute=True)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(permuted.sample(8, gen(4)).x, task.sample(8, gen(4)).x[:, order])


# ------------------------------------------------------------------------- every task at once


def small_instances(mnist_dir: Path) -> list:
    tasks = [
        AddingTask(length=12, placement="hochreiter"),
        MultiplicationTask(length=12),
        TemporalOrderTask(length=20),
        TemporalOrder3BitTask(length=20),
        RandomPermutationTask(length=10, vocab_size=10),
        NoiselessMemorisationTask(length=6),
        SelectiveCopyTask(length=12, num_symbols=3),
        AssociativeRecallTask(length=3, num_pairs=4, num_queries=2),
        DelayedXorTask(length=12, lag=3),
        SequentialMNISTTask(data_dir=str(mnist_dir), holdout=30),
        PermutedMNISTTask(data_dir=str(mnist_dir), holdout=30),
    ]
    try:
        from seqtest.tasks.sequential_digits import SequentialDigitsTask

        tasks.append(SequentialDigitsTask())
    except ImportError:
        pass
    return tasks


def test_every_task_batch_has_consistent_shapes_and_is_deterministic(mnist_dir):
    for task in small_instances(mnist_dir):
        B, T = 5, task.seq_len
        x, y, mask = task.sample(B, gen(3))
        assert x.shape == (B, T, task.input_size) and x.dtype == torch.float32, task.name
        assert mask.shape == (B, T) and mask.dtype == torch.bool and mask.any(1).all()
        if task.loss_kind == "mse":
            assert y.shape == (B, T, task.output_size) and y.dtype == torch.float32
        else:
            assert y.shape == (B, T) and y.dtype == torch.long
            assert ((y >= 0) & (y < task.output_size)).all()
        assert task.informative_positions(x).shape == (B, T)
        task.check_scored_steps(mask)  # every scored step lies in the declared scored_steps
        assert mask[:, task.scored_steps].all(), task.name  # and the slice is tight
        assert task.sample(B, gen(5)).mask is mask  # one shared mask, none made per step
        again, other = task.sample(B, gen(3)), task.sample(B, gen(4))
        assert all(torch.equal(u, v) for u, v in zip((x, y, mask), again, strict=True))
        assert not (torch.equal(x, other.x) and torch.equal(y, other.y)), task.name


def test_every_task_metric_and_solved_criterion(mnist_dir):
    for task in small_instances(mnist_dir):
        x, y, mask = task.sample(64, gen())
        if task.loss_kind == "mse":
            assert task.loss(y.clone(), y, mask).item() == 0
            assert task.solved({"val_loss": 0.0, "val_metric": None})
            assert not task.solved({"val_loss": task.baseline_loss, "val_metric": None})
            continue
        perfect = F.one_hot(y, task.output_size).float() * 20
        assert task.loss(perfect, y, mask).item() < 1e-6, task.name
        assert task.metric(perfect, y, mask).item() == 1.0
        wrong = F.one_hot((y + 1) % task.output_size, task.output_size).float()
        assert task.metric(wrong, y, mask).item() == 0.0
        assert task.solved({"val_loss": 0.0, "val_metric": 1.0})
        assert not task.solved({"val_loss": task.baseline_loss, "val_metric": 0.5})


def test_every_registered_task_has_a_documented_yaml_and_baseline_formula():
    tasks = registered_tasks()
    for name, cls in tasks.items():
        assert (CONF / f"{name}.yaml").exists(), name
        assert getattr(cls, "baseline_formula", None), name
        doc = sys.modules[cls.__module__].__doc__
        assert "Baseline" in doc and "Solved" in doc, name
    for path in sorted(CONF.glob("*.yaml")):
        text = path.read_text()
        node = yaml.safe_load(text)
        module, _, class_name = node.pop("_target_").rpartition(".")
        assert module.startswith("seqtest.tasks.")
        cls = getattr(__import__(module, fromlist=[class_name]), class_name)
        assert cls in tasks.values(), path.name
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert set(node) == set(fields), path.name  # every parameter, and only those
        for key in node:  # every parameter commented
            line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
            assert "#" in line, (path.name, key)
        if path.stem in tasks:  # the task's own file repeats its defaults
            assert cls is tasks[path.stem]
            for key, value in node.items():
                if not (isinstance(value, str) and value.startswith("${")):
                    assert value == fields[key], (path.name, key)


def test_new_task_names_are_listed():
    expected = {
        "multiplication", "temporal_order", "temporal_order_3bit", "random_permutation",
        "noiseless_memorisation", "selective_copy", "associative_recall", "delayed_xor",
        "sequential_mnist", "permuted_mnist", "sequential_digits",
    }  # fmt: skip
    assert expected <= set(registered_tasks())


def test_tasks_cli_lists_every_task_with_parameters_and_baseline(capsys):
    from seqtest.tasks_cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name in registered_tasks():
        assert f"\n{name}  (" in f"\n{out}"
    assert "Var[x1 x2]" in out and "lag: int" in out and "defaults: 0.0486111" in out
    assert "n/a (task.data_dir is required)" in out
    assert main(["temporal_order", "-v"]) == 0
    out = capsys.readouterr().out
    assert "Definition." in out and "multiplication" not in out
    assert main(["no_such_task"]) == 2
    assert "unknown task no_such_task" in capsys.readouterr().err


# ------------------------------------------------------------------------ end to end, CLI
# Two multiruns (one process each) train every task for 20 steps: about 20 s and 15 s on an
# idle 2-core machine, so they run with `pytest -m slow`.

QUICK = [
    "model.hidden_size=16", "train.val_size=64", "train.steps=20",
    "train.eval_every=10", "train.progress=false", "threads=1",
]  # fmt: skip

SYNTHETIC = [
    "adding_hochreiter", "multiplication", "temporal_order", "temporal_order_3bit",
    "random_permutation", "noiseless_memorisation", "selective_copy", "associative_recall",
    "delayed_xor",
]  # fmt: skip


def sweep(tmp_path: Path, tasks: list[str], *overrides: str, env: dict | None = None) -> list:
    """One multirun over `tasks` in a subprocess; the summaries of its runs, in order."""
    out = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "seqtest", "-m", f"task={','.join(tasks)}", *overrides, *QUICK,
         f"hydra.sweep.dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [read_summary(out / str(i)) for i in range(len(tasks))]


def check_summaries(summaries: list, tasks: list[str]) -> None:
    for summary, name in zip(summaries, tasks, strict=True):
        expected = {"adding_hochreiter": "adding"}.get(name, name)
        assert summary["task"] == expected and summary["steps"] == 20
        assert math.isfinite(summary["final_val_loss"]) and summary["baseline_loss"] > 0


@pytest.mark.slow
def test_every_synthetic_task_trains_through_the_cli(tmp_path):
    summaries = sweep(tmp_path, SYNTHETIC, "task.length=20", "train.batch_size=16")
    check_summaries(summaries, SYNTHETIC)
    assert summaries[0]["baseline_loss"] == pytest.approx(1 / 24)


@pytest.mark.slow
def test_every_dataset_task_trains_through_the_cli(tmp_path):
    folder = write_mnist(tmp_path / "mnist", n_train=100, n_test=20)
    tasks = ["sequential_mnist", "permuted_mnist"]
    try:
        import sklearn  # noqa: F401

        tasks.append("sequential_digits")
    except ImportError:
        pass
    summaries = sweep(
        tmp_path, tasks, "++task.holdout=20", "train.batch_size=8",
        env={"SEQTEST_MNIST_DIR": str(folder)},
    )  # fmt: skip
    check_summaries(summaries, tasks)
    assert summaries[0]["seq_len"] == 784
