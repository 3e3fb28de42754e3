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
from .adapters import adapter_disabled, evaluating
from .objective import frames_first
from .step import TrainingStep

PROBE_TIMESTEP = 500  # mid-schedule: the prediction depends on both the noise and the prompt


def export_probe(step: TrainingStep, model: torch.nn.Module, config: Config,
                 prompt_file: str | Path) -> dict[str, torch.Tensor]:
    """{x_t, t, trained} (and `base`, with the adapter off, for a LoRA) at the first validation prompt's size and
    embedding, on the host. Every process calls it (a sharded model's forward needs them all)."""
    device, variant = step.accelerator.device, step.variant
    height, width = config.validation_size(0)
    shape = (1, variant.configs.vae["latent_channels"], variant.latent_frames(config.data.num_frames),
             height // variant.vae_scale_spatial, width // variant.vae_scale_spatial)
    x_t = frames_first(torch.randn(shape, generator=torch.Generator().manual_seed(config.validation.seed)),
                       variant.patch_size_t).to(device)
    t = torch.tensor([PROBE_TIMESTEP], device=device)
    embeds = load_file(str(prompt_file))["prompt_embeds"][None].to(device)
    image_latents = torch.zeros_like(x_t) if variant.spec.image_conditioned else None  # the same on both sides
    predict = step.velocity_predictor(model, embeds, step.rotary_for(x_t), image_latents)
    with evaluating(model):
        probe = {"x_t": x_t, "t": t, "trained": predict(x_t, t).float()}
        if config.train.mode == "lora":
            with adapter_disabled(model):
                probe["base"] = predict(x_t, t).float()
    return {key: value.cpu().contiguous() for key, value in probe.items()}
