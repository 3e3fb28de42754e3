"""The CogVideoX family's side of the contract (`models/family.py`): its variants' identity, geometry, what
prepare caches per clip, the objective's inputs and forward, and the stock pipeline's call.

Text-to-video is `CogVideoXSpec`/`CogVideoXVariant`; the image-to-video models add their image channels in
`image_to_video.py`. Every number (scale factors, patch sizes, token counts, prompt length) is read from the
pipeline's configs, never from the path's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ...config import Config, ConfigError
from ..family import (
    DATA_SIZE_KEYS,
    LOSS_MASK,
    ClipSize,
    ModelInputs,
    PipelineConfigs,
    TrainingDraws,
    Variant,
    VariantSpec,
)
from ..objective_options import REFERENCE, Objective
from .attention import KernelAttnProcessor
from .comfyui import KEY_FORMATS
from .objective import diffusion_losses, draw_inputs, frames_first


def frame_buckets(num_frames: int, min_frames: int) -> tuple[int, ...]:
    """The frame counts a clip may be cut to, largest first, e.g. (49, 41, 33, 25, 17) for 49 down to 17.

    `num_frames`, every 8k+1 count below it down to `min_frames`, and `min_frames` itself: 8k+1 frames
    make an odd number of latent frames, which decode back to the same length.
    """
    below = [f for f in range(num_frames - 1, min_frames - 1, -1) if f % 8 == 1]
    if min_frames < num_frames and min_frames not in below:
        below.append(min_frames)
    return (num_frames, *below)


def frame_count_problem(frames: int) -> str | None:
    """Why a clip cannot have this many frames, or None: the VAE compresses time by 4 after the first frame."""
    if (frames - 1) % 4 == 0:
        return None
    lower = frames - (frames - 1) % 4
    return f"must be 4k+1 (the VAE compresses time by 4 after the first frame); try {lower} or {lower + 4}"


def explain_unmatched(configs: PipelineConfigs) -> str:
    """What the configs say, for the error when no variant matches them."""
    t, latent = configs.transformer, configs.vae.get("latent_channels")
    found = (f"Found pipeline {configs.model_index.get('_class_name')}, transformer in_channels "
             f"{t.get('in_channels')} (VAE latent channels {latent}), rotary positions "
             f"{bool(t.get('use_rotary_positional_embeddings'))}, patch_size_t {t.get('patch_size_t')}, "
             f"ofs_embed_dim {t.get('ofs_embed_dim')}")
    if latent and t.get("in_channels") not in (latent, 2 * latent):
        return (f"transformer in_channels {t.get('in_channels')} is neither 1x nor 2x the VAE's {latent} latent "
                f"channels: not a CogVideoX pipeline cogft knows. {found}")
    if latent and t.get("in_channels") == 2 * latent and not t.get("use_learned_positional_embeddings") \
            and t.get("ofs_embed_dim") is None:
        return (f"a combination no registered variant matches (twice the latent channels without an image model's "
                f"learned positions or ofs is a control model: its model_index.json names "
                f"CogVideoXFunControlPipeline). {found}")
    return f"a combination no registered variant matches. {found}"


@dataclass(frozen=True)
class CogVideoXSpec(VariantSpec):
    """Text-to-video CogVideoX: the behaviour of the 1.0 models; other conditionings subclass it."""

    rotary: bool = False              # 3D RoPE (5B) or sincos positions (2B)
    patch_size_t: int | None = None   # CogVideoX 1.5 patches latent frames in pairs
    pipeline_class: str = "CogVideoXPipeline"
    video_to_video_class: str = "CogVideoXVideoToVideoPipeline"  # SDEdit from a source video (`cogft sample --video`)
    transformer_class: str = "CogVideoXTransformer3DModel"
    vae_class: str = "AutoencoderKLCogVideoX"
    scheduler_class: str = "CogVideoXDPMScheduler"
    license_name: str | None = "cogvideox-license"
    license_link: str | None = "https://huggingface.co/THUDM/CogVideoX-5b/blob/main/LICENSE"

    def matches(self, configs: PipelineConfigs) -> bool:
        """The pipeline class, positions and frame patching every variant is told by, then its conditioning."""
        t = configs.transformer
        return (configs.model_index.get("_class_name", self.pipeline_class) == self.pipeline_class
                and bool(t.get("use_rotary_positional_embeddings", False)) == self.rotary
                and t.get("patch_size_t") == self.patch_size_t
                and self.conditioning_matches(t, configs.vae.get("latent_channels")))

    def conditioning_matches(self, transformer: dict, latent_channels: int | None) -> bool:
        """Text only: the transformer reads the latents alone, with no learned positions and no `ofs` input."""
        return (transformer.get("in_channels") == latent_channels
                and not transformer.get("use_learned_positional_embeddings", False)
                and transformer.get("ofs_embed_dim") is None)

    def bind(self, configs: PipelineConfigs, dtype: str = "auto") -> CogVideoXVariant:
        return self.variant_class(self, configs, self.torch_dtype(dtype))

    @property
    def variant_class(self) -> type[CogVideoXVariant]:
        return CogVideoXVariant


@dataclass(frozen=True)
class CogVideoXVariant(Variant):
    """A CogVideoX spec bound to one pipeline's configs: geometry from the configs, the reference objective."""

    spec: CogVideoXSpec
    _rotary: dict = field(default_factory=dict, repr=False, compare=False)  # RoPE per (frames, height, width, device)

    @property
    def use_rotary(self) -> bool:
        return bool(self.configs.transformer.get("use_rotary_positional_embeddings", False))

    @property
    def scaling_factor(self) -> float:
        return float(self.configs.vae["scaling_factor"])

    @property
    def vae_scale_temporal(self) -> int:
        """4: the CogVideoX VAE's configs name it, and it compresses time by 4 where they do not."""
        return int(self.configs.vae.get("temporal_compression_ratio", 4))

    @property
    def patch_size_t(self) -> int:
        return int(self.configs.transformer.get("patch_size_t") or 1)

    def frame_buckets(self, num_frames: int, min_frames: int) -> tuple[int, ...]:
        return frame_buckets(num_frames, min_frames)

    @property
    def fixed_clip(self) -> ClipSize | None:
        """The only clip a learned position table fits (5B-I2V: 49 frames at 480x720), read from the transformer's
        sample size; None where positions are computed for any size."""
        t = self.transformer_config
        if not t.get("use_learned_positional_embeddings"):
            return None
        return ClipSize(num_frames=int(t["sample_frames"]), height=int(t["sample_height"]) * self.vae_scale_spatial,
                        width=int(t["sample_width"]) * self.vae_scale_spatial, fps=self.spec.native.fps)

    def resolve(self, config: Config) -> Config:
        """`config` with the variant's native clip for every `data.num_frames/height/width/fps` it leaves unset
        (CogVideoX 1.5 trains 81 frames at 16 fps, 768x1360, not the schema's 1.0 defaults; a fixed-size model
        gets no shorter frame buckets); a clip size the variant cannot take is refused by key."""
        native = self.fixed_clip or self.spec.native
        unset = {key: getattr(native, key) for key in ("num_frames", "height", "width", "fps")
                 if key not in config.data.model_fields_set}
        if self.fixed_clip and "min_frames" not in config.data.model_fields_set:
            unset["min_frames"] = native.num_frames
        if unset:
            config = config.model_copy(update={"data": config.data.model_copy(update=unset)})
        data = config.data
        self.check_clip_size(data.num_frames, data.height, data.width, data.shortest_bucket)
        self.check_sizes(config)
        return config

    def check_sizes(self, config: Config) -> None:
        """Refuse, by key, a `data.buckets` or `validation.sizes` entry this variant cannot train or render at; a
        size `data.buckets: auto` derived is named as such, not as an entry the user never wrote."""
        sizes, auto = config.data.sizes, config.data.buckets == "auto"
        derived = ", ".join(f"{h}x{w}" for h, w in sizes)
        given = [] if config.data.buckets is None else [
            (f"data.buckets=auto derives {h}x{w} from data.height x data.width (all: {derived}):" if auto
             else f"data.buckets[{i}]={h}x{w}:", "data.buckets", (h, w)) for i, (h, w) in enumerate(sizes)]
        given += [(f"validation.sizes[{i}]={h}x{w}:", "validation.sizes", (h, w))
                  for i, (h, w) in ((i, config.validation_size(i)) for i in range(len(config.validation.sizes)))]
        side, fixed = self.vae_scale_spatial * self.patch_size, self.fixed_clip
        for where, key, (height, width) in given:
            if height % side or width % side:
                raise ConfigError(f"{where} {self.name} needs multiples of {side} "
                                  f"(VAE ×{self.vae_scale_spatial}, patch {self.patch_size})")
            if fixed is not None and (height, width) != (fixed.height, fixed.width):
                raise ConfigError(f"{where} {self.name} takes only {fixed.height}x{fixed.width} (its "
                                  "learned position table fits that size alone, and the stock pipeline refuses "
                                  f"others); leave {key} out")

    def single_frame_problem(self) -> str | None:
        """Why this variant cannot train on a still image (a one-frame sample), or None where it can."""
        if self.fixed_clip is not None:
            return f"{self.name} takes only {self.fixed_clip.num_frames}-frame clips (its learned position table)"
        if "image" in self.conditions:
            return f"{self.name} makes a video from an image: a still image would be its own conditioning"
        return None

    def check_clip_size(self, num_frames: int, height: int, width: int, shortest_bucket: int | None = None,
                        names: tuple[str, str, str, str] = DATA_SIZE_KEYS) -> None:
        """Refuse, naming the key, a training size this variant cannot take (before any clip is encoded): 4k+1 frames,
        sides the latent grid divides, a learned position table's one size. `names`: what the four values (frames,
        height, width, shortest bucket) are called where they were given (config keys, or flags)."""
        side = self.vae_scale_spatial * self.patch_size
        frames_key, height_key, width_key, shortest_key = names
        for key, value in ((frames_key, num_frames), (shortest_key, shortest_bucket)):
            if value is not None and (problem := frame_count_problem(value)):
                raise ConfigError(f"{key}={value}: {problem}")
        for key, value in ((height_key, height), (width_key, width)):
            if value % side:
                raise ConfigError(f"{key}={value}: {self.name} needs a multiple of {side} "
                                  f"(VAE ×{self.vae_scale_spatial}, patch {self.patch_size}); "
                                  f"try {value - value % side}")
        fixed = self.fixed_clip
        if fixed is None:
            return
        asked = ((frames_key, num_frames, fixed.num_frames), (height_key, height, fixed.height),
                 (width_key, width, fixed.width),
                 (shortest_key, num_frames if shortest_bucket is None else shortest_bucket, fixed.num_frames))
        for key, value, wanted in asked:
            if value != wanted:
                raise ConfigError(
                    f"{key}={value}: {self.name} takes only {fixed.num_frames} frames at {fixed.height}x{fixed.width} "
                    f"(its learned position table fits that size alone, and the stock pipeline refuses others); "
                    f"set {key}={wanted} or leave it out")

    # prepare ------------------------------------------------------------------------------------------
    def encode_sample(self, vae, frames: np.ndarray, conditions: dict[str, np.ndarray | None], seed: int,
                      config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The VAE's latent distribution of the window, from which each step samples afresh (latent_mean,
        latent_logvar [C, F', h, w])."""
        pixels = torch.from_numpy(frames).to(device).permute(3, 0, 1, 2).unsqueeze(0).to(dtype) / 127.5 - 1.0
        with torch.no_grad():
            latent_dist = vae.encode(pixels).latent_dist
        return {"latent_mean": latent_dist.mean[0], "latent_logvar": latent_dist.logvar[0]}

    def embed_prompts(self, pipe, texts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False,
                                           max_sequence_length=self.max_text_seq_length, device=device, dtype=dtype)
        return embeds

    # training -----------------------------------------------------------------------------------------
    def rotary_embedding(self, height: int, width: int, latent_frames: int, device: torch.device):
        """3D RoPE as the stock pipeline computes it at inference (its own helper, its base grid from the
        transformer config's sample size); None for sincos models."""
        if not self.use_rotary:
            return None
        config = SimpleNamespace(**self.transformer_config)
        host = SimpleNamespace(transformer=SimpleNamespace(config=config),
                               vae_scale_factor_spatial=self.vae_scale_spatial)
        pipeline = self.spec.diffusers_class("pipeline")
        return pipeline._prepare_rotary_positional_embeddings(host, height, width, latent_frames, device)

    def rotary_for(self, latents: torch.Tensor):
        """RoPE for latents [B, F, C, h, w] (buckets differ in frames and size), computed once per shape."""
        frames, (height, width) = latents.shape[1], (side * self.vae_scale_spatial for side in latents.shape[-2:])
        key = (frames, height, width, latents.device)
        if key not in self._rotary:
            self._rotary[key] = self.rotary_embedding(height, width, frames, latents.device)
        return self._rotary[key]

    def batch_geometry(self, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
        samples, _, frames, height, width = batch["latent_mean"].shape  # [B, C, F, h, w]
        return (samples, (frames - 1) * self.vae_scale_temporal + 1, height * self.vae_scale_spatial,
                width * self.vae_scale_spatial)

    @property
    def objective_options(self) -> bool:
        return True

    def draw_inputs(self, batch: dict[str, torch.Tensor], draws: TrainingDraws, scheduler) -> ModelInputs:
        """x0 sampled from the cached latent distribution, the noise and the timesteps (`objective.draw_inputs`),
        then the conditions' own draws (`draw_conditions`), in that order per sample; the batch's loss mask, if any."""
        drawn = draw_inputs(batch["latent_mean"], batch["latent_logvar"], self.scaling_factor,
                            scheduler.config.num_train_timesteps, draws.generators, self.patch_size_t, draws.objective)
        inputs = ModelInputs(drawn.x0, drawn.noise, drawn.timesteps, batch["prompt_embeds"],
                             loss_mask=self.loss_mask(batch))
        inputs.conditions = self.draw_conditions(batch, draws, inputs.x0.shape[1])
        return inputs

    def loss_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The batch's `LOSS_MASK` as the loss takes it: cached on the latent grid as the latents are, [B, 1, F', h, w]
        (values in [0, 1]), it becomes [B, F, 1, h, w] in fp32 with the frames padded in front as x0's
        (`frames_first`: the padded frame weighs as the first); None without one."""
        mask = batch.get(LOSS_MASK)
        if mask is None:
            return None
        latents = batch["latent_mean"].shape
        if mask.shape != (latents[0], 1, *latents[2:]):
            raise ValueError(f"{LOSS_MASK} {tuple(mask.shape)} does not lie on the latent grid of latents "
                             f"{tuple(latents)}: expected {(latents[0], 1, *latents[2:])}")
        return frames_first(mask.float(), self.patch_size_t)

    def draw_conditions(self, batch: dict[str, torch.Tensor], draws: TrainingDraws,
                        frames: int) -> dict[str, torch.Tensor]:
        """Text-to-video has no conditions besides the prompt."""
        return {}

    def fixed_inputs(self, batch: dict[str, torch.Tensor], noise_generator: torch.Generator,
                     timestep: int) -> ModelInputs:
        x0 = frames_first(batch["latent_mean"].float() * self.scaling_factor, self.patch_size_t)
        noise = torch.randn(x0.shape[1:], generator=noise_generator)[None].to(x0.device)
        inputs = ModelInputs(x0, noise, torch.tensor([timestep], device=x0.device), batch["prompt_embeds"],
                             loss_mask=self.loss_mask(batch))
        inputs.conditions = self.fixed_conditions(batch, x0.shape[1])
        return inputs

    def fixed_conditions(self, batch: dict[str, torch.Tensor], frames: int) -> dict[str, torch.Tensor]:
        return {}

    def probe_inputs(self, num_frames: int, height: int, width: int, prompt_embeds: torch.Tensor,
                     generator: torch.Generator, timestep: int, device: torch.device) -> ModelInputs:
        shape = (1, self.latent_channels, self.latent_frames(num_frames), height // self.vae_scale_spatial,
                 width // self.vae_scale_spatial)
        x = frames_first(torch.randn(shape, generator=generator), self.patch_size_t).to(device)
        inputs = ModelInputs(x, torch.zeros_like(x), torch.tensor([timestep], device=device), prompt_embeds)
        inputs.conditions = self.neutral_conditions(x)
        return inputs

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, inputs: ModelInputs,
                cast_inputs: bool = False) -> torch.Tensor:
        prompt_embeds = inputs.prompt_embeds
        if cast_inputs:
            x_t, prompt_embeds = x_t.to(self.dtype), prompt_embeds.to(self.dtype)
        with torch.autocast(x_t.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            kwargs = self.transformer_inputs(x_t, prompt_embeds, timesteps, self.rotary_for(inputs.x0),
                                                  inputs.conditions)
            return model(**kwargs, return_dict=False)[0]

    def loss(self, model: torch.nn.Module, inputs: ModelInputs, scheduler, cast_inputs: bool = False,
             objective: Objective = REFERENCE,
             target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        return self.sample_losses(model, inputs, scheduler, cast_inputs, objective, target).mean()

    def sample_losses(self, model: torch.nn.Module, inputs: ModelInputs, scheduler, cast_inputs: bool = False,
                      objective: Objective = REFERENCE,
                      target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        return diffusion_losses(lambda x_t, t: self.predict(model, x_t, t, inputs, cast_inputs), scheduler,
                                inputs.x0, inputs.noise, inputs.timesteps, objective, inputs.loss_mask, target)

    def reference_loss(self, transformer: torch.nn.Module, batch: dict[str, torch.Tensor], scheduler) -> torch.Tensor:
        """The diffusers CogVideoX example's step: global-RNG draws, the loss in the model's dtype until the end."""
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        x0 = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * self.scaling_factor
        x0 = x0.permute(0, 2, 1, 3, 4).to(self.dtype)
        if x0.shape[1] % self.patch_size_t:  # CogVideoX 1.5: the first latent frame again, in front
            x0 = torch.cat([x0[:, :1], x0], dim=1)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, t)
        conditions = self.fixed_conditions(batch, x0.shape[1])  # the first image encoding, unsampled
        with torch.autocast(x0.device.type, dtype=self.dtype):
            inputs = self.transformer_inputs(x_t, batch["prompt_embeds"], t, self.rotary_for(x0), conditions)
            v = transformer(**inputs, return_dict=False)[0]
        x0_hat = scheduler.get_velocity(v, x_t, t)
        weights = 1 / (1 - scheduler.alphas_cumprod.to(x0.device)[t])
        return (weights * ((x0_hat.float() - x0.float()) ** 2).flatten(1).mean(1)).mean()

    def synthetic_batch(self, config: Config, batch_size: int, num_frames: int, height: int, width: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Latent mean/logvar [B, C, F, h, w] and T5 embeddings [B, L, D] in the variant's dtype."""
        device, b = generator.device, batch_size
        shape = (b, self.latent_channels, self.latent_frames(num_frames), height // self.vae_scale_spatial,
                 width // self.vae_scale_spatial)
        return {
            "latent_mean": torch.randn(shape, generator=generator, device=device, dtype=self.dtype),
            "latent_logvar": torch.full(shape, -4.0, device=device, dtype=self.dtype),
            "prompt_embeds": torch.randn((b, self.max_text_seq_length, self.text_embed_dim),
                                         generator=generator, device=device, dtype=self.dtype),
        }

    def synthetic_loss_mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Weights in [0, 1] on the latent grid, [B, 1, F', h, w] in the variant's dtype."""
        latents = batch["latent_mean"]
        shape = (latents.shape[0], 1, *latents.shape[2:])
        return torch.rand(shape, generator=generator, device=latents.device).to(self.dtype)

    def loss_mask_latents(self, mask: torch.Tensor) -> torch.Tensor:
        """A window's pixel mask [F, H, W] on the latent grid, [1, F', h, w], as the VAE compresses the frames: in
        space the mean of each vae_scale_spatial × vae_scale_spatial cell; in time latent frame 0 is frame 0 alone
        (the causal VAE encodes it by itself) and latent frame k ≥ 1 the mean of the vae_scale_temporal frames it
        compresses, (k−1)·s+1 … k·s."""
        frames, height, width = mask.shape
        side, step = self.vae_scale_spatial, self.vae_scale_temporal
        if (frames - 1) % step or height % side or width % side:
            raise ValueError(f"a loss mask of {frames} frames at {height}x{width} does not map onto {self.name}'s "
                             f"latent grid ({step}k+1 frames, sides multiples of {side})")
        cells = torch.nn.functional.avg_pool2d(mask.float()[:, None], side)[:, 0]  # [F, h, w]
        later = cells[1:].unflatten(0, (-1, step)).mean(dim=1)
        return torch.cat([cells[:1], later])[None]

    # sampling -----------------------------------------------------------------------------------------
    @property
    def latents_beside(self) -> str | None:
        """The condition whose latents follow the noisy latents on the channel axis (`image_latents`,
        `control_latents`), as the stock pipelines place them; None for text-to-video."""
        return None

    def transformer_inputs(self, x_t: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                           rotary: tuple[torch.Tensor, torch.Tensor] | None,
                           conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of one training forward, laid out as the stock pipeline lays them out."""
        key = self.latents_beside
        if key is not None:
            beside = conditions.get(key)
            if beside is None:
                raise ValueError(f"{self.name} needs {key.replace('_', ' ')} for every training forward")
            x_t = torch.cat([x_t, beside.to(x_t.dtype)], dim=2)
        return {"hidden_states": x_t, "encoder_hidden_states": prompt_embeds, "timestep": timesteps,
                "image_rotary_emb": rotary}

    def pipeline_inputs(self, *, prompt: str | None, prompt_embeds: torch.Tensor | None,
                        negative_prompt_embeds: torch.Tensor | None, image=None, control=None) -> dict[str, Any]:
        return {"prompt": prompt, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

    def render_latents(self, pipe, conditioning: dict[str, Any], *, num_frames: int, height: int, width: int,
                       steps: int, guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
        latents = pipe(**conditioning, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                       guidance_scale=guidance_scale, generator=generator, output_type="latent",
                       max_sequence_length=self.max_text_seq_length).frames
        # the pipeline returns latents with the frames it padded for patch_size_t still in front (CogVideoX 1.5)
        return latents[:, self.padded_latent_frames(num_frames) - self.latent_frames(num_frames):]

    def video_to_video(self, pipe):
        """The stock video-to-video pipeline around a text-to-video pipeline's components; None for the models that
        take an image or a control video beside the prompt."""
        if self.conditions:
            return None
        import diffusers

        video = getattr(diffusers, self.spec.video_to_video_class)(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, transformer=pipe.transformer,
            scheduler=pipe.scheduler)
        video.set_progress_bar_config(disable=True)
        return video

    def render_from_video(self, pipe, conditioning: dict[str, Any], video: list, strength: float, *, height: int,
                          width: int, steps: int, guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
        latents = pipe(**conditioning, video=video, strength=strength, height=height, width=width,
                       num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                       output_type="latent", max_sequence_length=self.max_text_seq_length).frames
        return latents[:, self.padded_latent_frames(len(video)) - self.latent_frames(len(video)):]

    def decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            video = pipe.decode_latents(latents.to(pipe.vae.dtype))
        return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]

    def attention_processor(self, kernel, name: str) -> KernelAttnProcessor:
        return KernelAttnProcessor(kernel, name)

    @property
    def lora_key_formats(self) -> dict:
        return KEY_FORMATS
