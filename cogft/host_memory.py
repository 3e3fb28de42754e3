"""This process's peak host (RAM) memory: what `cogft estimate` predicts as the host peak of prepare and training.

The kernel keeps the peak resident set of every process (`getrusage`), so reading it costs nothing and misses no
short spike, such as the text encoder read whole before it goes to the GPU. Pinned buffers (swapped block weights,
offloaded checkpoints) are resident memory and count.
"""

from __future__ import annotations

import sys


def host_peak_gib() -> float | None:
    """The peak resident memory of this process so far, in GiB (None where the platform does not keep it)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 2)  # bytes on macOS, KiB on Linux
