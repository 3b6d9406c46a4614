"""The built wheel installs into a fresh virtual environment and runs both ways."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from seqtest import native

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_from_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist,
       ROOT, cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("seqtest-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "seqtest/conf/config.yaml" in names and "seqtest/conf/task/adding.yaml" in names
    assert "seqtest/tasks/adding.py" in names
    assert "seqtest/loops.cpp" in names  # the compiled loops' source (seqtest.native)
    assert not [n for n in names if n.startswith(("conf/", "tasks/"))]

    venv = tmp_path / "venv"
    # system site-packages spare reinstalling torch; the project itself comes from the wheel
    sh(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    sh(python, "-m", "pip", "install", "--no-deps", "--force-reinstall", wheel, cwd=tmp_path)
    where = sh(python, "-c", "import seqtest; print(seqtest.__file__)", cwd=tmp_path).stdout
    assert str(venv) in where, f"seqtest imported from {where}, not from the venv's wheel"

    quick = ["task=copying", "task.length=3", "train.steps=3", "model.hidden_size=4",
             "train.val_size=8", "train.progress=false"]  # fmt: skip
    for i, command in enumerate([[venv / "bin" / "seqtest"], [python, "-m", "seqtest"]]):
        run_dir = tmp_path / f"run{i}"
        sh(*command, *quick, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert (run_dir / "summary.json").exists()
    if native.toolchain_missing() is None:  # the installed source of the compiled loops builds
        code = "from seqtest import native; native.loops(); print(native.status())"
        env = {**os.environ, "SEQTEST_NATIVE": "require"}
        status = sh(python, "-c", code, cwd=tmp_path, env=env).stdout.strip()
        assert status == "compiled"
