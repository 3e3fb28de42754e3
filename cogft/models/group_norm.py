"""A GroupNorm for the CogVideoX VAE's shape: 32 groups over rows of millions of values.

torch's CUDA group norm gives each (sample, group) row one thread block for its statistics, so at
batch 1 it keeps 32 of an H100's 132 SMs busy, a large share of a 49×480×720 decode. Here the
statistics are ordinary torch reductions, which split a long row over the whole GPU, and the
normalisation is one multiply-add pass. Parameters and state dict are those of `nn.GroupNorm`.
Inside `torch.compile` it is torch's own group norm, which inductor already spreads.
"""

from __future__ import annotations

import torch
from torch import nn


class SpreadGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` with statistics in fp32 from two-pass reductions spread over the device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor splits torch's group norm itself (`data.compile_vae`)
            return super().forward(x)
        n, channels = x.shape[:2]
        rows = x.reshape(n, self.num_groups, -1)
        mean = rows.mean(-1, keepdim=True, dtype=torch.float32)
        # centre on the mean rounded to x's dtype, so a large offset cannot cancel away the variance
        pivot = mean.to(x.dtype)
        centred = rows - pivot
        norm = torch.linalg.vector_norm(centred, dim=-1, keepdim=True, dtype=torch.float32)
        mean_square = norm.square() / rows.shape[-1]
        variance = (mean_square - (mean - pivot.float()).square()).clamp(min=0)
        scale = torch.rsqrt(variance + self.eps)                      # [n, groups, 1]: y = x·scale + shift
        shift = -mean * scale
        per_group = channels // self.num_groups
        scale = scale.expand(n, self.num_groups, per_group).reshape(n, channels)
        shift = shift.expand(n, self.num_groups, per_group).reshape(n, channels)
        if self.affine:
            shift = shift * self.weight + self.bias
            scale = scale * self.weight
        shape = (n, channels) + (1,) * (x.dim() - 2)
        # from x itself, in fp32 and rounded once, as torch's kernel does; the output reuses `centred`'s memory
        if torch.is_grad_enabled():  # autograd cannot write into an existing buffer
            return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)
        return torch.addcmul(shift.view(shape), x, scale.view(shape), out=centred.view(x.shape))


def spread_group_norms(module: nn.Module) -> int:
    """Switch every plain `nn.GroupNorm` inside `module` to `SpreadGroupNorm`, in place; returns how many."""
    switched = 0
    for child in module.modules():
        if type(child) is nn.GroupNorm:
            child.__class__ = SpreadGroupNorm
            switched += 1
    return switched
