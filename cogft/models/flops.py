"""Model FLOPs of a CogVideoX transformer step, counted from its configuration.

Counted per token sequence (text tokens + video patches, as the variant counts them): the q/k/v/out
projections and the 4x feed-forward (24·S·d² per block) and attention scores and mixing (4·S²·d per
block), forward only; the norms, embeddings and timestep MLP are under 1 % and left out. A training
step is forward plus backward: 2x forward for the weight-gradient-free LoRA backward of frozen layers
(input gradients only, attention's backward counted at 2x), 3x forward for SFT. Recompute from
checkpointing is not counted: these are model FLOPs, the convention behind MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from .family import Variant

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name fragment: the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


@dataclass(frozen=True)
class StepFlops:
    tokens: int
    linear: float     # forward FLOPs of the projections and feed-forward
    attention: float  # forward FLOPs of QK^T and AV

    def training(self, mode: str) -> float:
        if mode == "sft":
            return 3 * (self.linear + self.attention)
        return 2 * self.linear + 3 * self.attention


def step_flops(variant: Variant, num_frames: int, height: int, width: int, batch_size: int) -> StepFlops:
    cfg = variant.configs.transformer
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = variant.tokens(num_frames, height, width)
    layers = cfg["num_layers"]
    linear = 24.0 * tokens * d * d * layers * batch_size
    attention = 4.0 * tokens * tokens * d * layers * batch_size
    return StepFlops(tokens, linear, attention)


def peak_tflops(device_name: str) -> float | None:
    for fragment, peak in PEAK_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None
