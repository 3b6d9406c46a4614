"""Keep freed memory in the process: glibc malloc settings applied when a run starts.

By default glibc serves every block above 128 KiB (a threshold it raises by itself only up
to the size of blocks it has seen freed) with a fresh `mmap` and returns it on `free`, and it
trims the top of the heap back to the system. A training step allocates and frees the same
large activation and gradient buffers every step, so each step pays again for mapping and
zero-filling them: thousands of minor page faults per step (docs/performance.md). Raising
the mmap threshold to glibc's maximum (32 MiB on 64-bit), the trim threshold to 1 GiB and
the top pad to 256 MiB keeps those blocks in the heap from step to step; measured, the page
faults drop to zero and a mid-size LSTM step gets 1.1x to 1.8x faster.

The cost is memory: up to about 1 GiB of freed heap stays with the process instead of going
back to the system. The settings change no arithmetic. They are applied through `mallopt`,
so they reach this process only; a user who sets any ``MALLOC_*`` variable, or
``SEQTEST_MALLOC=default``, keeps glibc's own behaviour (or theirs). Other C libraries
(macOS, musl) are left alone.

Blocks above 32 MiB (a large model's [T, B, 4H] buffers) are still mapped and unmapped every
step. seqtest asks PyTorch to back them with transparent huge pages
(``THP_MEM_ALLOC_ENABLE=1``, `use_huge_pages`; where the kernel offers them on request,
``/sys/kernel/mm/transparent_hugepage/enabled`` = madvise or always): a fresh mapping then
faults in 2 MiB at a time instead of 4 KiB, and measured, the largest benchmark step got
1.2x faster (LSTM and GRU at B=128, T=400, H=256: page faults per step 171,000 -> 1,200-2,000
and 90,000 -> 1,700) for 4-9% more peak memory; at the smaller sizes, where the heap already
reuses every block, the time did not change and the peak grew by 1-24% (2 MiB alignment).
PyTorch reads the variable at its first CPU allocation, so the commands set it when they
start; ``SEQTEST_MALLOC=default`` or a ``THP_MEM_ALLOC_ENABLE`` of the user's own leaves it
alone. ``SEQTEST_MALLOC=no_mmap`` also sets ``M_MMAP_MAX`` to 0, so that every block comes
from the heap and is reused. It is opt-in: it was the fastest setting in every case measured,
but at the largest benchmark size its peak memory grew over the first 100 steps of one run
and up to step 300 of another (to 1.25-1.28x the tuned peak) while the tuned peak stayed
flat (docs/performance.md); its
speed-up is measured per case by ``python -m seqtest.bench --only allocator``. Reuse is not
immediate: PyTorch allocates with `posix_memalign`, which asks for a little more than the
block it frees, so the next allocation of the same size is carved from fresh heap until
enough freed neighbours have merged (measured with 64 MiB blocks: the first 7 allocations
fault every page in, the following ones none).
"""

from __future__ import annotations

import ctypes
import os

from seqtest.errors import require_choice

#: glibc's `mallopt` parameters (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
SETTINGS = {
    M_MMAP_THRESHOLD: 32 * 1024 * 1024,
    M_TRIM_THRESHOLD: 1024 * 1024 * 1024,
    M_TOP_PAD: 256 * 1024 * 1024,
}
#: The same settings as environment variables, read by glibc when a process starts.
ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(SETTINGS[M_MMAP_THRESHOLD]),
    "MALLOC_TRIM_THRESHOLD_": str(SETTINGS[M_TRIM_THRESHOLD]),
    "MALLOC_TOP_PAD_": str(SETTINGS[M_TOP_PAD]),
}

#: What SEQTEST_MALLOC may say (unset: "tuned").
CHOICES = ("tuned", "default", "no_mmap")

_state = {"applied": None}


def keep_freed_memory() -> str:
    """Apply `SETTINGS` once per process. Returns what holds now: "tuned" (applied here or
    before), "no_mmap" (SEQTEST_MALLOC=no_mmap: the settings and no mapped blocks at all),
    "environment" (the user's MALLOC_* variables rule), "default" (opted out with
    SEQTEST_MALLOC=default) or "unavailable" (not glibc)."""
    if _state["applied"] is not None:
        return _state["applied"]
    choice = os.environ.get("SEQTEST_MALLOC", "").lower()
    require_choice("SEQTEST_MALLOC", choice or "tuned", CHOICES)
    if choice == "default":
        result = "default"
    elif any(name.startswith("MALLOC_") for name in os.environ):
        result = "environment"
    elif choice == "no_mmap":
        result = _mallopt_all(SETTINGS | {M_MMAP_MAX: 0}, "no_mmap")
    else:
        result = _mallopt_all(SETTINGS, "tuned")
    _state["applied"] = result
    return result


def use_huge_pages() -> bool:
    """Ask PyTorch for transparent huge pages on its large CPU buffers (see the module
    docstring), unless SEQTEST_MALLOC=default or the user set THP_MEM_ALLOC_ENABLE. Takes
    effect only before the process's first CPU tensor is allocated (PyTorch reads the
    variable once); child processes inherit it. Returns whether it is on."""
    if os.environ.get("SEQTEST_MALLOC", "").lower() != "default":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return huge_pages_on()


def huge_pages_on() -> bool:
    """Whether this process asks PyTorch for huge pages (what `use_huge_pages` set, or the
    user's own THP_MEM_ALLOC_ENABLE), without changing anything."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def _mallopt_all(settings: dict[int, int], name: str) -> str:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "unavailable"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(mallopt(parameter, value) == 1 for parameter, value in settings.items())
    return name if ok else "unavailable"
