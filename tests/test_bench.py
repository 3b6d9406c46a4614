"""The benchmark's records: a tiny grid, schema only (no timing assertions)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from seqtest import bench, native
from seqtest.models import ModelConfig, build_model, count_parameters

STEP_FIELDS = {
    "kind": str, "model": str, "B": int, "T": int, "H": int, "seqtest_ms": float,
    "reference_ms": float, "ratio": float, "reference": str, "target_of": str,
    "target_ms": float, "target_ratio": float, "target": float, "paired_ratio": float,
    "target_paired_ratio": float,
}  # fmt: skip


def test_step_records_schema(tmp_path):
    records = bench.step_records(bench.MODELS, [(4, 6, 8)], rounds=1, repeats=1)
    assert [r["model"] for r in records] == list(bench.MODELS)
    for record in records:
        for name, kind in STEP_FIELDS.items():
            assert isinstance(record[name], kind), (name, record)
        assert record["kind"] == "step"
        assert (record["B"], record["T"], record["H"]) == (4, 6, 8)
        assert record["seqtest_ms"] > 0 and record["reference_ms"] > 0
        assert record["ratio"] == pytest.approx(record["seqtest_ms"] / record["reference_ms"])
        assert record["loops"] == native.status()
        if record["model"] != "lstm":  # trained by hand: the loops were built or tried
            assert record["loops"] != "not built"
        if record["loops"] == "compiled":
            assert record["tanh"] == native.loops().tanh_kernel_name()
            assert record["tanh"] in ("avx512", "avx2", "pytorch")
        else:
            assert record["tanh"] is None
        normalised = bench.MODELS[record["model"]].get("norm") is not None
        assert ("loop_plus_norms_ratio" in record) == normalised, record["model"]
        if normalised:
            expected = (record["target_ms"] + record["norm_kernels_ms"]) / record["target_ms"]
            assert record["loop_plus_norms_ratio"] == pytest.approx(expected) and expected > 1
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    assert json.loads(path.read_text()) == records


def test_the_seqtest_side_uses_the_optimiser_a_run_builds(make_cfg):
    """The benchmark times the run's default optimiser (fused Adam, conf/optim/adam.yaml),
    the reference PyTorch's default Adam; both show in the step records."""
    parameters = list(torch.nn.Linear(2, 2).parameters())
    run = instantiate(make_cfg().optim)(parameters)
    assert bench.describe(bench.run_optimizer(parameters)) == bench.describe(run) == "Adam(fused)"
    step = bench.seqtest_step("lstm", 2, 3, 4)
    assert step.optimizer == "Adam(fused)"
    (record,) = bench.step_records(["lstm"], [(2, 3, 4)], rounds=1, repeats=1)
    assert (record["seqtest_optimizer"], record["reference_optimizer"]) == ("Adam(fused)", "Adam")


def test_path_records_time_each_models_path_against_the_twin_loop():
    records = bench.path_records(["rnn", "lstm", "ln_rnn"], [(4, 6, 8)], rounds=1, budget_s=0.001)
    assert [(r["kind"], r["model"], r["path"]) for r in records] == [
        ("path", "rnn", "bptt"), ("path", "lstm", "fused"), ("path", "ln_rnn", "bptt")
    ]  # fmt: skip
    for record in records:
        assert (record["B"], record["T"], record["H"]) == (4, 6, 8)
        assert record["ratio"] == pytest.approx(record["seqtest_ms"] / record["twin_loop_ms"])
        assert record["paired_ratio"] > 0
    assert bench.seqtest_step("gru", 2, 3, 4).path == "bptt"
    assert bench.seqtest_step("gru", 2, 3, 4, twin_loop=True).path == "loop"


