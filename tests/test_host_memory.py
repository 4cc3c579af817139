"""``trainer.malloc_mmap_threshold``: with glibc's threshold pinned, freed activation-sized blocks go back to the
OS; with glibc's default (the threshold rises to the largest block freed so far) they stay resident. Each case in
its own process, as the setting is process-wide."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from lbdpo.train.host_memory import pin_mmap_threshold

SCRIPT = """
import sys, torch
from lbdpo.train.host_memory import pin_mmap_threshold
if sys.argv[1] == "pin":
    assert pin_mmap_threshold(131072)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big = torch.ones(30 * 2**20 // 4); del big   # glibc's default threshold now rises to 30 MiB
base = rss()
held, freed = [], []
for _ in range(64):   # 4 MiB blocks (an activation of a small model), each followed by a small block that stays
    freed.append(torch.ones(2**20)); held.append(torch.ones(1024))
del freed
print((rss() - base) / 2**20)
"""


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc behaviour")
def test_pinned_threshold_returns_freed_blocks_to_the_os():
    assert retained_mib("default") > 200  # 64 × 4 MiB freed, kept by the heap
    assert retained_mib("pin") < 16  # mmap'ed, unmapped on free


@pytest.mark.parametrize("nbytes", [0, -1, 64 * 2**20])
def test_out_of_range_threshold_is_refused(nbytes):
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        pin_mmap_threshold(nbytes)
