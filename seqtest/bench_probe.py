"""Time one gradient probe, and print the half-lives at initialisation.

    python -m seqtest.bench_probe --cells rnn lstm --hidden 128 --length 200 --batch 64
    python -m seqtest.bench_probe --half-lives --length 100

Each timing is the best of ``--repeat`` probes after one warm-up probe, on one torch thread
by default (``--threads``), with subnormals flushed as `seqtest.run` does.
"""

from __future__ import annotations

import argparse
import time

import torch

from seqtest.gradients import AnalysisConfig, probe
from seqtest.models import build_model
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
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
