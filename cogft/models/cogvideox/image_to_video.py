"""Image-to-video CogVideoX (5B-I2V, 1.5-5B-I2V): a text-to-video spec whose transformer also reads an image.

The transformer takes the noisy video latents and the image latents side by side on channels (16 + 16),
the image at latent frame 0 and zeros after it, and predicts the 16 video channels; the loss is the
text-to-video loss. How the image latent is scaled follows the stock `CogVideoXImageToVideoPipeline`
exactly (× the VAE scaling factor, or ÷ it where the VAE config sets `invert_scale_latents`, as 1.5
does): a model trained one way and sampled the other learns nothing usable from the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...config import Config, ConfigError
from ..family import TrainingDraws
from .objective import draw_image_latents
from .spec import CogVideoXSpec, CogVideoXVariant

# the reference recipe's pixel noise on the conditioning image: sigma = exp(N(-3, 0.5^2)), per sample
IMAGE_NOISE_LOG_SIGMA_MEAN = -3.0
IMAGE_NOISE_LOG_SIGMA_STD = 0.5


@dataclass(frozen=True)
class ImageToVideoSpec(CogVideoXSpec):
    """A video from a prompt and its first frame. `ofs`: the value the pipeline passes to an `ofs_embed_dim`
    transformer (1.5-I2V), None where the transformer has no such input."""

    learned_positions: bool = False  # 5B-I2V: a learned position table beside RoPE (one clip size only)
    ofs: float | None = None
    pipeline_class: str = "CogVideoXImageToVideoPipeline"

    @property
    def variant_class(self) -> type[ImageToVideoVariant]:
        return ImageToVideoVariant

    def with_control(self, configs):
        raise ConfigError(f"model.control: {self.name} already conditions on an image; control models widen the "
                          "text-to-video ones (CogVideoX-2B, 5B, 1.5-5B)")

    def conditioning_matches(self, transformer: dict, latent_channels: int | None) -> bool:
        """The image latents beside the video's (twice the latent channels), and the learned positions and `ofs`
        input of this model."""
        return (latent_channels is not None and transformer.get("in_channels") == 2 * latent_channels
                and bool(transformer.get("use_learned_positional_embeddings", False)) == self.learned_positions
                and (transformer.get("ofs_embed_dim") is not None) == (self.ofs is not None))



@dataclass(frozen=True)
class ImageToVideoVariant(CogVideoXVariant):
    """Prepare caches K encodings of the noisy image beside the clip's latents (image_mean / image_logvar
    [K, C, 1, h, w]); each step draws one, scaled as the pipeline scales it, at latent frame 0."""

    spec: ImageToVideoSpec

    @property
    def conditions(self) -> tuple[str, ...]:
        return ("image",)

    @property
    def latents_beside(self) -> str:
        return "image_latents"

    def transformer_inputs(self, x_t: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                           rotary: tuple[torch.Tensor, torch.Tensor] | None,
                           conditions: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Also `ofs` where the transformer takes it (1.5-I2V)."""
        inputs = super().transformer_inputs(x_t, prompt_embeds, timesteps, rotary, conditions)
        if self.spec.ofs is not None:
            inputs["ofs"] = x_t.new_full((1,), self.spec.ofs)
        return inputs

    def pipeline_inputs(self, *, prompt: str | None, prompt_embeds: torch.Tensor | None,
                        negative_prompt_embeds: torch.Tensor | None, image=None, control=None) -> dict[str, Any]:
        if image is None:
            raise ValueError(f"{self.name} makes a video from an image: give one")
        return {**super().pipeline_inputs(prompt=prompt, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds), "image": image}

    @property
    def image_scale(self) -> float:
        return image_latent_scale(self.configs.vae)

    def cache_identity(self, config: Config) -> list:
        return [{"image_noise_draws": config.data.image_noise_draws,
                 "log_sigma": [IMAGE_NOISE_LOG_SIGMA_MEAN, IMAGE_NOISE_LOG_SIGMA_STD]}]

    def encode_sample(self, vae, frames: np.ndarray, conditions: dict[str, np.ndarray | None], seed: int,
                      config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The clip's latents and `data.image_noise_draws` encodings of its conditioning image (the given one, else
        the window's first frame)."""
        entry = super().encode_sample(vae, frames, conditions, seed, config, device, dtype)
        image = conditions.get("image")
        entry.update(encode_noisy_images(vae, frames[0] if image is None else image, config.data.image_noise_draws,
                                         seed, device, dtype))
        return entry

    def draw_conditions(self, batch: dict[str, torch.Tensor], draws: TrainingDraws,
                        frames: int) -> dict[str, torch.Tensor]:
        """Drawn after the objective's draws: text-to-video runs draw as before."""
        return {"image_latents": draw_image_latents(batch["image_mean"], batch["image_logvar"], self.image_scale,
                                                    frames, draws.condition_dropout, draws.generators)}

    def fixed_conditions(self, batch: dict[str, torch.Tensor], frames: int) -> dict[str, torch.Tensor]:
        """The first cached encoding of the image, unsampled and never dropped."""
        image = batch["image_mean"][:, 0, :, 0].float() * self.image_scale  # [B, C, h, w]
        latents = torch.zeros((image.shape[0], frames, *image.shape[1:]), device=image.device)
        latents[:, 0] = image
        return {"image_latents": latents}

    def synthetic_batch(self, config: Config, batch_size: int, num_frames: int, height: int, width: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Also the image encodings [B, K, C, 1, h, w]."""
        batch = super().synthetic_batch(config, batch_size, num_frames, height, width, generator)
        mean = batch["latent_mean"]
        shape = (batch_size, config.data.image_noise_draws, mean.shape[1], 1, *mean.shape[-2:])
        batch["image_mean"] = torch.randn(shape, generator=generator, device=mean.device, dtype=self.dtype)
        batch["image_logvar"] = torch.full(shape, -4.0, device=mean.device, dtype=self.dtype)
        return batch

    def neutral_conditions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_latents": torch.zeros_like(x)}


def image_latent_scale(vae_config: dict) -> float:
    """What the stock image-to-video pipeline multiplies an encoded image by: the scaling factor, or its inverse
    where `invert_scale_latents` is set (CogVideoX 1.5 was trained that way)."""
    factor = float(vae_config["scaling_factor"])
    return 1.0 / factor if vae_config.get("invert_scale_latents") else factor


def encode_noisy_images(vae, image: np.ndarray, draws: int, seed: int, device: torch.device,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`draws` encodings of one uint8 image [H, W, 3] under pixel noise of sigma = exp(N(-3, 0.5^2)) (the
    reference recipe), as image_mean / image_logvar [K, C, 1, h, w]. The draws come from `seed` on the CPU,
    so the same clip gets the same encodings on every machine. One image per encode, as the stock pipeline
    encodes: the VAE's memory-safe convolution splits a large batch of single frames along time, below
    its kernel size (a crash at 768x1360 with 4 draws on an H200)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W] in [-1, 1]
    sigma = torch.exp(torch.randn(draws, generator=generator) * IMAGE_NOISE_LOG_SIGMA_STD + IMAGE_NOISE_LOG_SIGMA_MEAN)
    noisy = pixels + sigma[:, None, None, None] * torch.randn((draws, *pixels.shape), generator=generator)
    with torch.no_grad():
        dists = [vae.encode(one[None, :, None].to(device, dtype)).latent_dist for one in noisy]
    return {"image_mean": torch.cat([d.mean for d in dists]), "image_logvar": torch.cat([d.logvar for d in dists])}
