"""docs/extending.md, run as written: a task in the user's own module with its YAML in the
user's own config folder, found through `--config-dir` and `_target_`, with no edit to
seqtest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqtest.results import read_summary

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
QUICK = ["model.hidden_size=8", "train.batch_size=8", "train.val_size=32", "train.progress=false"]


def doc_blocks() -> dict[str, str]:
    """The fenced code blocks of the guide whose first line is a comment naming a file."""
    blocks = {}
    for body in re.findall(r"```(?:python|yaml)\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, rest = body.partition("\n")
        match = re.fullmatch(r"# (\S+\.(?:py|yaml))", first.strip())
        if match:
            blocks[match.group(1)] = rest
    return blocks


@pytest.fixture
def project(tmp_path) -> Path:
    """my_project/ as the guide lays it out: the module from the guide's in-tree example,
    moved to my_tasks/echo_task.py, and the YAML files of its out-of-tree section."""
    blocks = doc_blocks()
    assert {"tasks/delayed_echo.py", "my_conf/task/delayed_echo.yaml"} <= set(blocks)
    root = tmp_path / "my_project"
    files = {"my_tasks/echo_task.py": blocks["tasks/delayed_echo.py"]}
    files |= {path: text for path, text in blocks.items() if path.startswith("my_conf/")}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def run(root: Path, *args: str, module: str = "seqtest") -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(root / "my_tasks"), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=root, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip


def test_out_of_tree_task_runs_through_the_cli(project):
    done = run(
        project, "--config-dir", str(project / "my_conf"), "task=delayed_echo",
        "task.length=20", "train.steps=20", "hydra.run.dir=runs/echo", *QUICK,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(project / "runs" / "echo")
    assert summary["task"] == "delayed_echo" and summary["length"] == 20
    assert summary["steps"] == 20 and summary["baseline_loss"] == pytest.approx(1 / 12)
    # seqtest itself was not touched: the task is not among the shipped ones
    import seqtest

    assert not (Path(seqtest.__file__).parent / "tasks" / "delayed_echo.py").exists()


@pytest.mark.slow
def test_out_of_tree_experiment_preset(project):
    assert (project / "my_conf" / "experiment" / "echo_short.yaml").exists()
    done = run(
        project, "--config-dir", str(project / "my_conf"), "experiment=echo_short",
        "hydra.run.dir=runs/exp", *QUICK,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(project / "runs" / "exp")
    assert summary["task"] == "delayed_echo" and summary["model"] == "gru"
    assert summary["length"] == 30 and summary["steps"] == 20


def test_tasks_listing_imports_an_out_of_tree_module(project):
    done = run(project, "--import", "echo_task", "delayed_echo", module="seqtest.tasks_cli")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("delayed_echo  (echo_task.DelayedEchoTask)")
    assert "Var[U(0,1)] = 1/12" in done.stdout and "length: int" in done.stdout


def test_a_name_clash_with_a_shipped_task_is_reported(project):
    module = project / "my_tasks" / "echo_task.py"
    module.write_text(
        module.read_text().replace('register_task("delayed_echo")', 'register_task("adding")')
    )
    done = run(project, "--import", "echo_task", module="seqtest.tasks_cli")
    assert done.returncode == 2
    assert "registered twice" in done.stderr
    assert "echo_task.py" in done.stderr and "adding.py" in done.stderr
