"""Host memory the process frees is given back, so the pinned buffers allocated next do not stack on it."""

import sys

import psutil
import pytest
import torch

from cogft.host_memory import release_freed_host_memory


def _resident_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap is Linux's")
def test_freed_host_memory_goes_back_to_the_system():
    """Tensors below glibc's mmap threshold live in the heap; freed, they stay resident until given back (as a
    model's host copy does after its blocks leave for the GPU or the swap buffers)."""
    chunks = [torch.ones(16 * 1024) for _ in range(8000)]  # 64 KiB each, 0.5 GiB
    kept = chunks[15::16]  # every 16th stays: the freed ones are holes inside the heap, which free() cannot trim
    held = _resident_gib()
    del chunks
    assert _resident_gib() > held - 0.1  # freed, still resident
    release_freed_host_memory()
    assert _resident_gib() < held - 0.35
    assert sum(int(chunk.sum()) for chunk in kept) == len(kept) * 16 * 1024
