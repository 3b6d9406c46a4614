"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model and optimiser state, the step, the loop's accumulators and
records, and the state of every random generator the run uses, so that on CPU a resumed run
reproduces an uninterrupted one to the bit. It is written atomically and loaded with
``torch.load(weights_only=True)``: a checkpoint cannot run code, and a corrupted or foreign
file gives a clear error instead of a traceback from inside torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from seqtest.results import atomic_file

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "seqtest-checkpoint-1"
REQUIRED = ("format", "step", "model", "optimizer", "data_generator", "loop")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used to resume."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint (`state` holds the keys in REQUIRED but `format`) atomically."""
    save_atomic(path, {"format": FORMAT, **state})


def save_atomic(path: Path, obj: Any) -> None:
    """`torch.save` through a temporary file in the same folder and a rename."""
    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, or raise CheckpointError saying why not."""
    state = load_weights(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a seqtest checkpoint (format {FORMAT} expected)")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    return state


def load_weights(path: Path) -> Any:
    """`torch.load(weights_only=True)` with a clear CheckpointError for a missing or bad file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as error:  # torch raises many kinds for a damaged file
        raise CheckpointError(
            f"{path} is not a readable seqtest checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'})"
        ) from None
    return state
