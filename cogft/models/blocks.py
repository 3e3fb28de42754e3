"""Speed and memory levers applied to the transformer's blocks (training, validation, `cogft sample`, bench).

Gradient checkpointing of a chosen fraction of the blocks (the first ones) trades recompute for
memory only where the memory budget needs it; per-block `torch.compile` fuses the elementwise work
around attention and the matmuls; `train.blocks_to_swap` keeps the frozen weights of the first blocks in
host memory (`BlockSwap`). All patch blocks in place, so parameter names (and therefore LoRA/SFT
checkpoints and exports) are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from ..host_memory import release_freed_host_memory

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


class BlockSwap:
    """The frozen weights of the first `count` blocks kept in host memory (`train.blocks_to_swap`, LoRA only).

    The host copy is the master (pinned on CUDA, so the copies are asynchronous): between uses a swapped weight
    is a one-element placeholder on the device, expanded to the weight's shape and holding NaN, so that any use
    outside a block's run poisons the result instead of reading stale numbers. `resident(index)` copies a block's
    weights to the device on a side stream (only host-to-device: frozen weights never change), makes the compute
    stream wait for them, points the parameters at them for the block's run and back at the placeholder after;
    meanwhile the next block's copy is started (the block after it in the forward, the one before it in the
    backward's recompute), so the copy overlaps the block's compute. At most two blocks' weights are on the
    device. On a CPU the "copy" is the host tensor itself: the same code path, placeholders included.
    """

    def __init__(self, blocks: list[torch.nn.Module], count: int, device: torch.device):
        self.device, self.count = device, count
        self.weights = [[p for p in block.parameters() if not p.requires_grad] for block in blocks[:count]]
        self.masters: list[list[torch.Tensor]] = []
        self.placeholders: list[list[torch.Tensor]] = []
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._registered: list[int] = []  # host buffers pinned in place, unpinned when this goes
        weakref.finalize(self, _unregister, self._registered)

    def install(self) -> None:
        """Move the swapped weights to host memory and leave placeholders on the device (before prepare, which
        moves the rest of the model: the device never holds every block)."""
        pin = self.device.type == "cuda"
        for weights in self.weights:
            self.masters.append(_host_masters([p.data for p in weights], pin, self._registered))
            self.placeholders.append([_placeholder(p.data, self.device) for p in weights])
            for p, placeholder in zip(weights, self.placeholders[-1]):
                p.data = placeholder
            release_freed_host_memory()  # the block's host originals: else resident beside its master copy
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # a model built on the GPU (`cogft bench`) gives back the swapped weights

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for masters in self.masters for t in masters)

    def _fetch(self, index: int) -> None:
        """Start copying block `index`'s weights to the device on the side stream."""
        if index in self.pending or not 0 <= index < self.count:
            return
        if self.stream is None:
            self.pending[index] = (self.masters[index], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in self.masters[index]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[index] = (copies, event)

    @contextlib.contextmanager
    def resident(self, index: int, phase: str = "forward"):
        """Block `index`'s weights on the device for the duration; the next one's copy started meanwhile. `phase`:
        "forward" (no backward follows), "training" (a forward whose backward follows) or "backward"."""
        if not self.masters:  # not installed (yet): the weights are where the model is
            yield
            return
        self._fetch(index)
        copies, event = self.pending.pop(index)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for copy in copies:
                copy.record_stream(stream)  # allocated on the side stream, read on this one
        weights = self.weights[index]
        for p, copy in zip(weights, copies):
            p.data = copy
        # next: the forward's next block, the backward's previous one; after the last swapped block of a
        # training forward its own recompute comes first in the backward, and after block 0 the next forward
        ahead = index - 1 if phase == "backward" else index + 1
        if ahead < 0 or ahead >= self.count:
            ahead = index if phase == "training" else 0
        if ahead == index:
            self.pending[index] = (copies, None)
        try:
            self._fetch(ahead)
            yield
        finally:
            for p, placeholder in zip(weights, self.placeholders[index]):
                p.data = placeholder


def _host_masters(tensors: list[torch.Tensor], pin: bool, registered: list[int]) -> list[torch.Tensor]:
    """The host copies a block's swapped weights are read from: on a CPU run the tensors themselves; for a GPU, views
    of one host buffer of their exact size pinned in place (torch's pinned allocator rounds each allocation up to a
    power of two, up to twice the RAM), or torch's pinned tensors where registering fails."""
    if not pin or not tensors:
        return [t.cpu() for t in tensors]
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // 64) * 64
        offsets.append(total)
        total += t.numel() * t.element_size()
    buffer = torch.empty(total, dtype=torch.uint8)
    if int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), total, 0)) != 0:
        logger.warning("train.blocks_to_swap: could not pin %d bytes of host memory in place; using torch's pinned "
                       "allocator (up to twice the memory)", total)
        return [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in tensors]
    registered.append(buffer.data_ptr())
    masters = []
    for t, offset in zip(tensors, offsets):
        master = buffer[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        masters.append(master.copy_(t))
    return masters


def _unregister(pointers: list[int]) -> None:
    for pointer in pointers:
        torch.cuda.cudart().cudaHostUnregister(pointer)


def _placeholder(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One NaN expanded to `like`'s shape, on `device` (float8 e4m3fn has a NaN too)."""
    fill = float("nan") if like.dtype.is_floating_point else 0
    return torch.full((1,) * like.dim() or (), fill, dtype=like.dtype, device=device).expand(like.shape)


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint one block with its saved inputs in host memory until the backward pass needs them, and its
    swapped weights (`BlockSwap`) on the device only while it runs.

    Forward runs without keeping activations and stashes the inputs (the 17k-token hidden states are
    the large ones) in pinned host memory (or keeps them, with `offload` off); backward copies them back,
    recomputes the block under the same autocast and RNG state, and back-propagates through it, the block's
    weights brought back for both.
    """

    @staticmethod
    def forward(ctx, call, swap, offload, grad_anchor, *inputs):
        device = inputs[0].device
        ctx.call, ctx.device, ctx.swap = call, device, swap
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        ctx.needs_grad = [t.requires_grad for t in inputs]
        ctx.stash = [_to_host(t) if offload else t.detach() for t in inputs]
        with swap("training"):
            return call(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        device = ctx.device
        inputs = [t.to(device, non_blocking=True).detach().requires_grad_(need)
                  for t, need in zip(ctx.stash, ctx.needs_grad)]
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), ctx.swap("backward"):
            torch.set_rng_state(ctx.rng[0])
            if cuda:
                torch.cuda.set_rng_state(ctx.rng[1], device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                outputs = ctx.call(*inputs)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, *[t.grad if need else None for t, need in zip(inputs, ctx.needs_grad)])


def _no_swap(phase: str = "forward"):
    return contextlib.nullcontext()


def _offloaded(forward, swap=_no_swap, offload: bool = True):
    """For CogVideoXBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)."""

    @functools.wraps(forward)
    def run(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        if not torch.is_grad_enabled():
            with swap():
                return forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)

        def call(h, e, t):
            return forward(h, e, t, image_rotary_emb, attention_kwargs)

        # the anchor makes the outputs require grad when no input does (frozen layers before a LoRA block)
        anchor = torch.empty(0, requires_grad=True)
        return _OffloadedCheckpoint.apply(call, swap, offload, anchor, hidden_states, encoder_hidden_states, temb)

    return run


def swapped_block_count(setting: int | str, num_blocks: int) -> int:
    """`train.blocks_to_swap` as a count: `all` → every block, a number as is (`auto` is resolved by the budget)."""
    return num_blocks if setting == "all" else int(setting)


def apply_block_options(transformer: torch.nn.Module, gradient_checkpointing: bool | float, compile_blocks: bool,
                        offload_checkpoints: bool = False, autotune: bool = False, blocks_to_swap: int = 0,
                        device: torch.device | None = None) -> BlockSwap | None:
    """Checkpoint the first N blocks (optionally with their inputs in host memory), keep the frozen weights of the
    first `blocks_to_swap` in host memory (those blocks are checkpointed too: their weights are not kept for the
    backward), compile every block (`autotune`: with inductor's coordinate-descent tuning of the fused kernels).
    Returns the `BlockSwap` to `install` before the model goes to `device`, or None."""
    blocks = list(transformer.transformer_blocks)
    count = checkpointed_block_count(gradient_checkpointing, len(blocks))
    options = {"coordinate_descent_tuning": True} if autotune else None
    swap = BlockSwap(blocks, blocks_to_swap, device or torch.device("cpu")) if blocks_to_swap else None
    for index, block in enumerate(blocks):
        if index < blocks_to_swap or (index < count and offload_checkpoints):
            # compile the inner forward: the offloading Function stays outside the compiled graph
            inner = torch.compile(block.forward, options=options) if compile_blocks else block.forward
            resident = functools.partial(swap.resident, index) if index < blocks_to_swap else _no_swap
            block.forward = _offloaded(inner, resident, offload_checkpoints)
            continue
        if index < count:
            block.forward = _checkpointed(block.forward)
        if compile_blocks:
            # compile the forward, not the module: hooks that diffusers' inference caches (or a backend)
            # put around a block then stay outside the graph, which the 30-48 blocks share; with
            # `block.compile()` each hooked block recompiles until the recompile limit sends the rest to eager
            block.forward = torch.compile(block.forward, options=options)
    logger.info("gradient checkpointing on %d/%d blocks%s; frozen weights of %d blocks swapped from host memory; "
                "per-block torch.compile %s", max(count, blocks_to_swap), len(blocks),
                " (inputs offloaded to host)" if offload_checkpoints and count else "", blocks_to_swap,
                ("on, autotuned" if autotune else "on") if compile_blocks else "off")
    return swap