def test_optimizer_records_time_both_optimisers_over_the_models_parameters():
    records = bench.optimizer_records(["rnn", "ln_lstm"], [8], rounds=1, budget_s=0.01)
    assert [(r["kind"], r["model"], r["H"]) for r in records] == [
        ("optimizer", "rnn", 8), ("optimizer", "ln_lstm", 8)
    ]  # fmt: skip
    for record in records:
        config = ModelConfig(hidden_size=8, **bench.MODELS[record["model"]])
        assert record["parameters"] == count_parameters(build_model(config, 2, 1, seq_len=2))
        assert record["seqtest_optimizer"] == "Adam(fused)"
        assert record["reference_optimizer"] == "Adam"
        assert record["ratio"] == pytest.approx(record["seqtest_us"] / record["reference_us"])
        assert record["saved_us"] == pytest.approx(record["reference_us"] - record["seqtest_us"])
        assert record["paired_ratio"] > 0


def test_gemm_records_time_both_orders_and_name_the_one_training_takes():
    records = bench.gemm_records([(2, 3, 2)], rounds=1, budget_s=0.001)
    assert [(r["kind"], r["N"], r["G"], r["inputs"]) for r in records] == [
        ("gemm", 6, 8, width) for width in bench.GEMM_INPUTS
    ]
    for record in records:
        skinny = record["inputs"] < bench.bptt.SKINNY_INPUTS
        assert record["chosen"] == ("transposed" if skinny else "direct")
        assert record["ratio"] == pytest.approx(record["direct_us"] / record["transposed_us"])


def test_rounds_alternate_their_order_and_time_every_closure_each_round():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = bench.interleaved(steps, rounds=3, repeats=2, warmup=1)
    assert order == list("abc") + list("aabbcc") + list("ccbbaa") + list("aabbcc")
    assert {name: len(values) for name, values in times.items()} == dict(a=3, b=3, c=3)
    order.clear()  # `settle`: an untimed step starts each turn
    bench.interleaved(steps, rounds=2, repeats=1, warmup=0, settle=1)
    assert order == list("aabbcc") + list("ccbbaa")


def test_the_paired_ratio_cancels_a_change_of_speed_that_the_ratio_of_medians_keeps():
    """seqtest runs at 0.9x the reference; the machine halves its speed between the two
    timings of the third round. The ratio of the medians compares a fast-phase median with
    a slow-phase one; the median of the per-round ratios is the 0.9."""
    speed = {"seqtest": [1, 1, 1, 2, 2], "reference": [1, 1, 2, 2, 2]}
    times = {"seqtest": [0.9 * t for t in speed["seqtest"]], "reference": speed["reference"]}
    medians = {name: bench.statistics.median(values) for name, values in times.items()}
    assert medians["seqtest"] / medians["reference"] == pytest.approx(0.45)
    assert bench.paired_ratio(times, "seqtest", "reference") == pytest.approx(0.9)


@pytest.mark.parametrize("cell,per_step", [("lstm", 2), ("rnn", 1)])
@pytest.mark.parametrize("norm,kernel", [("layer", "native_layer_norm"),
                                         ("batch", "native_batch_norm")])  # fmt: skip
def test_the_norm_kernels_closure_runs_the_cells_normalisations_per_step(
    norm, kernel, cell, per_step
):
    """Forward and backward of the cell's normalisations (the LSTM's two, the RNN's one) for
    each of the T steps, nothing else."""
    step = bench.normalisation_kernels_step(norm, 4, 6, 8, cell=cell)
    with torch.profiler.profile() as profile:
        step()
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls[f"aten::{kernel}"] == per_step * 6
    assert calls[f"aten::{kernel}_backward"] == per_step * 6


