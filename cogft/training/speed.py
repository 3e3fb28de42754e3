"""Speed and memory levers applied to the transformer's blocks.

Gradient checkpointing of a chosen fraction of the blocks (the first ones) trades recompute for
memory only where the memory budget needs it; per-block `torch.compile` fuses the elementwise work
around attention and the matmuls. Both patch blocks in place, so parameter names (and therefore
LoRA/SFT checkpoints and exports) are unchanged.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def checkpointed_block_count(setting: bool | float, num_blocks: int) -> int:
    """`true` → all blocks, `false` → none, a fraction in (0, 1] → that share, rounded up."""
    if isinstance(setting, bool):
        return num_blocks if setting else 0
    return min(num_blocks, math.ceil(setting * num_blocks))


def _checkpointed(forward, offload: bool):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if offload:  # the block's saved inputs wait for the backward pass in pinned host memory
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_block_options(transformer: torch.nn.Module, gradient_checkpointing: bool | float, compile_blocks: bool,
                        offload_checkpoints: bool = False) -> int:
    """Checkpoint the first N blocks (optionally keeping their inputs on the host) and/or compile every block."""
    blocks = transformer.transformer_blocks
    count = checkpointed_block_count(gradient_checkpointing, len(blocks))
    offload = offload_checkpoints and next(transformer.parameters()).device.type == "cuda"
    for block in list(blocks)[:count]:
        block.forward = _checkpointed(block.forward, offload)
    if compile_blocks:
        for block in blocks:
            block.compile()
    logger.info("gradient checkpointing on %d/%d blocks%s; per-block torch.compile %s",
                count, len(blocks), " (inputs offloaded to host)" if offload and count else "",
                "on" if compile_blocks else "off")
    return count
