"""The `seqtest` command: Hydra composes the config, `run(cfg)` does the work.

    seqtest task=copying model=lstm task.length=200
    seqtest -m model=rnn,lstm,gru task.length=50,100,200
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from seqtest.errors import ConfigError
from seqtest.run import run

log = logging.getLogger("seqtest")


@hydra.main(version_base="1.3", config_path="pkg://seqtest.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration; return the final validation loss for sweepers to minimise."""
    try:
        summary = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as error:
        log.error("configuration error: %s", error)
        print(f"seqtest: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
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
    return summary["final_val_loss"]


if __name__ == "__main__":
    main()
