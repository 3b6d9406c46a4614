"""The command line, end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import json
from functools import partial

from seqtest.results import read_summary
from tests.conftest import run_seqtest

QUICK = ["model.hidden_size=4", "train.batch_size=4", "train.val_size=8", "train.progress=false"]


seqtest = partial(run_seqtest, timeout=300)


def test_two_job_multirun_writes_both_runs_and_prints_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    done = seqtest(
        "-m", "model=rnn,gru", "task=copying", "task.length=3", "train.steps=4",
        "train.eval_every=2", f"hydra.sweep.dir={sweep}", *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    models = {read_summary(sweep / str(i))["model"] for i in range(2)}
    assert models == {"rnn", "gru"}
    assert (sweep / "0" / ".hydra" / "overrides.yaml").exists()
    table = done.stdout[done.stdout.index("seqtest sweep") :]
    assert "loss_ratio" in table and "rnn" in table and "gru" in table and "copying" in table


def test_a_bad_value_exits_with_a_clear_message_and_writes_no_results(tmp_path):
    run_dir = tmp_path / "bad"
    done = seqtest("model.hidden_size=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2
    assert "model.hidden_size=0 is invalid: expected a positive integer" in done.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_an_unknown_model_lists_the_available_ones(tmp_path):
    done = seqtest("model=transformer", cwd=tmp_path)
    assert done.returncode != 0
    assert "Could not find 'model/transformer'" in done.stderr
    assert "lstm" in done.stderr and "gru" in done.stderr


def test_analyze_mode_probes_a_fresh_model_and_a_finished_run(tmp_path):
    trained = tmp_path / "trained"
    done = seqtest(
        "model=rnn", "task.length=12", "train.steps=5", "train.eval_every=5",
        f"hydra.run.dir={trained}", *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for source in ([], [f"from_run={trained}"]):
        out = tmp_path / ("from_run" if source else "fresh")
        done = seqtest(
            "mode=analyze", "model=rnn", "task.length=12", *source, f"hydra.run.dir={out}",
            *QUICK, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        digest = json.loads((out / "analysis.json").read_text())
        assert digest["model"] == "rnn" and digest["length"] == 12
        assert digest["grad_decay_rate"] is not None and "grad_half_life" in done.stdout
        assert (out / "gradients.npz").exists() and (out / "grad_profile.png").exists()
        assert not (out / "summary.json").exists()  # nothing was trained
    # the saved run's parameters were probed, not fresh ones
    fresh = json.loads((tmp_path / "fresh" / "analysis.json").read_text())
    saved = json.loads((tmp_path / "from_run" / "analysis.json").read_text())
    assert saved["from_run"] == str(trained) and fresh["from_run"] is None
    assert saved["spectral_radius"] != fresh["spectral_radius"]
