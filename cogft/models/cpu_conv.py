"""The VAE's 3-D convolutions through oneDNN on a machine without CUDA.

On a CPU, torch picks its own im2col convolution over oneDNN's for a batch-1 input of fewer than 20,480 elements in
its first four dimensions (N·C·D·H), and for the small VAEs a CPU runs (the tiny models of the demo and the tests:
8-16 channels) that path is about 8x slower: a 9-frame 64x96 decode takes 1.9 s against 0.22 s, which is most of a
tiny validation. The numbers differ by float rounding (1e-5). CUDA machines keep torch's own choice, untouched.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _onednn_conv3d(self: nn.Conv3d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if (input.device.type == "cpu" and input.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):  # `data.compile_vae`: inductor picks its own kernels
        return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, self.padding, self.stride,
                                        self.dilation, self.groups)
    return nn.Conv3d._conv_forward(self, input, weight, bias)


def onednn_conv3d_on_cpu(module: nn.Module) -> None:
    """Run `module`'s zero-padded Conv3d layers through oneDNN where there is no CUDA (state dict unchanged)."""
    if torch.cuda.is_available() or not torch.backends.mkldnn.is_available():
        return
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            conv._conv_forward = types.MethodType(_onednn_conv3d, conv)
