"""The report over folders of runs: grouping, statistics, failed runs, files, speed, the CLI and
the multirun callback. Runs are synthetic folders in the run-folder format, except in the
slow end-to-end tests."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from seqtest import report as rp
from seqtest.callbacks import SweepTable, sweep_rows
from seqtest.results import write_json, write_jsonl
from tests.conftest import run_seqtest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = [
    "report_curves.png", "report_length.png", "report_gradient_decay.png", "report_half_life.png",
]  # fmt: skip


# ---------------------------------------------------------------------------------- helpers


def write_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    summary: dict | None = None,
    metrics: list[dict] | None = None,
    gradients: dict | None = None,
) -> Path:
    """A run folder as `seqtest` leaves it (only the parts given)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        write_json(run_dir / "summary.json", summary)
    if metrics is not None:
        write_jsonl(run_dir / "metrics.jsonl", metrics)
    if gradients is not None:
        np.savez(run_dir / "gradients.npz", **gradients)
    return run_dir


def synthetic_run(
    run_dir: Path,
    *,
    model: str,
    length: int,
    seed: int,
    rng: np.random.Generator,
    task: str = "adding",
    extra: tuple[str, ...] = (),
    steps: int = 1000,
    eval_every: int = 100,
    probes: int = 3,
) -> dict:
    """A complete run with summary, metrics and gradients; returns its summary."""
    baseline = 1 / 6
    ratio = float(rng.uniform(0.001, 1.2))
    solved = ratio < 0.06
    solved_at = int(rng.integers(1, steps // eval_every)) * eval_every if solved else None
    half_life = {"init": float(rng.uniform(2, 20)), "final": float(rng.uniform(5, 60))}
    summary = {
        "task": task, "model": model, "length": length, "seed": seed,
        "status": "solved" if solved else "unsolved", "steps": solved_at or steps,
        "final_val_loss": ratio * baseline, "baseline_loss": baseline, "loss_ratio": ratio,
        "solved_at_step": solved_at, "wall_time_s": float(rng.uniform(10, 100)),
        "gradients": {w: {"half_life": h, "decay_rate": math.log(2) / h, "top_lyapunov": None,
                          "saturation": 0.1} for w, h in half_life.items()},
    }  # fmt: skip
    last = solved_at or steps
    metrics = [
        {"step": s, "train_loss": None if s == 0 else baseline,
         "val_loss": baseline * (1.1 - s / last * (1.1 - ratio)),
         "val_metric": None, "grad_norm": 1.0, "elapsed_s": s / 50}
        for s in range(0, last + 1, eval_every)
    ]  # fmt: skip
    distance = np.arange(length)[::-1]
    lives = np.linspace(half_life["init"], half_life["final"], probes)
    h_grad = np.stack([np.exp(-distance * math.log(2) / h)[None, :] for h in lives])
    gradients = {
        "steps": np.linspace(0, last, probes).astype(int),
        "h_grad": h_grad,
        "half_life": lives[:, None],
        "decay_rate": math.log(2) / lives[:, None],
    }
    overrides = [f"model={model}", f"task={task}", f"task.length={length}", f"seed={seed}", *extra]
    write_run(run_dir, overrides, summary, metrics, gradients)
    return summary


def synthetic_sweep(root: Path, models, lengths, seeds, rng, **kwargs) -> dict[tuple, list[dict]]:
    """A multirun folder with jobs numbered as Hydra numbers them; summaries by (model, length)."""
    expected: dict[tuple, list[dict]] = {}
    job = 0
    for model in models:
        for length in lengths:
            for seed in seeds:
                summary = synthetic_run(
                    root / str(job), model=model, length=length, seed=seed, rng=rng, **kwargs
                )
                expected.setdefault((model, length), []).append(summary)
                job += 1
    return expected


def row_for(report: rp.Report, model: str, length: int) -> dict:
    [row] = [r for r in report.rows if r["model"] == model and r["length"] == length]
    return row


# ------------------------------------------------------------------------------ aggregation


def test_groups_by_overrides_minus_seed_and_recomputes_the_statistics(tmp_path):
    rng = np.random.default_rng(0)
    expected = synthetic_sweep(tmp_path, ["rnn", "lstm"], [50, 100], [0, 1, 2], rng)
    report = rp.write_report(tmp_path)

    assert len(report.runs) == 12 and len(report.rows) == 4
    assert [(r["model"], r["length"]) for r in report.rows] == [
        ("rnn", 50), ("rnn", 100), ("lstm", 50), ("lstm", 100),
    ]  # fmt: skip
    for (model, length), summaries in expected.items():
        row = row_for(report, model, length)
        ratios = np.array([s["loss_ratio"] for s in summaries])
        solved = [s for s in summaries if s["status"] == "solved"]
        assert row["runs"] == 3 and row["failed"] == 0 and row["finished"] == 3
        assert row["solved_fraction"] == pytest.approx(len(solved) / 3)
        assert row["loss_ratio_mean"] == pytest.approx(ratios.mean())
        assert row["loss_ratio_std"] == pytest.approx(ratios.std(ddof=1))
        if solved:
            assert row["steps_to_solve_median"] == np.median([s["solved_at_step"] for s in solved])
        else:
            assert row["steps_to_solve_median"] is None
        for when in ("init", "final"):
            halves = [s["gradients"][when]["half_life"] for s in summaries]
            assert row[f"half_life_{when}"] == pytest.approx(np.median(halves))
        assert row["wall_time_s"] == pytest.approx(np.mean([s["wall_time_s"] for s in summaries]))

    with open(tmp_path / "report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    for line in table:
        row = row_for(report, line["model"], int(line["length"]))
        assert float(line["loss_ratio_mean"]) == pytest.approx(row["loss_ratio_mean"])
        assert "seed=" not in line["config"] and f"model={line['model']}" in line["config"]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.count("\n| adding | ") == 4
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in markdown
    with open(tmp_path / "report_runs.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 12


def test_a_seed_given_with_plus_is_still_left_out_of_the_configuration(tmp_path):
    rng = np.random.default_rng(1)
    for seed in (0, 1):
        synthetic_run(tmp_path / str(seed), model="gru", length=20, seed=seed, rng=rng)
        overrides = tmp_path / str(seed) / ".hydra" / "overrides.yaml"
        overrides.write_text(yaml.safe_dump(["model=gru", "task.length=20", f"+seed={seed}"]))
    report = rp.build_report(tmp_path)
    assert len(report.groups) == 1 and report.rows[0]["runs"] == 2


def test_runtime_keys_are_left_out_of_the_configuration_and_real_keys_are_not(tmp_path):
    """A seed resumed or run with one thread counts with its configuration's other seeds; a
    different step budget is a different configuration."""
    rng = np.random.default_rng(17)
    synthetic_run(tmp_path / "0", model="lstm", length=30, seed=0, rng=rng)
    synthetic_run(
        tmp_path / "1", model="lstm", length=30, seed=1, rng=rng,
        extra=("threads=1", "train.progress=False", "resume=True", "train.checkpoint_every=50"),
    )  # fmt: skip
    synthetic_run(tmp_path / "2", model="lstm", length=30, seed=2, rng=rng, extra=("threads=1",))
    synthetic_run(
        tmp_path / "3", model="lstm", length=30, seed=3, rng=rng, extra=("train.steps=500",)
    )
    report = rp.build_report(tmp_path)
    assert [g.key for g in report.groups] == [
        ("model=lstm", "task.length=30", "task=adding"),
        ("model=lstm", "task.length=30", "task=adding", "train.steps=500"),
    ]
    assert [row["runs"] for row in report.rows] == [3, 1]


def test_several_folders_make_one_report_with_the_seeds_of_each_configuration_together(tmp_path):
    rng = np.random.default_rng(18)
    first = synthetic_sweep(tmp_path / "seed0", ["rnn", "gru"], [10, 20], [0], rng)
    later = synthetic_sweep(
        tmp_path / "seeds12", ["gru", "rnn"], [20, 10], [1, 2], rng, extra=("threads=1",)
    )
    out = tmp_path / "combined"
    report = rp.write_report([tmp_path / "seed0", tmp_path / "seeds12"], out, figures=False)

    assert len(report.runs) == 12 and len(report.rows) == 4
    assert report.runs[0].name == "seed0/0" and report.runs[-1].name == "seeds12/7"
    for (model, length), summaries in first.items():
        ratios = [s["loss_ratio"] for s in summaries + later[(model, length)]]
        row = row_for(report, model, length)
        assert row["runs"] == 3
        assert row["loss_ratio_mean"] == pytest.approx(np.mean(ratios))
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.md", "report_runs.csv"]
    assert not (tmp_path / "seed0" / "report.md").exists()
    markdown = (out / "report.md").read_text()
    assert f"`{tmp_path / 'seed0'}`, `{tmp_path / 'seeds12'}`" in markdown.splitlines()[0]

    with pytest.raises(ValueError, match="out_dir"):
        rp.build_report([tmp_path / "seed0", tmp_path / "seeds12"])


def test_runs_of_folders_with_the_same_name_keep_apart(tmp_path):
    """Two sweeps both called `sweep`: each run is named after the fewest trailing parts of
    its folder's path that differ; a folder given twice keeps its whole path."""
    rng = np.random.default_rng(5)
    synthetic_sweep(tmp_path / "a" / "sweep", ["rnn"], [10], [0], rng)
    synthetic_sweep(tmp_path / "b" / "sweep", ["rnn"], [10], [1], rng)
    report = rp.build_report([tmp_path / "a" / "sweep", tmp_path / "b" / "sweep"], tmp_path)
    assert [run.name for run in report.runs] == ["a/sweep/0", "b/sweep/0"]
    assert rp.folder_labels([Path("x"), tmp_path / "a" / "sweep"]) == ["x", "sweep"]
    same = rp.folder_labels([tmp_path / "a", tmp_path / "a"])
    assert same == [str((tmp_path / "a").resolve())] * 2


def test_the_label_names_only_overrides_that_differ_and_are_not_own_columns(tmp_path):
    rng = np.random.default_rng(2)
    for job, hidden in enumerate((32, 64)):
        synthetic_run(
            tmp_path / str(job), model="lstm", length=30, seed=0, rng=rng,
            extra=(f"model.hidden_size={hidden}", "train.steps=500"),
        )  # fmt: skip
    report = rp.build_report(tmp_path)
    assert [g.label for g in report.groups] == ["model.hidden_size=32", "model.hidden_size=64"]
    assert "train.steps=500" in report.common_overrides
    assert "model.hidden_size=32" in report.text()


# ----------------------------------------------------------------------------- failed runs


def test_a_corrupted_summary_and_a_run_killed_half_way_are_listed_as_failed(tmp_path):
    rng = np.random.default_rng(3)
    expected = synthetic_sweep(tmp_path, ["rnn"], [40], [0, 1, 2, 3], rng)
    (tmp_path / "1" / "summary.json").write_text('{"task": "adding", "model": "rn')  # cut
    (tmp_path / "2" / "summary.json").unlink()  # killed: metrics but no summary ...
    metrics = (tmp_path / "2" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "2" / "metrics.jsonl").write_text("\n".join(metrics[:4]) + "\n" + metrics[4][:25])

    report = rp.write_report(tmp_path, figures=False)
    failed = {r.name: r.reason for r in report.failed}
    assert set(failed) == {"1", "2"}
    assert failed["1"].startswith("summary.json unreadable")
    assert failed["2"] == "no summary.json; metrics stop at step 300"
    assert any("cut or corrupted" in note for note in report.runs[2].notes)

    [row] = report.rows
    assert (row["runs"], row["failed"], row["finished"]) == (4, 2, 2)
    kept = [expected[("rnn", 40)][i]["loss_ratio"] for i in (0, 3)]
    assert row["loss_ratio_mean"] == pytest.approx(np.mean(kept))
    assert "2 failed" in row["statuses"]
    text = report.text()
    assert "failed runs (2):" in text and "summary.json unreadable" in text
    markdown = (tmp_path / "report.md").read_text()
    assert "## Failed runs (2)" in markdown and "metrics stop at step 300" in markdown
    # the per-run table of a multirun says the same, with seed and model from Hydra's record
    rows = {r["run"]: r for r in sweep_rows(tmp_path)}
    assert rows["2"]["status"].startswith("failed (no summary.json")
    assert rows["2"]["seed"] == "2" and rows["0"]["status"] in ("solved", "unsolved")


def test_a_run_that_wrote_nothing_reports_the_error_from_its_log(tmp_path):
    run = tmp_path / "0"
    write_run(run, overrides=["train.steps=0"])
    (run / "cli.log").write_text(
        "[2026-01-01 00:00:00,000][seqtest][ERROR] - configuration error: "
        "train.steps=0 is invalid\n"
    )
    (run / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"seed": 5,
                        "task": {"_target_": "seqtest.tasks.adding.AddingTask", "length": 9},
                        "model": {"name": "gru", "cell": "gru"}})
    )  # fmt: skip
    report = rp.build_report(tmp_path)
    [only] = report.runs
    assert only.reason == (
        "no summary.json, no metrics.jsonl; log: configuration error: train.steps=0 is invalid"
    )
    assert (only.get("task"), only.get("model"), only.get("length"), only.seed) == (
        "adding",
        "gru",
        9,
        5,
    )
    assert report.rows[0]["solved_fraction"] is None and report.rows[0]["loss_ratio_mean"] is None


def test_diverged_and_interrupted_runs_are_counted_as_such(tmp_path):
    rng = np.random.default_rng(4)
    expected = synthetic_sweep(tmp_path, ["rnn"], [60], [0, 1, 2, 3], rng)
    diverged = dict(expected[("rnn", 60)][1], status="diverged", loss_ratio=float("nan"),
                    final_val_loss=float("inf"), solved_at_step=None)  # fmt: skip
    write_json(tmp_path / "1" / "summary.json", diverged)  # written as "nan" / "inf" strings
    interrupted = dict(expected[("rnn", 60)][2], status="interrupted", solved_at_step=None)
    write_json(tmp_path / "2" / "summary.json", interrupted)
    futuristic = dict(expected[("rnn", 60)][3], status="timed_out", solved_at_step=None)
    write_json(tmp_path / "3" / "summary.json", futuristic)
    # a diverged run whose loss overflowed to a finite number: left out of the mean as well
    blown = dict(
        expected[("rnn", 60)][0], status="diverged", loss_ratio=4.5e32, solved_at_step=None
    )
    write_run(tmp_path / "4", ["model=rnn", "task=adding", "task.length=60", "seed=4"], blown)

    [row] = rp.build_report(tmp_path).rows
    first = expected[("rnn", 60)][0]
    assert row["statuses"] == f"1 {first['status']}, 2 diverged, 1 interrupted, 1 timed_out"
    assert row["finished"] == 4 and row["failed"] == 0
    assert row["solved_fraction"] == pytest.approx((first["status"] == "solved") / 4)
    assert row["loss_ratio_n"] == 2  # the diverged runs are left out, the interrupted one too
    assert row["loss_ratio_mean"] == pytest.approx(
        np.mean([first["loss_ratio"], futuristic["loss_ratio"]])
    )


def test_a_broken_gradients_file_is_a_note_not_a_failure(tmp_path):
    rng = np.random.default_rng(5)
    synthetic_run(tmp_path / "0", model="gru", length=30, seed=0, rng=rng)
    (tmp_path / "0" / "gradients.npz").write_bytes(b"PK\x03\x04 not really a zip")
    report = rp.write_report(tmp_path)
    assert not report.failed
    assert "gradients.npz unreadable" in report.runs[0].notes[0]
    assert not (tmp_path / "report_gradient_decay.png").exists()


# ------------------------------------------------------------------ shapes of the input folder


def test_gradients_come_from_the_npz_file_when_the_summary_has_none(tmp_path):
    rng = np.random.default_rng(6)
    synthetic_run(tmp_path / "0", model="rnn", length=50, seed=0, rng=rng)
    summary = rp.load_run(tmp_path / "0").summary
    del summary["gradients"]
    write_json(tmp_path / "0" / "summary.json", summary)
    grads = dict(np.load(tmp_path / "0" / "gradients.npz"))
    grads["half_life"] = np.array([[7.0], [np.nan], [np.nan]])  # none at the end: no decay
    grads["decay_rate"] = np.array([[0.099], [0.0], [-0.01]])
    np.savez(tmp_path / "0" / "gradients.npz", **grads)

    report = rp.build_report(tmp_path)
    [row] = report.rows
    assert row["half_life_init"] == 7.0
    assert row["half_life_final"] is None and row["half_life_final_none"] == 1
    shown, _ = rp.display_rows(report.rows)
    assert (shown[0]["half-life init"], shown[0]["half-life final"]) == ("7", "none")


def test_a_half_life_with_nothing_to_fit_is_not_called_no_decay(tmp_path):
    """A task scored at every step has no step before the first scored one: no fit at all."""
    rng = np.random.default_rng(17)
    summary = synthetic_run(tmp_path / "0", model="lstm", length=30, seed=0, rng=rng)
    empty = {"half_life": None, "decay_rate": None, "top_lyapunov": -0.2}
    write_json(
        tmp_path / "0" / "summary.json", dict(summary, gradients={"init": empty, "final": empty})
    )
    [row] = rp.build_report(tmp_path).rows
    assert (row["half_life_init"], row["half_life_init_none"], row["half_life_init_no_fit"]) == (
        None,
        0,
        1,
    )
    shown, _ = rp.display_rows([row])
    assert shown[0]["half-life init"] == shown[0]["half-life final"] == "n/a"


def test_runs_without_hydra_records_are_grouped_by_their_summary(tmp_path):
    rng = np.random.default_rng(7)
    for seed in (0, 1):
        summary = synthetic_run(
            tmp_path / f"run{seed}", model="lstm", length=25, seed=seed, rng=rng
        )
        (tmp_path / f"run{seed}" / ".hydra" / "overrides.yaml").unlink()
        (tmp_path / f"run{seed}" / ".hydra").rmdir()
        assert summary["seed"] == seed
    report = rp.build_report(tmp_path)
    assert [g.key for g in report.groups] == [("task=adding", "model=lstm", "length=25")]
    assert report.rows[0]["runs"] == 2


def test_a_single_run_folder_and_nested_sweeps(tmp_path):
    rng = np.random.default_rng(8)
    synthetic_sweep(tmp_path / "a" / "sweep", ["rnn"], [10], [0, 1], rng)
    synthetic_sweep(tmp_path / "b" / "deeper" / "sweep", ["rnn", "gru"], [10], [2], rng)

    single = rp.write_report(tmp_path / "a" / "sweep" / "1", figures=False)
    assert [r.name for r in single.runs] == ["."] and (tmp_path / "a/sweep/1/report.md").exists()

    nested = rp.build_report(tmp_path)
    assert [r.name for r in nested.runs] == [
        "a/sweep/0",
        "a/sweep/1",
        "b/deeper/sweep/0",
        "b/deeper/sweep/1",
    ]
    assert [(r["model"], r["runs"]) for r in nested.rows] == [("rnn", 3), ("gru", 1)]


def test_the_report_can_be_written_elsewhere_and_without_figures(tmp_path):
    rng = np.random.default_rng(9)
    synthetic_sweep(tmp_path / "sweep", ["rnn"], [10, 20], [0], rng)
    report = rp.write_report(tmp_path / "sweep", tmp_path / "out", figures=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.csv", "report.md", "report_runs.csv",
    ]  # fmt: skip
    assert not (tmp_path / "sweep" / "report.md").exists() and len(report.rows) == 2


def test_report_files_get_the_usual_permissions(tmp_path):
    rng = np.random.default_rng(16)
    synthetic_sweep(tmp_path, ["rnn"], [10, 20], [0], rng)
    previous = os.umask(0o022)
    try:
        report = rp.write_report(tmp_path)
    finally:
        os.umask(previous)
    assert report.files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in report.files)
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".report*"))


