"""Videos from the model: the validation hook during training and `cogft sample` afterwards.

Both go through the stock `CogVideoXPipeline`. Validation reuses the transformer being trained (no
reload) and the prompt embeddings cached by prepare, so it needs only the VAE decoder beside it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import Config
from .data.cache import encode_dtype
from .models.attention import fa4_unavailable, set_attention
from .models.family import ModelFamily
from .models.loading import family_for, load_pipeline, load_scheduler, load_vae
from .runs import TrainedWeights, resolve_trained
from .training.adapters import TRANSFORMER_DIR
from .training.speed import apply_block_options, compile_enabled

logger = logging.getLogger(__name__)

TAYLORSEER_WARMUP = 3    # full forwards before the first prediction
TAYLORSEER_INTERVAL = 4  # then a full forward every 4th step: 15 of 50 steps


def taylorseer_full_steps(steps: int) -> int:
    """How many of `steps` denoising steps run the transformer under the taylorseer preset (diffusers' schedule)."""
    return sum(1 for i in range(steps)
               if i < TAYLORSEER_WARMUP or (i - TAYLORSEER_WARMUP - 1) % TAYLORSEER_INTERVAL == 0)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cache_config(name: str, pipe):
    """diffusers' approximate inference caches by name (`validation.cache`); None for exact sampling.

    pab: pyramid attention broadcast, reusing each block's attention output every other step between
    timesteps 800 and 100; first_block: skip the remaining blocks while the first block's output
    changes by less than 5 % from the previous step; taylorseer: run the whole transformer on the
    first 3 steps and then every 4th, and predict the output in between from a first-order Taylor
    expansion of the computed ones (diffusers' lite TaylorSeer: skipped steps run no block at all).
    """
    if name == "pab":
        from diffusers import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    if name == "first_block":
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=0.05)
    if name == "taylorseer":
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=TAYLORSEER_INTERVAL, disable_cache_before_step=TAYLORSEER_WARMUP,
                                     max_order=1, taylor_factors_dtype=torch.float32, use_lite_mode=True)
    return None