def test_allocator_records_run_each_setting_in_its_own_process():
    ballast = torch.ones(192 << 20)  # 768 MiB resident here: a child must not report it
    parent_peak = bench._peak_rss_mb()
    (record,) = bench.allocator_records([("rnn", 2, 4, 4)], rounds=1, steps=1)
    del ballast
    expected = {"default": "default", "tuned": "tuned", "no_mmap": "no_mmap"}
    if platform.libc_ver()[0] != "glibc":
        expected = {"default": "default", "tuned": "unavailable", "no_mmap": "unavailable"}
    assert record["states"] == expected
    assert record["huge_pages"] == {"default": False, "tuned": True, "no_mmap": True}
    assert record["speedup"] == pytest.approx(record["default_ms"] / record["tuned_ms"])
    assert record["no_mmap_speedup"] == pytest.approx(record["default_ms"] / record["no_mmap_ms"])
    assert set(record["max_rss_mb"]) == set(expected)
    if parent_peak is not None:  # Linux: each child's own peak, far below this process's
        assert all(peak < parent_peak - 500 for peak in record["max_rss_mb"].values())


def test_capacity_records_compare_side_by_side_with_alone():
    (record,) = bench.capacity_records(quick=True, rounds=1, workloads=["gemm"])
    assert record["kind"] == "capacity" and record["processes"] == os.cpu_count()
    assert record["overlap_s"] >= 0.9 * record["seconds"]  # the children ran side by side
    assert record["throughput"] == pytest.approx(
        record["side_by_side_per_s"] / record["alone_per_s"]
    )
    assert record["per_process_slowdown"] == pytest.approx(
        record["processes"] / record["throughput"]
    )
    assert record["parallel_ceiling"] == pytest.approx(
        record["side_by_side_per_s"] / record["threaded_per_s"]
    )
    with pytest.raises(ValueError, match="gemm, stream, lstm_step"):
        bench._capacity_work("fft", quick=True)
    with pytest.raises(RuntimeError, match=r"capacity child \(fft\) exited with 1"):
        bench._capacity_round("fft", 2, quick=True, seconds=0.1)


def test_main_writes_json(tmp_path, restore_threads):
    path = tmp_path / "out.json"
    records = bench.main(
        [
            "--quick",
            "--only",
            "steps",
            "optimizer",
            "--models",
            "rnn",
            "--grid",
            "2,4,4",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--json",
            str(path),
        ]  # fmt: skip
    )
    written = json.loads(path.read_text())
    assert [r["kind"] for r in written] == ["machine", "step", "optimizer"]
    assert written[1]["model"] == "rnn" and len(written) == len(records)
    assert written[0]["device"] == written[1]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda", "--json", "never-written.json"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_records_on_cuda():
    """Both sides of the comparison run on the GPU (their parameters live there)."""
    records = bench.step_records(["lstm", "ln_lstm"], [(4, 6, 8)], 1, repeats=1, device="cuda")
    assert [r["device"] for r in records] == ["cuda", "cuda"]
    step = bench.seqtest_step("lstm", 4, 6, 8, device="cuda")
    step()
    assert torch.cuda.memory_allocated() > 0


REFERENCE_NAMES = sorted({name for r in bench.REFERENCES.values() for name in (r[0], *r[1])})


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_references_learn_the_same_shapes(name):
    """Every reference core maps [B, T, 2] to the last hidden state [B, H]."""
    core = bench.reference_core(name, 2, 8)
    x, y = bench.adding_batch(3, 6, torch.Generator().manual_seed(0))
    assert x.shape == (3, 6, 2) and y.shape == (3,)
    assert core(x).shape == (3, 8)


