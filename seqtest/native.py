"""The hand-written BPTT's step loops compiled from C++, built on first use, with the Python
loops as the fallback.

Why: the cells `seqtest.bptt` trains by hand (vanilla RNNs, the GRU, the layer- and
batch-norm LSTMs) run their time steps as a Python loop of small kernels and views: about
13 calls per time step, forward and backward, for the RNN, 35 for the GRU and 30 for a
normalised LSTM. At the sizes a testbed trains, issuing them from Python costs about as
much as their arithmetic: measured on a 2-core CPU at (B, T, H) = (32, 100, 64), switching
between the two in one process, the compiled loops took 0.68-0.80x (RNN), 0.60x (GRU) and
0.65-0.69x (normalised LSTMs) of the Python loops' training-step time, and 0.80-0.84x at
(64, 200, 128) (docs/performance.md).

What: `loops.cpp` calls the same ATen kernels in the same order on the same buffers as the
Python loops, so the results are the same; mostly only the cost of issuing the calls
changes. Three kernels are our own: tanh (PyTorch's CPU tanh is not vectorised; ours, for
x86-64 with AVX2 or AVX-512, is 3-7x faster, within 1.35 ulp of the exact tanh), the
BN-LSTM's per-step batch norm (PyTorch's, written for images, costs up to twice as much on
these shapes; ours agrees with it to rounding) and, on those same processors, the float32
GRU's and normalised LSTMs' element-wise step work, forward and backward, fused into one or
two passes (PyTorch's kernels take 5-11 calls per step). From 2 M multiply-adds on
(`bptt.PACKED_MIN_MACS`) the float32 recurrent products run on oneDNN's kernel with the
weight packed once per pass: PyTorch's `mm` (MKL) ran them at about half its speed on an
AMD EPYC. All are checked against float64 computations, and with the tanh kernel swapped
into the Python loops every other result is bit-identical (tests/test_native.py).

It is compiled with `torch.utils.cpp_extension` the first time one of these cells trains
(about 25 s on 2 cores, once per machine, source and torch version; cached in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, see `build_directory`).
That needs a C++ compiler and ninja. Processes that build at the same time wait for each
other.

``SEQTEST_NATIVE`` chooses:

* ``auto`` (unset): build and use them; where that fails, warn once with the reason and use
  the Python loops (the same results to rounding; slower);
* ``off``: the Python loops;
* ``require``: build and use them, and stop with the build's error where that fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from seqtest.errors import require_choice

#: What SEQTEST_NATIVE may say (unset: "auto").
CHOICES = ("auto", "off", "require")
SOURCE = Path(__file__).with_name("loops.cpp")
#: A build lock older than this was left by a build that died (a build takes ~25 s).
STALE_LOCK_S = 600
#: -O3: GCC vectorises the batch-norm kernel's loops over features only from -O3 on.
#: -fno-trapping-math: lets it turn the tanh kernel's selects into blends for AVX2 (without it
#: that loop stays scalar there, as floating-point exceptions could differ; nothing here
#: reads them). Neither changes how any result rounds.
CFLAGS = ["-O3", "-fno-trapping-math"]
log = logging.getLogger(__name__)

_built: dict[str, ModuleType | str] = {}  # "module" or "error" once a build was tried


def choice() -> str:
    """SEQTEST_NATIVE, checked against `CHOICES`."""
    value = os.environ.get("SEQTEST_NATIVE", "").lower() or "auto"
    require_choice("SEQTEST_NATIVE", value, CHOICES)
    return value


def toolchain_missing() -> str | None:
    """What the build needs and this machine lacks (a C++ compiler, ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    missing = [name for name in (compiler, "ninja") if shutil.which(name) is None]
    return f"no {' and no '.join(missing)} on PATH" if missing else None


def loops() -> ModuleType | None:
    """The compiled module (`rnn_forward`, `gru_forward`, `forward` ... in loops.cpp), or None
    where the Python loops run: SEQTEST_NATIVE=off, or a failed build under "auto" (warned
    about once)."""
    wanted = choice()
    if wanted == "off":
        return None
    if not _built:
        _built.update(_build())
    if "module" in _built:
        return _built["module"]
    if wanted == "require":
        raise RuntimeError(f"SEQTEST_NATIVE=require: {_built['error']}")
    return None


def status() -> str:
    """For records: "compiled", "off", "not built" (nothing needed it yet) or "failed: why"."""
    if choice() == "off":
        return "off"
    if not _built:
        return "not built"
    return "compiled" if "module" in _built else f"failed: {_built['error']}"


def _build() -> dict[str, ModuleType | str]:
    missing = toolchain_missing()
    if missing is None:
        try:
            return {"module": _compile()}
        except Exception as error:  # a compiler's failure comes in several types
            reason = f"building {SOURCE.name} failed: {_first_errors(str(error))}"
    else:
        reason = f"cannot build {SOURCE.name}: {missing}"
    if choice() == "auto":
        warnings.warn(
            f"seqtest: the hand-written BPTT runs its Python loops (the same results, the "
            f"BN-LSTM's to rounding; slower: docs/performance.md); {reason}. "
            f"SEQTEST_NATIVE=off silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return {"error": reason}


def _first_errors(message: str, count: int = 3) -> str:
    """The first `count` lines of a build log that say "error", or its last 500 characters."""
    errors = [line.strip() for line in message.splitlines() if "error" in line.lower()]
    return " | ".join(errors[:count]) if errors else message.strip()[-500:]


def build_directory() -> Path:
    """Where the loops are built: one folder per source text, compiler flags, torch and Python
    version, under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). The
    source is compiled from a copy in that folder, so that installs of the same version (a
    checkout, a wheel) share one build instead of rebuilding whenever the other one ran."""
    from torch.utils import cpp_extension  # 0.2 s to import: only when a build is wanted

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    versions = f"{torch.__version__} {sys.version} {' '.join(CFLAGS)}".encode()
    key = hashlib.sha256(SOURCE.read_bytes() + versions).hexdigest()[:16]
    return Path(root) / f"seqtest_loops_{key}"


def _compile() -> ModuleType:
    from torch.utils import cpp_extension

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / SOURCE.name
    if not source.exists():  # written whole, so that a concurrent build never reads half
        partial = folder / f".{SOURCE.name}.{os.getpid()}"
        partial.write_bytes(SOURCE.read_bytes())
        os.replace(partial, source)
    _remove_stale_lock(folder / "lock")
    if not (folder / "seqtest_loops.so").exists():  # (a run's log says so once, not always)
        log.info("building the compiled BPTT loops in %s (once, ~25 s)", folder)
    return cpp_extension.load(
        name="seqtest_loops",
        sources=[str(source)],
        extra_cflags=CFLAGS,
        build_directory=str(folder),
    )


def _remove_stale_lock(lock: Path) -> None:
    """Remove a build's lock file older than `STALE_LOCK_S`. The process that builds holds
    it and removes it when done; one killed mid-build (SIGKILL, a cluster's time limit) leaves
    it behind, and `cpp_extension.load` would then wait for it forever."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)
