"""One video from a stock pipeline (`Variant.assemble_pipeline`): the variant's pipeline call under its autocast,
then the VAE decode.

Validation during training, `cogft sample` and `cogft bench --sample` all render through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.family import Variant
from ..models.inference_cache import cache_config


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def render(pipe, variant: Variant, device: torch.device, *, num_frames: int, height: int, width: int,
           steps: int, guidance_scale: float, seed: int, prompt: str | None = None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
           image=None, control=None, source_video=None, strength: float = 0.8, cache: str = "none",
           on_step: Callable[[], None] | None = None):
    """Denoise under the variant's autocast, then decode outside it; returns float frames [F, H, W, 3].
    `image`: the conditioning image of image-to-video models (a PIL image at the video's size); `control`: a
    control model's control video (PIL frames at the video's size and length); `source_video`: PIL frames to render
    from (SDEdit to `strength`, through the variant's `video_to_video` pipeline, which `pipe` then is). `on_step` is
    called after each denoising step (a progress bar's update).

    The seeded generator lives on `device`: a scheduler that draws fresh noise every step (CogVideoX's DPM) would
    stall the GPU on each draw from a CPU generator.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    approximate = cache_config(cache, pipe)
    if approximate is not None:
        pipe.transformer.enable_cache(approximate)
    conditioning = variant.pipeline_inputs(prompt=prompt, prompt_embeds=prompt_embeds,
                                           negative_prompt_embeds=negative_prompt_embeds, image=image,
                                           control=control)
    if on_step is not None:  # the pipeline's callback hands back its tensors, which must be returned as they are
        conditioning["callback_on_step_end"] = lambda _pipe, _i, _t, tensors: (on_step(), tensors)[1]
    try:
        with torch.no_grad(), _autocast(device, variant.dtype):
            if source_video is not None:
                latents = variant.render_from_video(pipe, conditioning, source_video, strength, height=height,
                                                    width=width, steps=steps, guidance_scale=guidance_scale,
                                                    generator=generator)
            else:
                latents = variant.render_latents(pipe, conditioning, num_frames=num_frames, height=height,
                                                 width=width, steps=steps, guidance_scale=guidance_scale,
                                                 generator=generator)
    finally:
        if approximate is not None:
            pipe.transformer.disable_cache()
    return variant.decode(pipe, latents)


def write_mp4(frames, path: Path, fps: int) -> Path:
    from diffusers.utils import export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(path), fps=fps)
    return path
