"""Time one gradient probe, print the half-lives at initialisation, or measure what the
probes cost a real training run.

    python -m seqtest.bench_probe --cells rnn lstm --hidden 128 --length 200 --batch 64
    python -m seqtest.bench_probe --half-lives --length 100
    python -m seqtest.bench_probe --run-cost --cells rnn lstm gru --length 100 --steps 1000

``--run-cost`` trains each cell four times in this process with the default probe cadence
(analysis.every = 500), with the probes, twice without, with again (`RUN_ORDER`), and prints
the probes' share of the run's wall time, measured both ways: the probes' own time over the
run's time, and the difference of the mean wall times with and without them.

Each timing is the best of ``--repeat`` probes after one warm-up probe, on one torch thread
by default (``--threads``), with subnormals flushed as `seqtest.run` does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from seqtest.gradients import AnalysisConfig, probe
from seqtest.models import build_model
from seqtest.run import configure_torch
from seqtest.tasks.adding import AddingTask


def time_probe(cell, hidden, length, batch, dtype, repeat=3, lyapunov_k=5, seed=0) -> float:
    task = AddingTask(length=length)
    data = task.sample(batch, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = build_model(dict(cell=cell, hidden_size=hidden), task.input_size, task.output_size)
    config = AnalysisConfig(batch_size=batch, dtype=dtype, lyapunov_k=lyapunov_k)
    probe(model, task, data, config)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        probe(model, task, data, config)
        best = min(best, time.perf_counter() - started)
    return best


def half_lives(hidden, length, batch, dtype, seed=0) -> dict[str, dict]:
    task = AddingTask(length=length)
    data = task.sample(batch, torch.Generator().manual_seed(seed))
    out = {}
    for cell in ("rnn", "lstm", "gru"):
        torch.manual_seed(seed)
        model = build_model(dict(cell=cell, hidden_size=hidden), task.input_size, task.output_size)
        r = probe(model, task, data, AnalysisConfig(dtype=dtype))
        out[cell] = {
            key: float(r[key][-1])
            for key in ("decay_rate", "half_life", "horizon", "r2", "spectral_radius")
        } | {"top_lyapunov": float(r["lyapunov"][-1, 0])}
    return out


#: The order of `run_cost`'s runs, with probes (True) and without: A B B A, so that a drift
#: of the machine's speed during the four runs that is linear in time cancels in the means.
RUN_ORDER = (True, False, False, True)


def run_cost(cell: str, length: int, steps: int, hidden: int, every: int = 500) -> dict:
    """Train `cell` twice with and twice without probes, in the order `RUN_ORDER`; the
    probes' share of the wall time, two ways: their own time over the run's (the direct
    measure), and the difference of the mean wall times with and without them (a check that
    nothing outside the probes' own timer costs time; it carries the machine's noise)."""
    import tempfile

    from hydra import compose, initialize_config_module

    from seqtest.results import read_metrics
    from seqtest.run import run

    overrides = [
        f"model={cell}", f"model.hidden_size={hidden}", f"task.length={length}",
        f"train.steps={steps}", "train.early_stop=false", "train.progress=false",
        f"analysis.every={every}", "analysis.plots=false",
    ]  # fmt: skip
    walls: dict[bool, list[float]] = {True: [], False: []}
    probe_times = []
    with initialize_config_module(config_module="seqtest.conf", version_base="1.3"):
        # untimed: what only a process's first run pays (the optimiser's first import of
        # torch._dynamo, loading the compiled loops, first calls) would count for the first
        # timed run alone
        warm_up = [*overrides, "train.steps=2", "train.eval_every=1", "analysis.every=1"]
        with tempfile.TemporaryDirectory() as folder:
            _run_or_stop(run, compose("config", overrides=warm_up), folder)
        for enabled in RUN_ORDER:
            cfg = compose("config", overrides=[*overrides, f"analysis.enabled={enabled}"])
            with tempfile.TemporaryDirectory() as folder:
                summary = _run_or_stop(run, cfg, folder)
                if enabled:
                    probe_times.append(
                        sum(r.get("probe_seconds") or 0.0 for r in read_metrics(folder))
                    )
            walls[enabled].append(summary["wall_time_s"])
    with_probes, without = (statistics.mean(walls[enabled]) for enabled in (True, False))
    return {
        "cell": cell,
        "wall_with_probes_s": with_probes,
        "wall_without_s": without,
        "walls_s": {"with_probes": walls[True], "without": walls[False]},
        "probe_share": statistics.mean(probe_times) / with_probes,
        "difference_share": (with_probes - without) / with_probes,
    }


def _run_or_stop(run: Callable[..., dict], cfg, folder: str) -> dict:
    """`run(cfg, folder)`'s summary. A run catches Ctrl-C and SIGTERM to stop cleanly; here
    they were meant for the benchmark, which must not go on and time the next run."""
    summary = run(cfg, folder)
    if summary["status"] == "interrupted":
        raise KeyboardInterrupt(f"stopped by {summary['interrupted_by']}")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["rnn", "lstm"])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--half-lives", action="store_true", help="print init half-lives only")
    parser.add_argument("--run-cost", action="store_true", help="probe share of a run's time")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    configure_torch(args.threads)  # as a run: flush subnormals, keep freed memory
    if args.run_cost:
        for cell in args.cells:
            cost = run_cost(cell, args.length, args.steps, args.hidden)
            print(
                f"{cell:5s} H={args.hidden} T={args.length} steps={args.steps}: "
                f"{cost['wall_with_probes_s']:.1f} s with probes, "
                f"{cost['wall_without_s']:.1f} s without; probes "
                f"{100 * cost['probe_share']:.1f}% of the run by their own time, "
                f"{100 * cost['difference_share']:.1f}% by the difference"
            )
        return
    if args.half_lives:
        for cell, values in half_lives(args.hidden, args.length, args.batch, "float64").items():
            print(cell, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return
    for cell in args.cells:
        for dtype in args.dtypes:
            for k in (5, 0):
                seconds = time_probe(
                    cell, args.hidden, args.length, args.batch, dtype, args.repeat, k
                )
                print(
                    f"{cell:5s} H={args.hidden} T={args.length} B={args.batch} {dtype} "
                    f"lyapunov_k={k}: {seconds * 1000:.0f} ms"
                )


if __name__ == "__main__":
    main()
