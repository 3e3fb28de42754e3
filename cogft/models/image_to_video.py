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

import torch

from .spec import VariantSpec

# the reference recipe's pixel noise on the conditioning image: sigma = exp(N(-3, 0.5^2)), per sample
IMAGE_NOISE_LOG_SIGMA_MEAN = -3.0
IMAGE_NOISE_LOG_SIGMA_STD = 0.5


@dataclass(frozen=True)
class ImageToVideoSpec(VariantSpec):
    """A video from a prompt and its first frame. `ofs`: the value the pipeline passes to an `ofs_embed_dim`
    transformer (1.5-I2V), None where the transformer has no such input."""

    learned_positions: bool = False  # 5B-I2V: a learned position table beside RoPE (one clip size only)
    ofs: float | None = None
    pipeline_class: str = "CogVideoXImageToVideoPipeline"

    @property
    def image_conditioned(self) -> bool:
        return True

    def conditioning_matches(self, transformer: dict, latent_channels: int | None) -> bool:
        """The image latents beside the video's (twice the latent channels), and the learned positions and `ofs`
        input of this model."""
        return (latent_channels is not None and transformer.get("in_channels") == 2 * latent_channels
                and bool(transformer.get("use_learned_positional_embeddings", False)) == self.learned_positions
                and (transformer.get("ofs_embed_dim") is not None) == (self.ofs is not None))

    def transformer_inputs(self, x_t: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                           rotary: tuple[torch.Tensor, torch.Tensor] | None,
                           image_latents: torch.Tensor | None = None) -> dict[str, Any]:
        if image_latents is None:
            raise ValueError(f"{self.name} needs image latents for every training forward")
        inputs = super().transformer_inputs(torch.cat([x_t, image_latents.to(x_t.dtype)], dim=2), prompt_embeds,
                                            timesteps, rotary)
        if self.ofs is not None:
            inputs["ofs"] = x_t.new_full((1,), self.ofs)
        return inputs

    def pipeline_inputs(self, *, prompt: str | None, prompt_embeds: torch.Tensor | None,
                        negative_prompt_embeds: torch.Tensor | None, image=None) -> dict[str, Any]:
        if image is None:
            raise ValueError(f"{self.name} makes a video from an image: give one")
        return {**super().pipeline_inputs(prompt=prompt, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds), "image": image}


def image_latent_scale(vae_config: dict) -> float:
    """What the stock image-to-video pipeline multiplies an encoded image by: the scaling factor, or its inverse
    where `invert_scale_latents` is set (CogVideoX 1.5 was trained that way)."""
    factor = float(vae_config["scaling_factor"])
    return 1.0 / factor if vae_config.get("invert_scale_latents") else factor
