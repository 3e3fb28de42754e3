"""`model.fp8_base`: the frozen transformer's linear weights stored in float8, upcast layer by layer for compute.

Storage is scaled per output row by a power of two, so each row's largest weight lands near e4m3's top (448)
and every weight keeps e4m3's 3 mantissa bits (a relative error of at most 1/16) whatever its magnitude. A
plain cast, as diffusers' layerwise casting does, puts weights below 2^-6 among e4m3's subnormals, where the
step is a fixed 2^-9: most of a transformer's weights, at a relative error that grows as they shrink, which
is why diffusers has to leave the norm-modulation linears (0.8 B parameters in the 5B model) in bf16. With
the scale they are stored in float8 too; only the patch embedding (the input projections) stays as it is.
The rescale by a power of two is exact in the compute dtype.

diffusers' hooks also cast each layer's weight back to float8 right after its forward; inside the per-block
`torch.compile` the checkpointed recompute's backward then met float8 (`expected mat1 and mat2 to have the
same dtype`, H200, torch 2.11). Here the upcast is an ordinary op in the layer's forward (and again in its
backward) that autograd and the compiler see. The adapter goes in first and its layers are skipped: peft before
0.19 gives a new adapter its base layer's dtype, which would round the adapter to float8.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

FP8_STORAGE = torch.float8_e4m3fn  # e4m3: more mantissa than e5m2, for weights
SKIPPED = ("patch_embed", "lora_")  # the input projections of latents and text; the adapter's layers


class _Float8Linear(torch.autograd.Function):
    """`F.linear` on the upcast weight, saving the float8 weight (already in memory) for the backward instead of its
    upcast copy, which autograd would keep for every layer until the backward: without checkpointing, more than
    the bf16 weights float8 replaced. The frozen weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight, scale)
        return F.linear(hidden, weight.to(scale.dtype) * scale, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale = ctx.saved_tensors
        return grad_output.to(scale.dtype) @ (weight.to(scale.dtype) * scale), None, None, None


def _upcast_linear(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return _Float8Linear.apply(hidden, self.weight, self.weight_scale, self.bias)


def row_scales(weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """Per output row, the power of two that maps the row's largest magnitude into (224, 448]; never below the
    compute dtype's smallest normal number, so it and the rescaled weights stay exact there."""
    amax = weight.detach().abs().amax(dim=1, keepdim=True).float()
    exponent = torch.ceil(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny) / torch.finfo(FP8_STORAGE).max))
    return torch.exp2(exponent).clamp(min=torch.finfo(compute_dtype).tiny).to(compute_dtype)


def quantize(weight: torch.Tensor, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, per-row scale) with `float8.to(compute_dtype) * scale` ≈ weight."""
    scale = row_scales(weight, compute_dtype)
    return (weight.detach().float() / scale.float()).to(FP8_STORAGE), scale


def store_in_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store every eligible linear weight of the (frozen) transformer in scaled float8; after the adapter is added."""
    for name, module in transformer.named_modules():
        if type(module) is torch.nn.Linear and is_fp8_parameter_name(name):
            module.weight.data, scale = quantize(module.weight.data, compute_dtype)
            module.register_buffer("weight_scale", scale, persistent=False)  # in the compute dtype; in no state dict
            module.forward = types.MethodType(_upcast_linear, module)


def is_fp8_parameter_name(name: str) -> bool:
    """Whether `store_in_fp8` stores the linear layer called `name` in float8 (the cost model counts them)."""
    return not any(part in name for part in SKIPPED)
