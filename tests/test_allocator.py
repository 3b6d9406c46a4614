"""The allocator settings (seqtest.allocator): applied once, opt-out respected, and they do
what they are for: large buffers freed and allocated again stop faulting pages in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's mallopt"
)

CHILD = """
import json, resource, torch
from seqtest.allocator import keep_freed_memory
state = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
lstm = torch.nn.LSTM(2, 128, batch_first=True)
x = torch.randn(64, 200, 2)
def step():  # a training step's buffers: allocated, used and freed again every step
    lstm(x)[0].square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"state": state, "faults": faults}))
"""


def run_child(code: str = CHILD, **env_overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SEQTEST_"))}
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # set in this process by importing seqtest.cli
    env |= env_overrides
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_tuned_allocator_stops_the_page_faults_of_freed_buffers():
    default = run_child(SEQTEST_MALLOC="default")
    tuned = run_child()
    assert (default["state"], tuned["state"]) == ("default", "tuned")
    # measured on glibc 2.36: about 16,000 faults per step by default, about 1,000 tuned (what
    # remains comes from buffers above the 32 MiB mmap threshold glibc allows)
    assert default["faults"] > 4000
    assert tuned["faults"] < 0.25 * default["faults"]


BIG_BLOCKS = """
import json, resource, torch
from seqtest.allocator import keep_freed_memory
state = keep_freed_memory()
faults = []
for _ in range(15):  # a 64 MiB buffer, above the largest mmap threshold, made and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""


@glibc_only
def test_no_mmap_reuses_blocks_above_the_mmap_threshold():
    """Tuned, a 64 MiB block is mapped afresh every time (16,384 pages faulted in); with
    SEQTEST_MALLOC=no_mmap it comes from the heap, and once freed blocks have merged
    (posix_memalign cannot reuse a freed block of exactly its size at once; 7 allocations
    measured on glibc 2.36) it is reused with no faults."""
    tuned = run_child(code=BIG_BLOCKS)
    no_mmap = run_child(code=BIG_BLOCKS, SEQTEST_MALLOC="no_mmap")
    assert (tuned["state"], no_mmap["state"]) == ("tuned", "no_mmap")
    assert min(tuned["faults"][-5:]) > 10_000
    assert max(no_mmap["faults"][-5:]) < 100


def test_an_unknown_allocator_choice_is_refused_by_name():
    result = subprocess.run(
        [sys.executable, "-c", "from seqtest.allocator import keep_freed_memory as k; k()"],
        env=os.environ | {"SEQTEST_MALLOC": "tcmalloc"}, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "SEQTEST_MALLOC='tcmalloc' is invalid: expected one of tuned, default, no_mmap" in (
        result.stderr
    )


@glibc_only
def test_users_own_malloc_settings_win():
    assert run_child(MALLOC_ARENA_MAX="2")["state"] == "environment"


def test_state_is_decided_once_per_process():
    from seqtest import allocator

    first = allocator.keep_freed_memory()
    assert first in ("tuned", "no_mmap", "environment", "default", "unavailable")
    assert allocator.keep_freed_memory() == first


HUGE_PAGES = """
import json, os, resource
import seqtest.cli  # what the `seqtest` command imports first
import torch
faults = []
for _ in range(6):  # a 64 MiB buffer, mapped afresh each time (above the mmap threshold)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"variable": os.environ.get("THP_MEM_ALLOC_ENABLE"), "faults": faults}))
"""


def _huge_pages_on_request() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def test_the_command_asks_for_huge_pages_unless_told_not_to():
    assert run_child(code=HUGE_PAGES)["variable"] == "1"
    assert run_child(code=HUGE_PAGES, SEQTEST_MALLOC="default")["variable"] is None
    assert run_child(code=HUGE_PAGES, THP_MEM_ALLOC_ENABLE="0")["variable"] == "0"


@glibc_only
@pytest.mark.skipif(not _huge_pages_on_request(), reason="no transparent huge pages here")
def test_huge_pages_fault_a_fresh_large_buffer_in_2_mib_at_a_time():
    """A fresh 64 MiB mapping faults in 16,384 pages of 4 KiB; in huge pages, 32 of 2 MiB
    (about 550 faults measured, with the small pages around them)."""
    huge = run_child(code=HUGE_PAGES)
    small = run_child(code=HUGE_PAGES, SEQTEST_MALLOC="default")
    assert min(small["faults"][-3:]) > 10_000
    assert max(huge["faults"][-3:]) < 2_000
