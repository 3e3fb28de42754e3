"""The CogVideoX 1.0 text-to-video variants: CogVideoX-2B (sincos positions, fp16) and CogVideoX-5B
(3D RoPE, bf16). Both share the text-to-video behaviour of `VariantSpec`; they differ in data only.

The tiny configurations use the same classes at toy sizes and differ between the two the way the
real ones do (positions, VAE scaling factor, scheduler shift), so every variant-specific path runs in
the CPU tests.
"""

from __future__ import annotations

from . import reference
from .spec import PipelineConfigs, VariantSpec

_TINY_TRANSFORMER = {
    "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "time_embed_dim": 32,
    "text_embed_dim": 32, "num_layers": 2, "sample_width": 12, "sample_height": 8, "sample_frames": 9,
    "patch_size": 2, "max_text_seq_length": 16,
}
_TINY_VAE = {
    "block_out_channels": [8, 8, 16, 16], "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
    "sample_height": 64, "sample_width": 96,
}


def _tiny(full: PipelineConfigs) -> PipelineConfigs:
    """Toy sizes with the full model's positions, VAE scaling factor and scheduler."""
    rotary = full.transformer["use_rotary_positional_embeddings"]
    return PipelineConfigs(
        model_index=full.model_index,
        transformer={**_TINY_TRANSFORMER, "use_rotary_positional_embeddings": rotary},
        vae={**_TINY_VAE, "scaling_factor": full.vae["scaling_factor"]},
        scheduler=full.scheduler,
    )


COGVIDEOX_2B = VariantSpec(
    name="cogvideox-2b", short="2b", hub_id="THUDM/CogVideoX-2b", dtype="fp16", rotary=False,
    reference=reference.COGVIDEOX_2B, tiny=_tiny(reference.COGVIDEOX_2B),
)
COGVIDEOX_5B = VariantSpec(
    name="cogvideox-5b", short="5b", hub_id="THUDM/CogVideoX-5b", dtype="bf16", rotary=True,
    reference=reference.COGVIDEOX_5B, tiny=_tiny(reference.COGVIDEOX_5B),
)
