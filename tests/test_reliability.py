"""Divergence, interruption and resume, finished-run skipping, damaged checkpoints, and two
processes in one run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from seqtest.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from seqtest.results import LOCK_FILE, RunFolderBusy, read_metrics, read_summary
from seqtest.run import run
from tests.conftest import TINY

NO_PROBE = ("analysis.enabled=false",)


def test_a_blown_up_learning_rate_ends_the_run_as_diverged(make_cfg, tmp_path):
    cfg = make_cfg(
        "model=rnn", "model.activation=relu", "optim=sgd", "optim.lr=1e6", "optim.momentum=0",
        "train.clip=0", "task.length=10", "train.steps=200", "train.eval_every=50", *TINY,
    )  # fmt: skip
    summary = run(cfg, tmp_path)
    assert summary["status"] == "diverged"
    assert summary["nonfinite"] in ("loss", "gradient")
    assert 1 <= summary["diverged_at_step"] <= summary["steps"] < 200
    records = read_metrics(tmp_path)
    assert records[0]["step"] == 0 and records[-1]["step"] == summary["steps"]  # metrics kept
    assert read_summary(tmp_path)["status"] == "diverged"


def _cfg(make_cfg, *extra):
    return make_cfg(
        "task=copying", "task.length=6", "train.steps=60", "train.eval_every=10",
        "analysis.every=20", *TINY, *extra,
    )  # fmt: skip


def test_interrupt_then_resume_equals_an_uninterrupted_run(make_cfg, tmp_path, monkeypatch):
    whole = run(_cfg(make_cfg), tmp_path / "whole")

    import seqtest.run as run_module

    real_train = run_module.train
    steps_seen = {"n": 0}

    def stop_after_27_steps() -> bool:  # mid-interval: step 27 of 60
        steps_seen["n"] += 1
        return steps_seen["n"] >= 27

    def interrupted_train(*args, should_stop, **kwargs):
        return real_train(*args, should_stop=stop_after_27_steps, **kwargs)

    monkeypatch.setattr(run_module, "train", interrupted_train)
    first = run(_cfg(make_cfg), tmp_path / "split")
    monkeypatch.setattr(run_module, "train", real_train)
    assert first["status"] == "interrupted" and first["steps"] == 27
    assert (tmp_path / "split" / CHECKPOINT_FILE).exists()

    resumed = run(_cfg(make_cfg, "resume=true"), tmp_path / "split")
    assert resumed["status"] == whole["status"] and resumed["steps"] == whole["steps"]
    for key in ("final_val_loss", "best_val_loss", "final_val_metric"):
        assert resumed[key] == whole[key], key  # to the bit

    def without_timing(records):
        return [
            {k: v for k, v in r.items() if k not in ("elapsed_s", "probe_seconds")} for r in records
        ]

    assert without_timing(read_metrics(tmp_path / "split")) == without_timing(
        read_metrics(tmp_path / "whole")
    )
    assert resumed["gradients"] == whole["gradients"]  # earlier probes kept across the resume
    assert not (tmp_path / "split" / CHECKPOINT_FILE).exists()  # removed once finished


def test_resume_leaves_a_finished_run_alone(make_cfg, tmp_path):
    first = run(_cfg(make_cfg, *NO_PROBE), tmp_path)
    mtime = (tmp_path / "summary.json").stat().st_mtime_ns
    again = run(_cfg(make_cfg, "resume=true", *NO_PROBE), tmp_path)
    assert again == read_summary(tmp_path) and again["final_val_loss"] == first["final_val_loss"]
    assert (tmp_path / "summary.json").stat().st_mtime_ns == mtime


def test_a_damaged_checkpoint_gives_a_clear_error(make_cfg, tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable seqtest checkpoint"):
        run(_cfg(make_cfg, "resume=true", *NO_PROBE), tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a seqtest checkpoint"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE)


HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.seek(0); handle.truncate(); handle.write(str(os.getpid())); handle.flush()
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="run folders are locked with flock")
def test_a_run_folder_another_live_process_writes_is_refused(make_cfg, tmp_path):
    """What a sweep relaunched into a folder whose old worker still runs would do: the second
    writer stops with a clear error and writes nothing; once the holder ends (here killed,
    as an orphaned worker would be), the folder is free again."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"another process \\(pid {holder.pid}\\)"):
            run(_cfg(make_cfg, *NO_PROBE), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    summary = run(_cfg(make_cfg, *NO_PROBE), tmp_path)
    assert summary["status"] in ("solved", "unsolved") and read_summary(tmp_path) == summary


def test_sigterm_checkpoints_and_a_rerun_finishes_the_job(tmp_path):
    """Kill a real CLI run half-way with SIGTERM, then resume it with the same command."""
    budget = 20000  # far more than the run gets to before the signal
    args = [
        sys.executable, "-m", "seqtest", "task=copying", "task.length=30",
        f"train.steps={budget}", "train.eval_every=50", "analysis.enabled=false",
        "model.hidden_size=16", "train.progress=false", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "metrics.jsonl").exists() or len(read_metrics(tmp_path)) < 3:
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:  # never leave a run behind
            process.kill()
            process.wait()
    summary = read_summary(tmp_path)
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == "SIGTERM"
    assert 100 <= summary["steps"] < budget
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["step"] == summary["steps"]
    resume = [a if not a.startswith("train.steps=") else f"train.steps={summary['steps'] + 20}"
              for a in args]  # fmt: skip
    done = subprocess.run([*resume, "resume=true"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = read_summary(tmp_path)
    assert final["status"] in ("solved", "unsolved") and final["steps"] == summary["steps"] + 20


def test_one_or_two_threads_give_the_same_losses_to_float_precision(
    make_cfg, tmp_path, restore_threads
):
    """Run to run with the same thread count the losses are bitwise equal (tested above);
    across thread counts the kernels order their float32 sums differently, so the losses
    agree to rounding, not bit for bit."""
    losses = {}
    for threads in (1, 2):
        cfg = _cfg(make_cfg, "model=lstm", f"threads={threads}", *NO_PROBE)
        run(cfg, tmp_path / str(threads))
        losses[threads] = [r["val_loss"] for r in read_metrics(tmp_path / str(threads))]
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
