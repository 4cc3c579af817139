"""Peak host memory of a CPU run: glibc's malloc keeps freed memory for reuse, and a training step frees and
re-allocates megabytes of activations and gradients every step, so the resident set grows past what the step
holds at once (``benchmarks/memory_phases.py``: a 4.2 GB peak where weights, gradients and AdamW moments take 2.0 GB and the
runtime 0.5 GB).

glibc serves an allocation of at least its *mmap threshold* with its own ``mmap`` and returns it to the OS when
freed; the threshold starts at 128 KiB but rises to the size of each large block freed (up to 32 MiB), after which
activations come from the heap and stay resident. Pinning it (``mallopt(M_MMAP_THRESHOLD)``, which also stops the
rise) keeps them out of the heap: a lower peak RSS, paid with page faults on every fresh large tensor (slower
steps; ``benchmarks/RESULTS.md`` has both numbers). Same computation, same numbers: only where memory comes from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from ..errors import LbdpoError

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (<malloc.h>)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems


def pin_mmap_threshold(nbytes: int) -> bool:
    """Pin glibc's mmap threshold (and trim threshold) at ``nbytes``; False where libc is not glibc (logged)."""
    if not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise LbdpoError(f"trainer.malloc_mmap_threshold={nbytes} must be in 1..{MAX_MMAP_THRESHOLD} bytes or null")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        log.warning("trainer.malloc_mmap_threshold ignored: the C library is not glibc")
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, nbytes) == 1 and libc.mallopt(M_TRIM_THRESHOLD, nbytes) == 1
    if ok:
        log.info("glibc malloc: allocations of ≥ %d bytes are mmap'ed and returned to the OS when freed", nbytes)
    else:
        log.warning("trainer.malloc_mmap_threshold=%d: mallopt refused it; glibc's defaults stay", nbytes)
    return ok