def test_batch_norm_fast_paths_match_the_plain_arithmetic():
    """The per-step `F.batch_norm` and the input-covariance `forward_linear` give the values,
    gradients and running estimates of `forward_sequence`, within 1e-5."""
    from seqtest.models import StepBatchNorm

    torch.manual_seed(0)
    x = torch.randn(16, 7, 3)
    weight = torch.randn(12, 3, requires_grad=True)
    for beta in (False, True):
        fast, plain = StepBatchNorm(12, 5, beta=beta), StepBatchNorm(12, 5, beta=beta)
        out_fast = fast.forward_linear(x, weight)
        (g_fast,) = torch.autograd.grad(out_fast.square().sum(), weight)
        out_plain = plain.forward_sequence(torch.nn.functional.linear(x, weight))
        (g_plain,) = torch.autograd.grad(out_plain.square().sum(), weight)
        torch.testing.assert_close(out_fast, out_plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=1e-5)
        for a, b in zip(fast.buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        h = torch.randn(16, 12)
        for t in (0, 3, 4, 6):  # steps beyond max_steps share the last slot
            torch.testing.assert_close(
                fast(h, t), plain.forward_sequence(h.unsqueeze(1), first_step=t).squeeze(1)
            )
        for a, b in zip(fast.buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_hand_written_lstm_loop_computes_what_nn_lstm_computes():
    """The LSTM BPTT loop's last hidden state and the gradients of every parameter equal
    `nn.LSTM`'s on the same parameters, in float64."""
    torch.manual_seed(0)
    loop = bench.LSTMBPTTLoop(2, 5).double()
    x = torch.randn(3, 7, 2, dtype=torch.float64)
    weights = torch.randn(3, 5, dtype=torch.float64)
    out = loop(x)
    expected = loop.core(x)[0][:, -1]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    params = list(loop.parameters())
    grads = torch.autograd.grad((out * weights).sum(), params)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    for a, b in zip(grads, expected_grads, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_target_of_the_normalised_lstms_is_the_faster_plain_loop():
    """Both plain LSTM loops are timed, and the target is measured against the faster."""
    (record,) = bench.step_records(["ln_lstm"], [(4, 6, 8)], rounds=1, repeats=1)
    loops = record["candidates_ms"]
    assert set(loops) == {"LSTM loop", "LSTM BPTT loop"}
    assert record["target_of"] == min(loops, key=loops.get)
    assert record["target_ms"] == min(loops.values())


def test_the_probe_cost_cancels_a_drift_of_the_machine_speed(monkeypatch):
    """After an untimed warm-up run, runs in the order with, without, without, with probes:
    fake runs that each take 10 s longer than the one before (a machine slowing down) and
    2 s more with the probes, whose own timer says 2 s. The means give the probes' 2 s both
    ways; with one run each, the difference would be -8 s."""
    import seqtest.run
    from seqtest.bench_probe import run_cost
    from seqtest.results import METRICS_FILE, write_jsonl

    calls = []

    def drifting_run(cfg, folder):
        enabled = bool(cfg.analysis.enabled)
        wall = 100.0 + 10.0 * len(calls) + (2.0 if enabled else 0.0)
        calls.append(enabled)
        record = {"step": 0, "probe_seconds": 2.0 if enabled else None}
        write_jsonl(Path(folder) / METRICS_FILE, [record])
        return {"status": "finished", "wall_time_s": wall}

    monkeypatch.setattr(seqtest.run, "run", drifting_run)
    cost = run_cost("rnn", length=5, steps=10, hidden=4, every=10)
    assert calls == [True, True, False, False, True]  # the first: the warm-up
    assert cost["walls_s"] == {"with_probes": [112.0, 142.0], "without": [120.0, 130.0]}
    assert cost["probe_share"] == pytest.approx(2.0 / 127.0)
    assert cost["difference_share"] == pytest.approx(2.0 / 127.0)


def test_a_stop_signal_caught_by_a_timed_run_stops_the_probe_benchmark(monkeypatch):
    """A run catches Ctrl-C and SIGTERM to stop cleanly; inside the benchmark the signal
    was meant for the benchmark, which must stop instead of timing the next run."""
    import seqtest.run
    from seqtest.bench_probe import run_cost

    calls = []

    def interrupted_run(cfg, folder):
        calls.append(cfg.analysis.enabled)
        return {"status": "interrupted", "interrupted_by": "SIGINT", "wall_time_s": 1.0}

    monkeypatch.setattr(seqtest.run, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        run_cost("rnn", length=5, steps=10, hidden=4, every=10)
    assert calls == [True]  # stopped at the warm-up: no timed run was started
