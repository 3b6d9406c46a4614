"""Launcher presets (conf/hydra/launcher/) and sweeps through the joblib and submitit launchers.

The presets extend the plugins' own configs, so these tests need the `sweeps` extra
(hydra-joblib-launcher, hydra-submitit-launcher) and are skipped without it. The SLURM preset
cannot submit here; it is checked by composing it, by rendering its sbatch script with
submitit, and by running a sweep through the same launcher code with submitit's local executor
(`hydra/launcher=slurm_local`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from seqtest.results import read_summary
from tests.conftest import run_seqtest

LAUNCHERS = Path(__file__).resolve().parents[1] / "conf" / "hydra" / "launcher"
PRESETS = sorted(p.stem for p in LAUNCHERS.glob("*.yaml"))
SHARED = ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb")
QUICK = ["task=copying", "task.length=3", "train.steps=4", "train.eval_every=2",
         "model.hidden_size=4", "train.batch_size=4", "train.val_size=8",
         "train.progress=false"]  # fmt: skip


def submitit_plugin():
    return pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def launcher_config(*overrides: str):
    with initialize_config_module(config_module="seqtest.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


# ------------------------------------------------------------------------------ presets (fast)


def test_the_presets_are_there():
    assert {"slurm", "slurm_local"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_launcher_preset_composes_onto_its_plugin_config(preset):
    submitit_plugin()
    launcher = launcher_config(f"hydra/launcher={preset}")
    assert launcher._target_.startswith("hydra_plugins.")
    for key in SHARED:  # the plugin's keys, with our values merged in
        assert key in launcher


def test_the_slurm_preset_extends_the_plugin_config():
    submitit_plugin()
    launcher = launcher_config("hydra/launcher=slurm", "hydra.launcher.partition=cpu")
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("cpu", 240, 1)
    assert launcher.signal_delay_s == 120  # the plugin's own default, kept
    with pytest.raises(ConfigCompositionException, match="partiton"):  # typos are errors
        launcher_config("hydra/launcher=slurm", "hydra.launcher.partiton=cpu")


def test_the_local_preset_shares_the_slurm_settings():
    submitit_plugin()
    slurm = launcher_config("hydra/launcher=slurm")
    local = launcher_config("hydra/launcher=slurm_local")
    assert local._target_.endswith("submitit_launcher.LocalLauncher")
    assert {k: local[k] for k in SHARED} == {k: slurm[k] for k in SHARED}


def test_the_slurm_preset_renders_an_sbatch_script(tmp_path, monkeypatch):
    """What the launcher hands to submitit, rendered by submitit itself (as SlurmLauncher does)."""
    submitit_plugin()
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    bin_dir = tmp_path / "bin"  # submitit checks that srun exists; nothing is submitted
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    launcher = launcher_config(
        "hydra/launcher=slurm", "hydra.launcher.partition=cpu", f"hydra.sweep.dir={tmp_path}"
    )
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=params.pop("submitit_folder"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m seqtest", "0")
    for line in ("--partition=cpu", "--time=240", "--cpus-per-task=1", "--mem=4GB"):
        assert f"#SBATCH {line}\n" in script
    assert "--gpus" not in script


def test_the_joblib_launcher_takes_its_job_count():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = launcher_config("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


# ------------------------------------------------------------------------------- sweeps (slow)


seqtest = run_seqtest


def assert_two_job_sweep_reported(sweep: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert {read_summary(sweep / str(i))["model"] for i in range(2)} == {"rnn", "gru"}
    with open(sweep / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["model"] for r in rows) == ["gru", "rnn"]
    assert all(r["failed"] == "0" for r in rows)
    assert "## Failed runs" not in (sweep / "report.md").read_text()
    assert "seqtest sweep" in done.stdout and "seqtest report" in done.stdout


@pytest.mark.slow
def test_a_joblib_sweep_runs_jobs_side_by_side_and_leaves_its_report(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    done = seqtest(
        "-m", "model=rnn,gru", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}", *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert_two_job_sweep_reported(sweep, done)


def test_the_process_that_launches_a_joblib_sweep_never_imports_torch(tmp_path):
    """Only the jobs need torch: the launching process composes the sweep, waits and writes
    the report without it (about 2 s less before the first job starts). A callback of the
    sweep, run in that process after the jobs, records what it imported."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    (tmp_path / "import_check.py").write_text(
        textwrap.dedent(
            """
            import json, os, sys
            from hydra.experimental.callback import Callback

            class ImportCheck(Callback):
                def on_multirun_end(self, config, **kwargs):
                    seen = {"pid": os.getpid(), "torch": "torch" in sys.modules}
                    with open("launcher_imports.json", "w") as out:
                        json.dump(seen, out)
            """
        )
    )
    sweep = tmp_path / "sweep"
    done = seqtest(
        "-m", "model=rnn,gru", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "+hydra.callbacks.import_check._target_=import_check.ImportCheck",
        f"hydra.sweep.dir={sweep}", *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "launcher_imports.json").read_text())
    assert seen["torch"] is False
    assert read_summary(sweep / "0")["status"] and read_summary(sweep / "1")["status"]


@pytest.mark.slow
def test_a_sweep_through_the_slurm_code_path_on_this_machine(tmp_path):
    submitit_plugin()
    sweep = tmp_path / "sweep"
    done = seqtest(
        "-m", "model=rnn,gru", "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}",
        *QUICK, cwd=tmp_path,
    )  # fmt: skip
    assert_two_job_sweep_reported(sweep, done)
    assert (sweep / ".submitit").is_dir()  # submitit's own records sit beside the runs


JOB_APP = textwrap.dedent(
    """
    import json, os
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def main(cfg):
        launcher = HydraConfig.get().launcher
        seen = {"n_jobs": launcher.get("n_jobs"), "cpus_per_task": launcher.get("cpus_per_task"),
                "pid": os.getpid()}
        with open(os.path.join(HydraConfig.get().runtime.output_dir, "seen.json"), "w") as f:
            json.dump(seen, f)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, plugin, key, value",
    [
        ("joblib", "hydra_joblib_launcher", "n_jobs", 2),
        ("submitit_local", "hydra_submitit_launcher", "cpus_per_task", 1),
    ],
)
def test_a_job_sees_its_launcher_settings_through_hydra_config(
    tmp_path, launcher, plugin, key, value
):
    """`HydraConfig.get().launcher.<key>` inside a job: what sizes its share of the cores."""
    pytest.importorskip(f"hydra_plugins.{plugin}")
    (tmp_path / "app.py").write_text(JOB_APP)
    done = subprocess.run(
        [sys.executable, "app.py", "-m", "+x=1,2", f"hydra/launcher={launcher}",
         f"hydra.launcher.{key}={value}", "hydra.sweep.dir=sweep"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / "sweep" / str(i) / "seen.json").read_text()) for i in range(2)]
    assert all(s[key] == value for s in seen)
    assert seen[0]["pid"] != seen[1]["pid"]  # two processes, not one
