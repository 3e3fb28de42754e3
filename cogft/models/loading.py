"""Load CogVideoX components from a local pipeline folder, a hub id or `tiny://FAMILY`.

Every route ends in diffusers/transformers `from_pretrained`, so the tiny test model and the real
checkpoints share one code path.
"""

from __future__ import annotations

import torch

from pathlib import Path

from .family import ModelFamily, load_family, read_component_config
from .group_norm import spread_group_norms
from .reference import reference_configs
from .tiny import resolve_tiny


def resolve_model_path(path: str) -> str:
    return resolve_tiny(path)


def component_configs(path: str, revision: str | None = None) -> dict[str, dict]:
    """Transformer/VAE/scheduler configs: the local pipeline's, else the built-in real ones for a known hub
    id (so full-size shapes are known offline), else downloaded from the hub."""
    path = resolve_model_path(path)
    builtin = None if Path(path).exists() else reference_configs(path)
    if builtin is not None:
        return builtin
    return {c: read_component_config(path, c, revision) for c in ("transformer", "vae", "scheduler")}


def family_for(path: str, dtype: str = "auto", revision: str | None = None) -> ModelFamily:
    return load_family(resolve_model_path(path), dtype, revision)


def load_transformer(path: str, dtype: torch.dtype, revision: str | None = None):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(
        resolve_model_path(path), subfolder="transformer", dtype=dtype, revision=revision
    )


def load_vae(path: str, dtype: torch.dtype, revision: str | None = None):
    """The VAE with its group norms spread over the GPU (`SpreadGroupNorm`: same numbers, 0.6 s less per decode)."""
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(resolve_model_path(path), subfolder="vae", dtype=dtype, revision=revision)
    spread_group_norms(vae)
    return vae


def load_scheduler(path: str, revision: str | None = None):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler.from_pretrained(resolve_model_path(path), subfolder="scheduler", revision=revision)


def load_pipeline(path: str, dtype: torch.dtype, revision: str | None = None, **components):
    """The stock pipeline around `load_vae`'s VAE; pass `transformer=None` / `vae=None` to skip loading what
    is not needed."""
    from diffusers import CogVideoXPipeline

    if "vae" not in components:
        components["vae"] = load_vae(path, dtype, revision)
    return CogVideoXPipeline.from_pretrained(resolve_model_path(path), dtype=dtype, revision=revision, **components)
