"""`model.fp8_base`: the frozen transformer's linear weights stored in float8, upcast layer by layer for compute.

diffusers' layerwise casting does this with hooks that cast each layer's weights up before its forward and
back down after it; inside the per-block `torch.compile` the backward (a checkpointed block's recompute) then
met the weight already cast back to float8 (`expected mat1 and mat2 to have the same dtype: BFloat16 !=
Float8_e4m3fn`, H200, torch 2.11). Here the weight stays float8 and each forward reads it through
`weight.to(compute dtype)`: an ordinary op that autograd and the compiler see, so the upcast copy lives only
as long as the layer's computation needs it. The layers diffusers leaves alone for CogVideoX (embeddings,
norms and their modulation layers) stay as they are; so do the adapter's own fp32 weights, added after.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

FP8_STORAGE = torch.float8_e4m3fn  # e4m3: more mantissa than e5m2, for weights
SKIPPED = ("patch_embed", "norm")  # CogVideoX's `_skip_layerwise_casting_patterns` in diffusers


def _upcast_linear(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, self.weight.to(self.compute_dtype), self.bias)


def store_in_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every eligible linear weight of the (frozen) transformer in float8; returns how many parameters."""
    stored = 0
    for name, module in transformer.named_modules():
        if type(module) is torch.nn.Linear and is_fp8_parameter_name(name):
            module.weight.data = module.weight.data.to(FP8_STORAGE)
            module.compute_dtype = compute_dtype
            module.forward = types.MethodType(_upcast_linear, module)
            stored += module.weight.numel()
    return stored


def is_fp8_parameter_name(name: str) -> bool:
    """Whether `store_in_fp8` stores the linear layer called `name` in float8 (the cost model counts them)."""
    return not any(part in name for part in SKIPPED)
