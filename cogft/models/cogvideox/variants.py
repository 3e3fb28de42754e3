"""The CogVideoX variants: CogVideoX-2B (sincos positions, fp16), CogVideoX-5B (3D RoPE, bf16) and
CogVideoX 1.5-5B (latent frames patched in pairs, RoPE on a sliced grid, 81 frames at 16 fps, 768x1360),
which share the text-to-video behaviour of `TextToVideoSpec`; and the image-to-video models of 5B (a learned
position table fixes its clip size) and 1.5 (an `ofs` input), which share `ImageToVideoSpec`'s. Within a
family they differ in data only.

The tiny configurations use the same classes at toy sizes and differ between the two the way the
real ones do (positions, VAE scaling factor, scheduler shift), so every variant-specific path runs in
the CPU tests.
"""

from __future__ import annotations

from ..family import ClipSize, ModelFamily, PipelineConfigs
from . import reference
from .control import ControlSpec, TextToVideoSpec
from .image_to_video import ImageToVideoSpec
from .spec import explain_unmatched

_NATIVE_1_0 = ClipSize(num_frames=49, height=480, width=720, fps=8.0)
_NATIVE_1_5 = ClipSize(num_frames=81, height=768, width=1360, fps=16.0)

_TINY_TRANSFORMER = {
    "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "time_embed_dim": 32,
    "text_embed_dim": 32, "num_layers": 2, "sample_width": 12, "sample_height": 8, "sample_frames": 9,
    "patch_size": 2, "max_text_seq_length": 16,
}
_TINY_T5_ENCODER = {  # the vocabulary size is the tokenizer's, set when the tiny pipeline is built
    "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
}
_TINY_VAE = {
    "block_out_channels": [8, 8, 16, 16], "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
    "sample_height": 64, "sample_width": 96,
}


_KEPT_FROM_FULL_SIZE = ("use_rotary_positional_embeddings", "use_learned_positional_embeddings", "patch_size_t",
                        "patch_bias")
# 1.5's sliced RoPE grid must cover the largest clip: 40 latent pixels (20 patches, 320 pixels) a side
_TINY_1_5_GRID = {"sample_height": 40, "sample_width": 40}


def _tiny(full: PipelineConfigs) -> PipelineConfigs:
    """Toy sizes with the full model's positions, frame patching, VAE scaling and scheduler."""
    kept = {k: full.transformer[k] for k in _KEPT_FROM_FULL_SIZE if k in full.transformer}
    transformer = {**_TINY_TRANSFORMER, **kept}
    if transformer.get("patch_size_t"):
        transformer.update(_TINY_1_5_GRID)
    if full.transformer["in_channels"] == 2 * full.vae["latent_channels"]:  # image or control latents beside
        transformer["in_channels"] = 2 * _TINY_VAE["latent_channels"]
    if full.transformer.get("ofs_embed_dim"):  # added to the time embedding, so of its width
        transformer["ofs_embed_dim"] = transformer["time_embed_dim"]
    vae = {**_TINY_VAE, **{k: full.vae[k] for k in ("scaling_factor", "invert_scale_latents") if k in full.vae}}
    return PipelineConfigs(model_index=full.model_index, transformer=transformer, vae=vae, scheduler=full.scheduler,
                           text_encoder=_TINY_T5_ENCODER)


COGVIDEOX_2B = TextToVideoSpec(
    name="cogvideox-2b", family="cogvideox", short="2b", hub_id="THUDM/CogVideoX-2b", dtype="fp16", rotary=False,
    native=_NATIVE_1_0, reference=reference.COGVIDEOX_2B, tiny=_tiny(reference.COGVIDEOX_2B),
    license="apache-2.0", license_name=None, license_link=None,
)
COGVIDEOX_5B = TextToVideoSpec(
    name="cogvideox-5b", family="cogvideox", short="5b", hub_id="THUDM/CogVideoX-5b", dtype="bf16", rotary=True,
    native=_NATIVE_1_0, reference=reference.COGVIDEOX_5B, tiny=_tiny(reference.COGVIDEOX_5B),
)
COGVIDEOX_1_5_5B = TextToVideoSpec(
    name="cogvideox1.5-5b", family="cogvideox", short="1.5-5b", hub_id="THUDM/CogVideoX1.5-5B", dtype="bf16",
    rotary=True, native=_NATIVE_1_5, patch_size_t=2, reference=reference.COGVIDEOX_1_5_5B,
    tiny=_tiny(reference.COGVIDEOX_1_5_5B),
)
COGVIDEOX_5B_I2V = ImageToVideoSpec(
    name="cogvideox-5b-i2v", family="cogvideox", short="5b-i2v", hub_id="THUDM/CogVideoX-5b-I2V", dtype="bf16",
    rotary=True, native=_NATIVE_1_0, learned_positions=True, reference=reference.COGVIDEOX_5B_I2V,
    tiny=_tiny(reference.COGVIDEOX_5B_I2V),
)
COGVIDEOX_1_5_5B_I2V = ImageToVideoSpec(
    name="cogvideox1.5-5b-i2v", family="cogvideox", short="1.5-5b-i2v", hub_id="THUDM/CogVideoX1.5-5B-I2V",
    dtype="bf16", rotary=True, native=_NATIVE_1_5, patch_size_t=2, ofs=2.0, reference=reference.COGVIDEOX_1_5_5B_I2V,
    tiny=_tiny(reference.COGVIDEOX_1_5_5B_I2V),
)

# CogVideoX-Fun's control models train and sample in bf16, as they were made
COGVIDEOX_FUN_2B_CONTROL = ControlSpec(
    name="cogvideox-fun-2b-control", family="cogvideox", short="fun-2b-control",
    hub_id="alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose", dtype="bf16", rotary=False, native=_NATIVE_1_0,
    reference=reference.COGVIDEOX_FUN_2B_CONTROL, tiny=_tiny(reference.COGVIDEOX_FUN_2B_CONTROL),
    license="apache-2.0", license_name=None, license_link=None,
)
COGVIDEOX_FUN_5B_CONTROL = ControlSpec(
    name="cogvideox-fun-5b-control", family="cogvideox", short="fun-5b-control",
    hub_id="alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose", dtype="bf16", rotary=True, native=_NATIVE_1_0,
    reference=reference.COGVIDEOX_FUN_5B_CONTROL, tiny=_tiny(reference.COGVIDEOX_FUN_5B_CONTROL),
)

FAMILY = ModelFamily(
    name="cogvideox",
    specs=(COGVIDEOX_2B, COGVIDEOX_5B, COGVIDEOX_5B_I2V, COGVIDEOX_1_5_5B, COGVIDEOX_1_5_5B_I2V,
           COGVIDEOX_FUN_2B_CONTROL, COGVIDEOX_FUN_5B_CONTROL),
    explain=explain_unmatched,
)
