"""Built-in copies of the real CogVideoX configurations, for work that needs full-size shapes offline.

`cogft bench`, `cogft estimate` and `random://` pipelines build randomly initialised models from these
(same compute and memory as the real weights) without reaching the hub. Values are those of the
published `THUDM/CogVideoX-2b`, `THUDM/CogVideoX-5b`, `THUDM/CogVideoX-5b-I2V`, `THUDM/CogVideoX1.5-5B` and
`THUDM/CogVideoX1.5-5B-I2V` pipeline folders.
"""

from __future__ import annotations

from ..family import PipelineConfigs

_TRANSFORMER_COMMON = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-5, "out_channels": 16, "patch_size": 2,
    "sample_frames": 49, "sample_height": 60, "sample_width": 90, "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096,
    "time_embed_dim": 512, "timestep_activation_fn": "silu",
}
_VAE_COMMON = {
    "act_fn": "silu", "block_out_channels": [128, 256, 256, 512], "in_channels": 3, "out_channels": 3,
    "latent_channels": 16, "layers_per_block": 3, "norm_eps": 1e-6, "norm_num_groups": 32,
    "sample_height": 480, "sample_width": 720, "temporal_compression_ratio": 4, "force_upcast": True,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
_SCHEDULER_COMMON = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing",
}
T5_XXL_ENCODER = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dense_act_fn": "gelu_new",
    "is_gated_act": True,
}
_T2V_INDEX = {"_class_name": "CogVideoXPipeline"}
_I2V_INDEX = {"_class_name": "CogVideoXImageToVideoPipeline"}
# image-to-video: the noisy video latents and the image latents side by side on channels (16 + 16)
_I2V_CHANNELS = {"in_channels": 32, "out_channels": 16}

COGVIDEOX_2B = PipelineConfigs(
    model_index=_T2V_INDEX,
    transformer={**_TRANSFORMER_COMMON, "num_attention_heads": 30, "num_layers": 30,
                 "use_rotary_positional_embeddings": False},
    vae={**_VAE_COMMON, "scaling_factor": 1.15258426},
    scheduler={**_SCHEDULER_COMMON, "snr_shift_scale": 3.0},
    text_encoder=T5_XXL_ENCODER,
)
COGVIDEOX_5B = PipelineConfigs(
    model_index=_T2V_INDEX,
    transformer={**_TRANSFORMER_COMMON, "num_attention_heads": 48, "num_layers": 42,
                 "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False},
    vae={**_VAE_COMMON, "scaling_factor": 0.7},
    scheduler={**_SCHEDULER_COMMON, "snr_shift_scale": 1.0},
    text_encoder=T5_XXL_ENCODER,
)

# CogVideoX 1.5: frames patched in pairs (patch_size_t 2, no patch bias), RoPE over a sliced 150x150-patch grid
COGVIDEOX_1_5_5B = PipelineConfigs(
    model_index=_T2V_INDEX,
    transformer={**_TRANSFORMER_COMMON, "num_attention_heads": 48, "num_layers": 42, "patch_size_t": 2,
                 "patch_bias": False, "sample_frames": 81, "sample_height": 300, "sample_width": 300,
                 "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False},
    vae={**_VAE_COMMON, "scaling_factor": 0.7, "invert_scale_latents": True},
    scheduler={**_SCHEDULER_COMMON, "snr_shift_scale": 1.0},
    text_encoder=T5_XXL_ENCODER,
)

# 5B-I2V: 5B with a learned position table beside RoPE, sized for 49 frames at 480x720 only
COGVIDEOX_5B_I2V = PipelineConfigs(
    model_index=_I2V_INDEX,
    transformer={**COGVIDEOX_5B.transformer, **_I2V_CHANNELS, "use_learned_positional_embeddings": True},
    vae=COGVIDEOX_5B.vae,
    scheduler=COGVIDEOX_5B.scheduler,
    text_encoder=T5_XXL_ENCODER,
)
# 1.5-I2V: 1.5 with the image channels and an `ofs` embedding (the pipeline passes 2.0)
COGVIDEOX_1_5_5B_I2V = PipelineConfigs(
    model_index=_I2V_INDEX,
    transformer={**COGVIDEOX_1_5_5B.transformer, **_I2V_CHANNELS, "ofs_embed_dim": 512},
    vae=COGVIDEOX_1_5_5B.vae,
    scheduler=COGVIDEOX_1_5_5B.scheduler,
    text_encoder=T5_XXL_ENCODER,
)


# CogVideoX-Fun V1.1 Control (alibaba-pai/CogVideoX-Fun-V1.1-2b-Pose, -5b-Pose): the 2B and 5B transformers with the
# control video's 16 latent channels after the video's, run by CogVideoXFunControlPipeline with a DDIM-style
# scheduler. Made from the base models' configs (the published folders are told apart by their own configs when
# they are read, like every variant).
def _fun_control(base: PipelineConfigs) -> PipelineConfigs:
    return PipelineConfigs(
        model_index={"_class_name": "CogVideoXFunControlPipeline"},
        transformer={**base.transformer, "in_channels": 32, "out_channels": 16},
        vae=base.vae,
        scheduler={**base.scheduler, "_class_name": "CogVideoXDDIMScheduler"},
        text_encoder=T5_XXL_ENCODER,
    )


COGVIDEOX_FUN_2B_CONTROL = _fun_control(COGVIDEOX_2B)
COGVIDEOX_FUN_5B_CONTROL = _fun_control(COGVIDEOX_5B)
