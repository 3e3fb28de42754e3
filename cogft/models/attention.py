"""The attention kernels a family's attention processor can run (`model.attention`).

FlashAttention-4's Hopper/Blackwell kernels (the `flash-attn-4` package, module `flash_attn.cute`) compute the
same exact attention as torch's SDPA faster on video-length sequences (docs/performance.md). `auto` takes them
where they run and keeps SDPA elsewhere. The calls are wrapped as torch custom ops, so the per-block
`torch.compile` keeps each block in one graph around them. Which processor carries the kernel into the model is
the family's (`Variant.attention_processor`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable

import torch

from ..config import ConfigError

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, S, H, D) q, k, v -> (B, S, H, D)
FA4_ARCHS = (9, 10)  # compute capability majors with FlashAttention-4 kernels: Hopper, Blackwell


class KernelProcessor:
    """What a family's attention processor that runs `kernel` derives from: `attention_in_use` tells it by its name."""

    def __init__(self, kernel: Kernel, name: str):
        self.kernel, self.name = kernel, name


@functools.cache
def _register_fa4_ops() -> None:
    """Register FlashAttention-4's forward and backward as custom ops, once per process and outside any compiled
    code (`set_attention` calls it), so compiled blocks only ever see `torch.ops.cogft.fa4_forward`."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    @torch.library.custom_op("cogft::fa4_forward", mutates_args=(), device_types="cuda")
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, *_ = _flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=with_lse)
        return out, (lse if with_lse else q.new_empty(0, dtype=torch.float32))

    @forward.register_fake
    def _(q, k, v, with_lse):
        batch, tokens, heads, _ = q.shape
        return (q.new_empty(batch, tokens, heads, v.shape[-1]),
                q.new_empty((batch, heads, tokens) if with_lse else (0,), dtype=torch.float32))

    @torch.library.custom_op("cogft::fa4_backward", mutates_args=(), device_types="cuda")
    def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = _flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out, grad_out.contiguous(), lse)
        return dq, dk, dv

    @backward.register_fake
    def _(grad_out, q, k, v, out, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, _ = inputs
        ctx.save_for_backward(q, k, v, *output)

    def backward_rule(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*torch.ops.cogft.fa4_backward(grad_out, q, k, v, out, lse), None)

    forward.register_autograd(backward_rule, setup_context=setup_context)


def fa4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """FlashAttention-4 on (B, S, H, D). Inputs are cast to the autocast dtype first, as autocast does for SDPA
    (the q/k layer norms come out of autocast in fp32)."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    with_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    out, _ = torch.ops.cogft.fa4_forward(query, key, value, with_lse)
    return out


def fa4_installed() -> bool:
    """Whether `flash_attn.cute` can be found, without importing it (the import takes seconds)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # no flash_attn package at all
        return False


def fa4_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FlashAttention-4 cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"FlashAttention-4 runs on NVIDIA GPUs, this run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FA4_ARCHS:
        return (f"FlashAttention-4 has kernels for Hopper (9.x) and Blackwell (10.x) GPUs, "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-4 computes in fp16 or bf16, the model computes in {dtype}"
    try:  # the two entry points cogft wraps; a release that moved them counts as missing
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd  # noqa: F401
    except ImportError as error:
        return (f"flash-attn-4 is not installed or lacks the forward/backward entry points cogft wraps ({error}); "
                "pip install 'cogft[fa4]'")
    return None


def resolve_attention(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `model.attention` gives here (`dtype`: the compute/autocast dtype): "fa4" or "sdpa".

    `auto` takes fa4 where it runs; `fa4` insists, and is refused by name where it cannot run.
    """
    if setting == "sdpa":
        return "sdpa"
    problem = fa4_unavailable(device, dtype)
    if problem is None:
        return "fa4"
    if setting == "fa4":
        raise ConfigError(f"model.attention=fa4: {problem}. Set model.attention=auto (fa4 where it can run, "
                           "SDPA elsewhere) or sdpa")
    return "sdpa"


def set_attention(transformer: torch.nn.Module, setting: str, device: torch.device, dtype: torch.dtype,
                  processor: Callable[[Kernel, str], KernelProcessor]) -> str:
    """Install the kernel `model.attention` resolves to through the family's `processor` (its
    `Variant.attention_processor`); `sdpa` leaves diffusers' own processor in place."""
    name = resolve_attention(setting, device, dtype)
    if name == "fa4":
        _register_fa4_ops()
        transformer.set_attn_processor(processor(fa4_attention, "fa4"))
        logger.info("model.attention=%s: FlashAttention-4 kernels", setting)
    elif setting == "auto":
        logger.info("model.attention=auto: torch SDPA (%s)", fa4_unavailable(device, dtype))
    return name


def attention_in_use(transformer: torch.nn.Module) -> str:
    """The kernel the transformer's attention runs: "fa4" or "sdpa"."""
    processor = next(iter(transformer.attn_processors.values()))
    return processor.name if isinstance(processor, KernelProcessor) else "sdpa"
