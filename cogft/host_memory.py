"""This process's peak host (RAM) memory: what `cogft estimate` predicts as the host peak of prepare and training.

The kernel keeps the peak resident set of every process (`getrusage`), so reading it costs nothing and misses no
short spike, such as the text encoder read whole before it goes to the GPU. Pinned buffers (swapped block weights,
offloaded checkpoints) are resident memory and count.

Memory the process frees is not always given back: glibc keeps freed blocks below its mmap threshold in the heap,
still resident. A model read whole into host memory and then moved block by block (to the GPU, or into pinned swap
buffers) can leave gigabytes so, which the pinned buffers allocated next stack on. On a CPU here, the 2B (3.15 GiB)
held 5.07 GiB after 2.92 GiB of its blocks were copied out and the originals dropped, 3.56 after `malloc_trim`.
"""

from __future__ import annotations

import ctypes
import sys


def host_peak_gib() -> float | None:
    """The peak resident memory of this process so far, in GiB (None where the platform does not keep it)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 2)  # bytes on macOS, KiB on Linux


def release_freed_host_memory() -> None:
    """Give the heap's freed pages back to the system (glibc's `malloc_trim`), so the host peak that follows is what
    the process holds, as `cogft estimate` counts it. A no-op where the C library has no `malloc_trim`."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library (absent from musl)
        if trim is not None:
            trim(0)
