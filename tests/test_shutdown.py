"""seqtest's commands skip Python's garbage collections at exit (seqtest.shutdown)."""

from __future__ import annotations

import subprocess
import sys

import pytest

ENTRY_POINTS = {
    "seqtest": "import seqtest.cli",
    "seqtest-report": "from seqtest.report import main; main(['--no-figures', '.'])",
    "seqtest-tasks": "from seqtest.tasks_cli import main; main(['adding'])",
}


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_each_command_freezes_the_objects_once_the_exit_handlers_have_run(command, tmp_path):
    """Runs the `atexit` handlers the command registered and counts the frozen objects:
    none before, hundreds of thousands after (a command that forgot to register leaves 0)."""
    script = (
        "import atexit, gc\n"
        f"{ENTRY_POINTS[command]}\n"
        "before = gc.get_freeze_count()\n"
        "atexit._run_exitfuncs()\n"
        "print(before, gc.get_freeze_count())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split()[-2:])
    assert before == 0 and after > 10_000


def test_registering_twice_registers_once():
    script = (
        "import atexit\n"
        "from seqtest.shutdown import skip_final_collections\n"
        "count = atexit._ncallbacks()\n"
        "skip_final_collections(); skip_final_collections()\n"
        "print(atexit._ncallbacks() - count)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"
