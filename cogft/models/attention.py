"""The attention kernel inside CogVideoX's joint text+video attention (`model.attention`).

At 17,776 tokens and head dim 64 attention is most of a step's arithmetic. diffusers' CogVideoX
processor calls torch's SDPA, which picks cuDNN on Hopper. FlashAttention-4's Hopper/Blackwell kernels
(the `flash-attn-4` package, module `flash_attn.cute`) compute the same exact attention faster on these
shapes (docs/performance.md). `auto` takes them where they run and keeps SDPA elsewhere.

The processor below is diffusers' `CogVideoXAttnProcessor2_0` with the SDPA call replaced by a kernel on
(batch, tokens, heads, head_dim) tensors, the layout the projections produce, so no transposes are made.
The FlashAttention-4 calls are wrapped as torch custom ops, so the per-block `torch.compile` keeps each
block in one graph around them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable

import torch

from ..config import ConfigError

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, S, H, D) q, k, v -> (B, S, H, D)
FA4_ARCHS = (9, 10)  # compute capability majors with FlashAttention-4 kernels: Hopper, Blackwell


class KernelAttnProcessor:
    """CogVideoX attention (text tokens first, then video; RoPE on the video part for the 5B variant) through
    `kernel`. Parameter names and the math are the stock processor's, so weights and LoRA files are unchanged."""

    def __init__(self, kernel: Kernel, name: str):
        self.kernel, self.name = kernel, name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError(f"model.attention={self.name} takes no attention mask (CogVideoX passes none); "
                             "use model.attention=sdpa")
        from diffusers.models.embeddings import apply_rotary_emb

        text_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (projection(hidden_states).unflatten(-1, (attn.heads, -1))
                             for projection in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, text_length:] = apply_rotary_emb(query[:, text_length:], image_rotary_emb, sequence_dim=1)
            if not attn.is_cross_attention:
                key[:, text_length:] = apply_rotary_emb(key[:, text_length:], image_rotary_emb, sequence_dim=1)
        hidden_states = self.kernel(query, key, value).flatten(2)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_length, hidden_states.size(1) - text_length], dim=1)
        return hidden_states, encoder_hidden_states


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


def set_attention(transformer: torch.nn.Module, setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """Install the kernel `model.attention` resolves to; `sdpa` leaves diffusers' own processor in place."""
    name = resolve_attention(setting, device, dtype)
    if name == "fa4":
        _register_fa4_ops()
        transformer.set_attn_processor(KernelAttnProcessor(fa4_attention, "fa4"))
        logger.info("model.attention=%s: FlashAttention-4 kernels", setting)
    elif setting == "auto":
        logger.info("model.attention=auto: torch SDPA (%s)", fa4_unavailable(device, dtype))
    return name


def attention_in_use(transformer: torch.nn.Module) -> str:
    """The kernel the transformer's attention runs: "fa4" or "sdpa"."""
    processor = next(iter(transformer.attn_processors.values()))
    return processor.name if isinstance(processor, KernelAttnProcessor) else "sdpa"
