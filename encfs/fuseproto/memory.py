"""glibc malloc settings for the FUSE daemons (see keep_freed_memory)."""

from __future__ import annotations

import ctypes

MALLOC_MMAP_THRESHOLD = 4 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc keep freed heap memory for reuse instead of returning it at once; True if set.

    Every request frees buffers of up to a MiB (sealed and plaintext copies). glibc's
    dynamic thresholds hand such memory back to the kernel (munmap, or trimming the
    arena with madvise) as soon as it is freed, and the next request takes every page
    back as a fresh zeroed fault. Fixed thresholds keep up to MALLOC_TRIM_THRESHOLD
    free per arena: less daemon CPU and faster large writes (benchmarks/HISTORY.md, e8c4e1f).
    Not glibc: nothing to do, False.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
