"""What differs between CogVideoX families, read from the pipeline's own configs.

The trainer, the objective and the sampler consult this one small description instead of branching
on a model name: positions (sincos vs 3D RoPE), the VAE scaling factor, the prompt length and the
precision policy all come from `model_index.json` and the component configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelFamily:
    name: str                    # "sincos" (CogVideoX-2B style) or "rotary" (5B style)
    dtype: torch.dtype           # weights and autocast: fp16 for 2B, bf16 for 5B
    use_rotary: bool
    scaling_factor: float        # VAE latent scale
    max_text_seq_length: int     # T5 tokens the transformer expects
    vae_scale_spatial: int       # pixels per latent pixel
    vae_scale_temporal: int      # frames per latent frame (after the first)

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1


def family_from_configs(transformer_config: dict, vae_config: dict, dtype: str = "auto") -> ModelFamily:
    use_rotary = bool(transformer_config.get("use_rotary_positional_embeddings", False))
    if dtype == "auto":
        dtype = "bf16" if use_rotary else "fp16"
    return ModelFamily(
        name="rotary" if use_rotary else "sincos",
        dtype=DTYPES[dtype],
        use_rotary=use_rotary,
        scaling_factor=float(vae_config["scaling_factor"]),
        max_text_seq_length=int(transformer_config["max_text_seq_length"]),
        vae_scale_spatial=2 ** (len(vae_config["block_out_channels"]) - 1),
        vae_scale_temporal=int(vae_config.get("temporal_compression_ratio", 4)),
    )


def read_component_config(model_path: str, component: str, revision: str | None = None) -> dict:
    """A component's config from a local pipeline folder or a hub id (cached by huggingface_hub)."""
    filename = "scheduler_config.json" if component == "scheduler" else "config.json"
    local = Path(model_path) / component / filename
    if local.is_file():
        return json.loads(local.read_text())
    if Path(model_path).exists():
        raise FileNotFoundError(f"{local} not found: {model_path} is not a diffusers CogVideoX pipeline folder")
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model_path, filename, subfolder=component, revision=revision)).read_text())


def load_family(model_path: str, dtype: str = "auto", revision: str | None = None) -> ModelFamily:
    return family_from_configs(
        read_component_config(model_path, "transformer", revision),
        read_component_config(model_path, "vae", revision),
        dtype,
    )
