"""The trained model's own prediction on one fixed input: what the export check holds the export to.

A render of many denoising steps amplifies the last bits of each kernel's rounding: on an H200 the stock
pipeline's render of a correct export landed 1.28 pixel levels (mean) from the compiled in-training render of the
tiny 5B (bf16), more than its weak LoRA moved it. One forward does not amplify, and running it with the adapter
off on both sides measures that rounding where it happens: the same frozen weights through training's kernels
and through the stock pipeline's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import Config
from ..models.adapters import adapter_in_dtype
from ..models.modes import adapter_disabled, evaluating
from .backends import shards_weights
from .step import TrainingStep

PROBE_TIMESTEP = 500  # mid-schedule: the prediction depends on both the noise and the prompt


def export_probe(step: TrainingStep, model: torch.nn.Module, config: Config,
                 prompt_file: str | Path) -> dict[str, torch.Tensor]:
    """{x_t, t, trained} (and `base`, with the adapter off, for a LoRA; `released`, with the adapter weights in the
    model's dtype as the stock pipeline holds them, for DoRA, LoHa and LoKr unless sharded) at the first validation
    prompt's size and embedding, on the host. Every process calls it (a sharded model's forward needs them all)."""
    device, variant = step.accelerator.device, step.variant
    embeds = load_file(str(prompt_file))["prompt_embeds"][None].to(device)
    inputs = variant.probe_inputs(config.data.num_frames, *config.validation_size(0), embeds,
                                  torch.Generator().manual_seed(config.validation.seed), PROBE_TIMESTEP, device)
    x_t, t = inputs.x0, inputs.timesteps

    def predict() -> torch.Tensor:
        return variant.predict(model, x_t, t, inputs, cast_inputs=step.deepspeed).float()

    with evaluating(model):
        probe = {"x_t": x_t, "t": t, "trained": predict()}
        if config.train.mode == "lora":
            with adapter_disabled(model):
                probe["base"] = predict()
        if config.train.mode == "lora" and config.lora.type != "lora" and not shards_weights(step.accelerator):
            with adapter_in_dtype(model, variant.dtype):
                probe["released"] = predict()
    return {key: value.cpu().contiguous() for key, value in probe.items()}
