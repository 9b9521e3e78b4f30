"""Keep freed host memory in the process: glibc malloc settings for tensor workloads.

glibc serves every allocation at or above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` on free. A training step of a large backbone
allocates and frees hundreds of MiB of activations and gradients, so every step the kernel
maps, page-faults and zero-fills them anew. On the 2-core VM of docs/STACK.md that kernel
work was two thirds of a TokenMixer-Large training step (``sys`` time; README "Performance").

``retain_freed_memory`` switches the process to serving big blocks from the heap and never
trimming it: a freed activation is reused by the next step, as a caching allocator would.
The price is that the process keeps its high-water mark of heap (it is not returned to the
kernel until exit), which is what a trainer or a serving replica wants anyway.

It changes allocation only, never values: the same tensors, the same kernels.

Limit: glibc gives each thread that allocates concurrently an arena of its own, and a
non-main arena's heaps are at most 64 MiB, so a block above that allocated off the main
thread (Ray Train runs the training function in a thread of the worker) is still mapped and
unmapped each time; blocks below it are kept. The benchmarks run on the main thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_SETTINGS = (
    (M_MMAP_MAX, 0),  # no block is mmapped: a freed block stays in the heap for reuse
    (M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt takes an int: the largest, i.e. never trim in practice
    (M_TOP_PAD, 64 * 2**20),  # grow the heap in 64 MiB steps: fewer brk calls (address space, not RSS)
)


@functools.cache
def retain_freed_memory() -> bool:
    """Apply the settings to this process (idempotent); False where malloc is not glibc's.

    Must be called in the process that does the tensor work (a Ray worker, not its driver).
    Threads of the process share the settings.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.info("retain_freed_memory: not glibc (%s), left as is", platform.libc_ver()[0] or platform.system())
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS):
        logger.warning("retain_freed_memory: mallopt refused a setting; allocation left as glibc's default")
        return False
    return True
