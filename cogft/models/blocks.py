"""Speed and memory levers applied to the transformer's blocks (training, validation, `cogft sample`, bench).

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


def compile_enabled(config, device: torch.device) -> bool:
    """`train.compile: auto` compiles on CUDA GPUs, where it pays for its start-up minute; never on CPUs."""
    setting = config.train.compile
    return device.type == "cuda" if setting == "auto" else bool(setting)


def checkpointed_block_count(setting: bool | float, num_blocks: int) -> int:
    """`true` → all blocks, `false` → none, a fraction in (0, 1] → that share, rounded up."""
    if isinstance(setting, bool):
        return num_blocks if setting else 0
    return min(num_blocks, math.ceil(setting * num_blocks))


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a large GPU tensor (async on the current stream); anything else is kept as is."""
    if tensor.device.type != "cuda" or tensor.numel() < 1 << 20:
        return tensor.detach()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint one block with its saved inputs in host memory until the backward pass needs them.

    Forward runs without keeping activations and stashes the inputs (the 17k-token hidden states are
    the large ones) in pinned host memory; backward copies them back, recomputes the block under the
    same autocast and RNG state, and back-propagates through it.
    """

    @staticmethod
    def forward(ctx, call, grad_anchor, *inputs):
        device = inputs[0].device
        ctx.call, ctx.device = call, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        ctx.needs_grad = [t.requires_grad for t in inputs]
        ctx.stash = [_to_host(t) for t in inputs]
        return call(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        device = ctx.device
        inputs = [t.to(device, non_blocking=True).detach().requires_grad_(need)
                  for t, need in zip(ctx.stash, ctx.needs_grad)]
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(ctx.rng[0])
            if cuda:
                torch.cuda.set_rng_state(ctx.rng[1], device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                outputs = ctx.call(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *[t.grad if need else None for t, need in zip(inputs, ctx.needs_grad)])


def _offloaded(forward):
    """For CogVideoXBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)."""

    @functools.wraps(forward)
    def run(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        if not torch.is_grad_enabled():
            return forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)

        def call(h, e, t):
            return forward(h, e, t, image_rotary_emb, attention_kwargs)

        # the anchor makes the outputs require grad when no input does (frozen layers before a LoRA block)
        anchor = torch.empty(0, requires_grad=True)
        return _OffloadedCheckpoint.apply(call, anchor, hidden_states, encoder_hidden_states, temb)

    return run


def apply_block_options(transformer: torch.nn.Module, gradient_checkpointing: bool | float, compile_blocks: bool,
                        offload_checkpoints: bool = False, autotune: bool = False) -> int:
    """Checkpoint the first N blocks (optionally with their inputs in host memory), compile every block
    (`autotune`: with inductor's coordinate-descent tuning of the fused kernels)."""
    blocks = list(transformer.transformer_blocks)
    count = checkpointed_block_count(gradient_checkpointing, len(blocks))
    options = {"coordinate_descent_tuning": True} if autotune else None
    for index, block in enumerate(blocks):
        if index < count and offload_checkpoints:
            # compile the inner forward: the offloading Function stays outside the compiled graph
            inner = torch.compile(block.forward, options=options) if compile_blocks else block.forward
            block.forward = _offloaded(inner)
            continue
        if index < count:
            block.forward = _checkpointed(block.forward)
        if compile_blocks:
            # compile the forward, not the module: hooks that diffusers' inference caches (or a backend)
            # put around a block then stay outside the graph, which the 30-48 blocks share; with
            # `block.compile()` each hooked block recompiles until the recompile limit sends the rest to eager
            block.forward = torch.compile(block.forward, options=options)
    logger.info("gradient checkpointing on %d/%d blocks%s; per-block torch.compile %s",
                count, len(blocks), " (inputs offloaded to host)" if offload_checkpoints and count else "",
                ("on, autotuned" if autotune else "on") if compile_blocks else "off")
    return count
