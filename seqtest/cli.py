"""The `seqtest` command: Hydra composes the config, `run(cfg)` does the work.

seqtest task=copying model=lstm task.length=200
seqtest -m model=rnn,lstm,gru task.length=50,100,200
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from seqtest.allocator import use_huge_pages
from seqtest.errors import ConfigError, require_choice
from seqtest.results import RunFolderBusy, format_table
from seqtest.shutdown import skip_final_collections

log = logging.getLogger("seqtest")
MODES = ("train", "analyze")
skip_final_collections()  # the command and joblib's workers exit about 1 s sooner
use_huge_pages()  # before any tensor exists: PyTorch reads it at its first allocation


def share_of_cores(launcher: DictConfig | None) -> int | None:
    """Torch threads for one job: its share of the cores when a launcher runs jobs side by side.

    Small matrix products split badly over threads, so parallel jobs run best with one thread
    each rather than all of them fighting over every core. joblib's `n_jobs` (negative counts
    back from the number of cores, as in joblib) and submitit's `cpus_per_task` decide the
    share; the basic launcher runs one job at a time and keeps torch's default.
    """
    if launcher is None:
        return None
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    n_jobs = launcher.get("n_jobs")
    if not n_jobs:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1  # the cores this process may use (a SLURM or taskset limit counts)
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // parallel)


def _stop(message: str) -> NoReturn:
    """End a job that cannot run: the reason in its log and as one line on stderr, exit 2,
    nothing written."""
    log.error("%s", message)
    print(f"seqtest: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://seqtest.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration; return the final validation loss for sweepers to minimise."""
    # torch is imported here, by the process that runs the job: a process that only launches
    # jobs (joblib's, submitit's) then starts and composes the sweep without it, about 2 s
    # sooner, while the workers import it anyway
    from seqtest.checkpoint import CheckpointError
    from seqtest.run import analyze, run

    hydra_cfg = HydraConfig.get()
    if cfg.threads is None:
        cfg.threads = share_of_cores(hydra_cfg.get("launcher"))
    try:
        require_choice("mode", cfg.mode, MODES)
        if cfg.mode == "analyze":
            digest = analyze(cfg, hydra_cfg.runtime.output_dir)
            rows = [{"field": key, "value": value} for key, value in digest.items()]
            print(format_table(rows, ["field", "value"]), flush=True)
            return digest["grad_decay_rate"]
        summary = run(cfg, hydra_cfg.runtime.output_dir)
    except ConfigError as error:
        _stop(f"configuration error: {error}")
    except CheckpointError as error:
        _stop(f"cannot resume: {error}")
    except RunFolderBusy as error:
        _stop(str(error))
    log.info(
        "%s %s T=%s seed=%s: %s, final loss / baseline %.4g, %d steps",
        summary["task"],
        summary["model"],
        summary["length"],
        summary["seed"],
        summary["status"],
        summary["loss_ratio"],
        summary["steps"],
    )
    if summary["status"] == "interrupted":
        # the conventional exit status of a process ended by a signal: 128 + its number
        by = summary["interrupted_by"]
        sys.exit(128 + signal.Signals[by].value if by else 1)
    return summary["final_val_loss"]


if __name__ == "__main__":
    main()
