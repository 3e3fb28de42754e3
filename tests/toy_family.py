"""A second model family that no file under cogft/ names: a two-block DiT made of diffusers parts, an image VAE run
frame by frame, a small T5, and a rectified-flow objective, registered through `register_family`.

It proves the seam of `cogft/models/family.py`: everything cogft does to a model (prepare, train, resume, sample,
export) goes through the contract. Importing this module registers the family (`COGFT_FAMILIES=toy_family` makes
a launched process do the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import Mochi1LoraLoaderMixin, PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from cogft.config import Config, ConfigError
from cogft.models.attention import KernelProcessor
from cogft.models.family import (
    DATA_SIZE_KEYS,
    ClipSize,
    ModelFamily,
    ModelInputs,
    PipelineConfigs,
    TrainingDraws,
    Variant,
    VariantSpec,
)
from cogft.models.objective_options import REFERENCE, Objective
from cogft.models.registry import register_family


class ToyDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Latent pixels as tokens after the prompt's, one joint self-attention per block, the timestep added."""

    @register_to_config
    def __init__(self, in_channels: int = 4, num_layers: int = 2, num_attention_heads: int = 2,
                 attention_head_dim: int = 8, text_embed_dim: int = 24, max_text_seq_length: int = 8,
                 patch_size: int = 1):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.proj_in = nn.Linear(in_channels, inner)
        self.text_proj = nn.Linear(text_embed_dim, inner)
        self.time_proj = Timesteps(inner, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(inner, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(inner)
        self.proj_out = nn.Linear(inner, in_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                return_dict: bool = True):
        b, f, c, h, w = hidden_states.shape
        video = self.proj_in(hidden_states.permute(0, 1, 3, 4, 2).reshape(b, f * h * w, c))
        time = self.time_embed(self.time_proj(timestep.expand(b)).to(video.dtype))
        text = self.text_proj(encoder_hidden_states)
        tokens = torch.cat([text, video + time[:, None]], dim=1)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        out = self.proj_out(self.norm_out(tokens[:, text.shape[1]:])).reshape(b, f, h, w, c).permute(0, 1, 4, 2, 3)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


class ToyKernelProcessor(KernelProcessor):
    """The blocks' self-attention through another kernel (`model.attention`)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **_):
        query, key, value = (p(hidden_states).unflatten(-1, (attn.heads, -1))
                             for p in (attn.to_q, attn.to_k, attn.to_v))
        return attn.to_out[1](attn.to_out[0](self.kernel(query, key, value).flatten(2)))


class ToyPipeline(DiffusionPipeline, Mochi1LoraLoaderMixin):
    """Text to video by Euler steps of the rectified flow, with classifier-free guidance."""

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)

    def encode_prompt(self, texts: list[str], device, dtype) -> torch.Tensor:
        length = self.transformer.config.max_text_seq_length if self.transformer else 8
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0].to(dtype)

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_embeds=None, negative_prompt_embeds=None, num_frames: int = 9,
                 height: int = 64, width: int = 96, num_inference_steps: int = 4, guidance_scale: float = 1.0,
                 generator=None, output_type: str = "latent", callback_on_step_end=None):
        device = self.transformer.device
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt([prompt], device, self.transformer.dtype)
        guided = guidance_scale > 1 and negative_prompt_embeds is not None
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (1, num_frames, self.vae.config.latent_channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=generator, device=generator.device).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.scheduler.timesteps):
            velocity = self.transformer(latents, prompt_embeds, t[None], return_dict=False)[0]
            if guided:
                unconditional = self.transformer(latents, negative_prompt_embeds, t[None], return_dict=False)[0]
                velocity = unconditional + guidance_scale * (velocity - unconditional)
            latents = self.scheduler.step(velocity.float(), t, latents.float()).prev_sample.to(latents.dtype)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        return SimpleNamespace(frames=latents)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, F, C, h, w] latents to [B, F, 3, H, W] pixels in [-1, 1], frame by frame."""
        b, f = latents.shape[:2]
        frames = self.vae.decode(latents.flatten(0, 1) / self.vae.config.scaling_factor).sample
        return frames.unflatten(0, (b, f))


@dataclass(frozen=True)
class ToySpec(VariantSpec):
    pipeline_class: Any = ToyPipeline
    transformer_class: Any = ToyDiT
    vae_class: str = "AutoencoderKL"
    scheduler_class: str = "FlowMatchEulerDiscreteScheduler"

    def matches(self, configs: PipelineConfigs) -> bool:
        return configs.model_index.get("_class_name") == "ToyPipeline"

    def bind(self, configs: PipelineConfigs, dtype: str = "auto") -> ToyVariant:
        return ToyVariant(self, configs, self.torch_dtype(dtype))


@dataclass(frozen=True)
class ToyVariant(Variant):
    """Geometry from the configs by diffusers' conventions (the base's); the rest is the toy's own."""

    def frame_buckets(self, num_frames: int, min_frames: int) -> tuple[int, ...]:
        return tuple(range(num_frames, min_frames - 1, -4))

    def resolve(self, config: Config) -> Config:
        data = config.data
        self.check_clip_size(data.num_frames, data.height, data.width)
        return config

    def check_clip_size(self, num_frames: int, height: int, width: int, shortest_bucket: int | None = None,
                        names: tuple[str, str, str, str] = DATA_SIZE_KEYS) -> None:
        for key, value in ((names[1], height), (names[2], width)):
            if value % self.vae_scale_spatial:
                raise ConfigError(f"{key}={value}: {self.name} needs a multiple of {self.vae_scale_spatial}")

    def single_frame_problem(self) -> str | None:
        return None

    def encode_sample(self, vae, frames: np.ndarray, conditions: dict, seed: int, config: Config,
                      device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0  # [F, 3, H, W]
        with torch.no_grad():
            latent = vae.encode(pixels).latent_dist
        return {"toy_mean": latent.mean, "toy_logvar": latent.logvar}  # [F, C, h, w]

    def embed_prompts(self, pipe, texts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return pipe.encode_prompt(texts, device, dtype)

    # the rectified flow: x_t = (1 - s) x0 + s noise, the model predicts noise - x0 at t = 1000 s
    def _x0(self, batch: dict[str, torch.Tensor], eps: torch.Tensor | None) -> torch.Tensor:
        mean, logvar = batch["toy_mean"].float(), batch["toy_logvar"].float()
        sample = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps
        return sample * float(self.configs.vae["scaling_factor"])

    def batch_geometry(self, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
        samples, frames, _, height, width = batch["toy_mean"].shape
        return samples, frames, height * self.vae_scale_spatial, width * self.vae_scale_spatial

    def draw_inputs(self, batch: dict[str, torch.Tensor], draws: TrainingDraws, scheduler) -> ModelInputs:
        shape, device = batch["toy_mean"].shape[1:], batch["toy_mean"].device
        eps = torch.stack([torch.randn(shape, generator=g) for g in draws.generators]).to(device)
        noise = torch.stack([torch.randn(shape, generator=g) for g in draws.generators]).to(device)
        sigmas = torch.stack([torch.rand((), generator=g) for g in draws.generators]).to(device)
        return ModelInputs(self._x0(batch, eps), noise, sigmas * 1000, batch["prompt_embeds"])

    def fixed_inputs(self, batch: dict[str, torch.Tensor], noise_generator: torch.Generator,
                     timestep: int) -> ModelInputs:
        x0 = self._x0(batch, None)
        noise = torch.randn(x0.shape[1:], generator=noise_generator)[None].to(x0.device)
        return ModelInputs(x0, noise, torch.tensor([float(timestep)], device=x0.device), batch["prompt_embeds"])

    def probe_inputs(self, num_frames: int, height: int, width: int, prompt_embeds: torch.Tensor,
                     generator: torch.Generator, timestep: int, device: torch.device) -> ModelInputs:
        side = self.vae_scale_spatial
        x = torch.randn((1, num_frames, self.latent_channels, height // side, width // side), generator=generator)
        return ModelInputs(x.to(device), torch.zeros_like(x).to(device), torch.tensor([float(timestep)], device=device),
                           prompt_embeds)

    def predict(self, model, x_t, timesteps, inputs: ModelInputs, cast_inputs: bool = False) -> torch.Tensor:
        return model(x_t, inputs.prompt_embeds, timesteps, return_dict=False)[0]

    def loss(self, model, inputs: ModelInputs, scheduler, cast_inputs: bool = False,
             objective: Objective = REFERENCE, target=None) -> torch.Tensor:  # its own objective only
        return self.sample_losses(model, inputs, scheduler, cast_inputs, objective, target).mean()

    def sample_losses(self, model, inputs: ModelInputs, scheduler, cast_inputs: bool = False,
                      objective: Objective = REFERENCE, target=None) -> torch.Tensor:
        sigma = (inputs.timesteps.float() / 1000).view(-1, 1, 1, 1, 1)
        x_t = (1 - sigma) * inputs.x0 + sigma * inputs.noise
        wanted = inputs.noise - inputs.x0
        if target is not None:  # a prior sample: the base model's own velocity
            with torch.no_grad():
                wanted = target(x_t, inputs.timesteps).float()
        velocity = self.predict(model, x_t, inputs.timesteps, inputs).float()
        return ((velocity - wanted) ** 2).flatten(1).mean(1)

    def reference_loss(self, transformer, batch: dict[str, torch.Tensor], scheduler) -> torch.Tensor:
        x0 = self._x0(batch, torch.randn_like(batch["toy_mean"].float()))
        return self.loss(transformer, ModelInputs(x0, torch.randn_like(x0), torch.rand(x0.shape[0]) * 1000,
                                                  batch["prompt_embeds"]), scheduler)

    def synthetic_batch(self, config: Config, batch_size: int, num_frames: int, height: int, width: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        side = self.vae_scale_spatial
        shape = (batch_size, num_frames, self.latent_channels, height // side, width // side)
        return {"toy_mean": torch.randn(shape, generator=generator), "toy_logvar": torch.full(shape, -4.0),
                "prompt_embeds": torch.randn((batch_size, self.max_text_seq_length, self.text_embed_dim),
                                             generator=generator)}

    def pipeline_inputs(self, *, prompt, prompt_embeds, negative_prompt_embeds, image=None,
                        control=None) -> dict[str, Any]:
        return {"prompt": prompt, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

    def render_latents(self, pipe, conditioning: dict[str, Any], *, num_frames: int, height: int, width: int,
                       steps: int, guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
        return pipe(**conditioning, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator).frames

    def decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            pixels = pipe.decode_latents(latents.to(pipe.vae.dtype))[0]
        return ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    def attention_processor(self, kernel, name: str) -> ToyKernelProcessor:
        return ToyKernelProcessor(kernel, name)


_TINY = PipelineConfigs(
    model_index={"_class_name": "ToyPipeline"},
    transformer={"in_channels": 4, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                 "text_embed_dim": 24, "max_text_seq_length": 8, "patch_size": 1},
    vae={"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
         "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 8, 16, 16], "latent_channels": 4,
         "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64, "scaling_factor": 0.5},
    scheduler={"num_train_timesteps": 1000, "shift": 1.0},
    text_encoder={"d_model": 24, "d_kv": 8, "d_ff": 48, "num_layers": 1, "num_heads": 3,
                  "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
)

TOY = ToySpec(name="toydit", family="toy", short="toy", hub_id="nobody/toydit", dtype="fp32",
              native=ClipSize(num_frames=9, height=64, width=96, fps=8.0), reference=_TINY, tiny=_TINY)
FAMILY = ModelFamily(name="toy", specs=(TOY,))
register_family(FAMILY)

# the classes a saved pipeline names are found in this module (model_index.json: ["toy_family", "ToyDiT"])
__all__ = ["AutoencoderKL", "FAMILY", "FlowMatchEulerDiscreteScheduler", "TOY", "ToyDiT", "ToyPipeline"]
