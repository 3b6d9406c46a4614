"""A table of bad values, each through the command line: one clear message naming the field,
the value and what is allowed; exit status 2; no run results written."""

from __future__ import annotations

import sys

import pytest

from seqtest.cli import main

BAD_VALUES = [
    ("task.length=0", "task.length=0 is invalid: expected a positive integer"),
    ("task.length=-5", "task.length=-5 is invalid: expected a positive integer"),
    ("task.placement=middle", "task.placement='middle' is invalid: expected one of halves"),
    ("task=copying task.num_symbols=0", "task.num_symbols=0 is invalid"),
    ("task=copying task.alphabet_size=0", "task.alphabet_size=0 is invalid"),
    ("model.hidden_size=0", "model.hidden_size=0 is invalid: expected a positive integer"),
    ("model.num_layers=-1", "model.num_layers=-1 is invalid"),
    ("model=rnn model.activation=swish", "model.activation='swish' is invalid: expected one of"),
    ("model=lstm model.activation=relu", "model.activation='relu' is invalid: expected tanh"),
    ("model.init_recurrent=zeros", "model.init_recurrent='zeros' is invalid: expected one of"),
    ("model.init_gain=-1", "model.init_gain=-1 is invalid: expected a positive number"),
    ("model.norm=group", "model.norm='group' is invalid: expected one of none, layer, batch"),
    ("model=gru model.norm=layer", "model.norm='layer' is invalid"),
    ("model.leaky_slope=2", "model.leaky_slope=2 is invalid: expected a number in [0, 1)"),
    ("train.steps=0", "train.steps=0 is invalid: expected a positive integer"),
    ("train.batch_size=0", "train.batch_size=0 is invalid"),
    ("train.eval_every=0", "train.eval_every=0 is invalid"),
    ("train.clip=-1", "train.clip=-1 is invalid: expected a number >= 0"),
    ("train.clip_mode=sometimes", "train.clip_mode='sometimes' is invalid: expected one of norm"),
    ("train.checkpoint_every=-10", "train.checkpoint_every=-10 is invalid: expected an integer"),
    ("optim.lr=-0.1", "optim.lr=-0.1 is invalid: expected a positive number"),
    ("optim.lr=0", "optim.lr=0 is invalid: expected a positive number"),
    ("device=tpu", "device='tpu' is invalid: expected one of auto, cpu, cuda"),
    ("tf32=maybe", "tf32='maybe' is invalid: expected true or false"),
    ("mode=serve", "mode='serve' is invalid: expected one of train, analyze"),
    ("analysis.dtype=float16", "analysis.dtype='float16' is invalid: expected one of"),
    ("analysis.every=150", "analysis.every=150 is invalid: expected a multiple of train.eval_"),
    ("model=mlp task=copying", "model='mlp' is invalid: expected a task scored at the last step"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_gets_one_clear_message(overrides, message, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    argv = ["seqtest", *overrides.split(), f"hydra.run.dir={run_dir}", "train.progress=false"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seqtest: configuration error: " + message in err
    assert "Traceback" not in err
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert not written & {"metrics.jsonl", "summary.json", "gradients.npz", "model.pt"}
