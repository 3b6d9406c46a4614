"""The benchmark's records: a tiny grid, schema only (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from seqtest import bench

STEP_FIELDS = {
    "kind": str, "model": str, "B": int, "T": int, "H": int, "seqtest_ms": float,
    "reference_ms": float, "ratio": float, "reference": str, "target_of": str,
    "target_ms": float, "target_ratio": float, "target": float,
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
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    assert json.loads(path.read_text()) == records


def test_main_writes_json(tmp_path):
    path = tmp_path / "out.json"
    threads = torch.get_num_threads()
    try:
        records = bench.main(
            [
                "--quick",
                "--only",
                "steps",
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
    finally:
        torch.set_num_threads(threads)
    written = json.loads(path.read_text())
    assert [r["kind"] for r in written] == ["machine", "step"]
    assert written[1]["model"] == "rnn" and len(written) == len(records)


@pytest.mark.parametrize("name", sorted({r[0] for r in bench.REFERENCES.values()}))
def test_references_learn_the_same_shapes(name):
    """Every reference core maps [B, T, 2] to the last hidden state [B, H]."""
    core = bench.reference_core(name, 2, 8)
    x, y = bench.adding_batch(3, 6, torch.Generator().manual_seed(0))
    assert x.shape == (3, 6, 2) and y.shape == (3,)
    assert core(x).shape == (3, 8)