def test_an_empty_folder_writes_nothing(tmp_path):
    report = rp.write_report(tmp_path)
    assert report.runs == [] and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- speed, CLI


def test_a_hundred_runs_are_reported_in_seconds(tmp_path):
    rng = np.random.default_rng(10)
    synthetic_sweep(
        tmp_path, ["rnn", "lstm", "gru", "irnn", "rnn_relu"], [50, 100, 200, 400], range(5), rng,
        steps=3000, probes=5,
    )  # fmt: skip
    started = time.perf_counter()
    report = rp.write_report(tmp_path)
    seconds = time.perf_counter() - started
    print(
        f"\n100 synthetic runs (30 evaluations, 5 gradient probes each): report in {seconds:.2f} s"
    )
    assert len(report.runs) == 100 and len(report.rows) == 20
    assert all((tmp_path / name).exists() for name in FIGURES)


def test_main_prints_the_report_and_returns_its_status(tmp_path, capsys):
    rng = np.random.default_rng(11)
    synthetic_sweep(tmp_path / "sweep", ["rnn", "gru"], [10], [0, 1], rng)
    assert rp.main([str(tmp_path / "sweep"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "seqtest report" in out and "4 runs, 2 configurations" in out and "report.md" in out

    (tmp_path / "empty").mkdir()
    assert rp.main([str(tmp_path / "empty")]) == 1
    assert "no run folders" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        rp.main([str(tmp_path / "missing")])
    assert stop.value.code == 2

    synthetic_sweep(tmp_path / "other", ["rnn"], [10], [2], rng)
    with pytest.raises(SystemExit) as stop:
        rp.main([str(tmp_path / "sweep"), str(tmp_path / "other")])
    assert stop.value.code == 2 and "--out is required" in capsys.readouterr().err
    both = [str(tmp_path / "sweep"), str(tmp_path / "other"), "--out", str(tmp_path / "both")]
    assert rp.main([*both, "--no-figures"]) == 0
    assert "5 runs, 2 configurations" in capsys.readouterr().out
    assert (tmp_path / "both" / "report.md").exists()


def test_the_module_runs_as_a_script(tmp_path):
    rng = np.random.default_rng(12)
    synthetic_sweep(tmp_path, ["lstm"], [10], [0], rng)
    done = subprocess.run(
        [sys.executable, "-m", "seqtest.report", str(tmp_path), "--no-figures"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "lstm" in done.stdout and (tmp_path / "report.csv").exists()


# -------------------------------------------------------------------------------- callback


def sweep_config(sweep_dir: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})


def test_the_callback_prints_the_job_table_and_writes_the_report(tmp_path, capsys):
    rng = np.random.default_rng(13)
    synthetic_sweep(tmp_path, ["rnn", "gru"], [10], [0], rng)
    callback = SweepTable()
    callback.on_multirun_start(sweep_config(tmp_path))
    callback.on_multirun_end(sweep_config(tmp_path))
    out = capsys.readouterr().out
    table = out[out.index("seqtest sweep") :]
    for column in ("task", "model", "length", "seed", "status", "loss_ratio", "solved_at_step"):
        assert column in table.splitlines()[1]
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.csv").exists()
    callback._at_exit()  # the sweep ended normally: nothing more at exit
    assert capsys.readouterr().out == ""


def test_the_callback_reports_at_exit_when_the_sweep_stopped_early(tmp_path, capsys):
    rng = np.random.default_rng(14)
    synthetic_sweep(tmp_path, ["rnn"], [10], [0], rng)
    write_run(tmp_path / "1", overrides=["model=gru", "seed=0"])  # a job that died at start
    callback = SweepTable(figures=False)
    callback.on_multirun_start(sweep_config(tmp_path))
    callback._at_exit()  # what atexit runs when a job's exception ends the multirun
    out = capsys.readouterr().out
    assert "stopped early" in out and "failed (no summary.json, no metrics.jsonl)" in out
    assert "1: no summary.json" in (tmp_path / "report.md").read_text().replace("`", "")


def test_the_callback_never_raises(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(15)
    synthetic_sweep(tmp_path, ["rnn"], [10], [0], rng)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("seqtest.callbacks.write_report", broken)
    SweepTable().on_multirun_end(sweep_config(tmp_path))
    assert "could not write the report" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end (slow)

QUICK = ["model.hidden_size=4", "train.batch_size=4", "train.val_size=8", "train.progress=false",
         "threads=1"]  # fmt: skip


seqtest = run_seqtest


@pytest.mark.slow
def test_a_real_multirun_leaves_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    done = seqtest(
        "-m", "model=rnn,gru", "task=copying", "task.length=3", "train.steps=4",
        "train.eval_every=2", f"hydra.sweep.dir={sweep}", *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "seqtest sweep" in done.stdout and "seqtest report" in done.stdout
    with open(sweep / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["model"] for r in rows) == ["gru", "rnn"]
    assert all(r["runs"] == "1" and r["failed"] == "0" for r in rows)
    assert "| copying | rnn | 3 |" in (sweep / "report.md").read_text()
    assert (sweep / "report_curves.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_a_multirun_with_a_failing_job_still_leaves_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    done = seqtest(
        "-m", "train.steps=2,0", "task.length=3", "train.eval_every=1",
        f"hydra.sweep.dir={sweep}", *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode != 0
    markdown = (sweep / "report.md").read_text()
    assert "## Failed runs (1)" in markdown and "train.steps=0 is invalid" in markdown
    assert "stopped early" in done.stdout


def test_a_diverging_curve_does_not_flatten_the_others(tmp_path):
    from seqtest.report_plots import CURVE_CEILING, curves_figure

    rng = np.random.default_rng(19)
    synthetic_sweep(tmp_path / "calm", ["lstm", "gru"], [20], [0], rng)
    [calm_ax] = curves_figure(rp.build_report(tmp_path / "calm")).axes
    assert calm_ax.get_ylim()[1] < 10 and not calm_ax.texts

    synthetic_sweep(tmp_path / "wild", ["lstm", "gru"], [20], [0], rng)
    metrics = tmp_path / "wild" / "1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[2]["val_loss"] = 1e30
    write_jsonl(metrics, records)
    [wild_ax] = curves_figure(rp.build_report(tmp_path / "wild")).axes
    assert wild_ax.get_ylim()[1] == CURVE_CEILING
    assert "highest 6e+30 x" in wild_ax.texts[0].get_text()  # 1e30 / baseline 1/6


def test_lyapunov_exponent_and_saturation_are_medians_over_seeds(tmp_path):
    rng = np.random.default_rng(7)
    digests = {0: (-0.5, 0.1), 1: (-0.3, 0.4), 2: (-0.1, 0.2)}
    for seed, (lyapunov, saturation) in digests.items():
        summary = synthetic_run(tmp_path / str(seed), model="rnn", length=20, seed=seed, rng=rng)
        summary["gradients"]["final"] |= {"top_lyapunov": lyapunov, "saturation": saturation}
        (tmp_path / str(seed) / "summary.json").write_text(json.dumps(summary))
    report = rp.write_report(tmp_path, figures=False)
    row = row_for(report, "rnn", 20)
    assert row["top_lyapunov_final"] == pytest.approx(-0.3)
    assert row["saturation_final"] == pytest.approx(0.2)
    assert row["top_lyapunov_init"] is None  # every run's digest holds None there
    assert "lyapunov final" in (tmp_path / "report.md").read_text()