def render(pipe, family: ModelFamily, device: torch.device, *, num_frames: int, height: int, width: int,
           steps: int, guidance_scale: float, seed: int, prompt: str | None = None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
           cache: str = "none"):
    """Denoise under the family's autocast, then decode outside it; returns float frames [F, H, W, 3].

    The seeded generator lives on `device`: the CogVideoX DPM scheduler draws fresh noise every step, and
    with a CPU generator each draw stalls the GPU (measured +4 s over 50 steps on an H100).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    approximate = cache_config(cache, pipe)
    if approximate is not None:
        pipe.transformer.enable_cache(approximate)
    try:
        with torch.no_grad(), _autocast(device, family.dtype):
            latents = pipe(
                prompt=prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=generator, output_type="latent",
                max_sequence_length=family.max_text_seq_length,
            ).frames
    finally:
        if approximate is not None:
            pipe.transformer.disable_cache()
    with torch.no_grad():
        video = pipe.decode_latents(latents.to(pipe.vae.dtype))
    return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]


def write_mp4(frames, path: Path, fps: int) -> Path:
    from diffusers.utils import export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(path), fps=fps)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


class ValidationHook:
    """Samples the configured prompts with the in-memory transformer every `validation.every` steps."""

    def __init__(self, config: Config, family: ModelFamily, device: torch.device,
                 prompts: list[tuple[str, str]], negative_file: str, run_dir: Path, writes_videos: bool = True):
        """`writes_videos=False`: a rank that only takes part in the forward passes (weights sharded over ranks)."""
        self.config, self.family, self.device, self.run_dir = config, family, device, run_dir
        self.writes_videos = writes_videos
        self.prompts = [(text, load_file(path)["prompt_embeds"]) for text, path in prompts]
        self.negative = load_file(negative_file)["prompt_embeds"]
        self._pipe = None

    def _pipeline(self, transformer):
        """The stock pipeline around the transformer being trained; built (and the VAE loaded) once."""
        if self._pipe is None:
            from diffusers import CogVideoXPipeline

            vae = load_vae(self.config.model.path, encode_dtype(self.family.dtype, self.device),
                           self.config.model.revision).to(self.device).eval()
            if self.config.data.vae_tiling:
                vae.enable_tiling()
            scheduler = load_scheduler(self.config.model.path, self.config.model.revision)
            self._pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                           scheduler=scheduler)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def __call__(self, transformer, step: int) -> list[tuple[str, str]]:
        cfg, data = self.config.validation, self.config.data
        was_training = transformer.training
        transformer.eval()
        pipe = self._pipeline(transformer)
        written = []
        for i, (text, embeds) in enumerate(self.prompts):
            try:
                frames = render(
                    pipe, self.family, self.device, num_frames=data.num_frames, height=data.height, width=data.width,
                    steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed + i,
                    prompt_embeds=embeds[None].to(self.device),
                    negative_prompt_embeds=self.negative[None].to(self.device), cache=cfg.cache,
                )
            except torch.OutOfMemoryError:  # a validation video is not worth the run
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning("validation at step %d: out of GPU memory on prompt %d, skipped; lower the memory "
                               "use (train.memory_budget_gib, data.vae_tiling=true) to get validation videos",
                               step, i)
                continue
            if not self.writes_videos:
                continue
            path = write_mp4(frames, self.run_dir / "samples" / f"step-{step:06d}-{i:02d}-{_slug(text)}.mp4", cfg.fps)
            written.append((text, str(path)))
        transformer.train(was_training)
        if self.writes_videos:
            logger.info("validation at step %d: %d videos in %s", step, len(written), self.run_dir / "samples")
        return written


def pipeline_with_weights(trained: TrainedWeights, device: torch.device, dtype: torch.dtype | None = None):
    """A stock pipeline with the trained weights applied: LoRA via load_lora_weights, SFT via a new transformer.

    `dtype` defaults to the family's on accelerators and fp32 on CPUs.
    """
    config = trained.config
    family = family_for(config.model.path, config.model.dtype, config.model.revision)
    dtype = dtype or encode_dtype(family.dtype, device)
    if trained.mode == "lora":
        pipe = load_pipeline(config.model.path, dtype, config.model.revision)
        pipe.load_lora_weights(str(trained.weights_dir))
    else:
        from diffusers import CogVideoXTransformer3DModel

        transformer = CogVideoXTransformer3DModel.from_pretrained(str(trained.weights_dir / TRANSFORMER_DIR), dtype=dtype)
        pipe = load_pipeline(config.model.path, dtype, config.model.revision, transformer=transformer)
    return pipe.to(device), family


def sample(source: str, prompt: str, out: str, steps: int | None = None, seed: int | None = None,
           guidance_scale: float | None = None, device: str | None = None, cache: str | None = None) -> Path:
    """`cogft sample`: one video from a run's final weights or any of its checkpoints."""
    trained = resolve_trained(source)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe, family = pipeline_with_weights(trained, target)
    attention = trained.config.model.attention
    problem = fa4_unavailable(target, family.dtype) if attention == "fa4" else None
    if problem:  # the run trained where FlashAttention-4 ran; SDPA computes the same attention
        logger.warning("the run's model.attention=fa4 cannot run here (%s); sampling with torch SDPA", problem)
        attention = "sdpa"
    set_attention(pipe.transformer, attention, target, family.dtype)
    apply_block_options(pipe.transformer, False, compile_enabled(trained.config, target))
    cfg, data = trained.config.validation, trained.config.data
    logger.info("sampling from %s (%s weights in %s)", trained.run_dir, trained.mode, trained.weights_dir)
    frames = render(
        pipe, family, target, num_frames=data.num_frames, height=data.height, width=data.width,
        steps=steps or cfg.num_inference_steps, guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale,
        seed=cfg.seed if seed is None else seed, prompt=prompt, cache=cfg.cache if cache is None else cache,
    )
    return write_mp4(frames, Path(out), cfg.fps)

