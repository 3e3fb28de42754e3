"""`cogft sample`: one video from a run's final weights or any of its checkpoints, through the stock pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ConfigError
from ..data.control import read_control, read_frames
from ..data.images import conditioning_image
from ..models.adapters import apply_lora
from ..models.attention import fa4_unavailable, set_attention
from ..models.blocks import apply_block_options, compile_enabled
from ..models.family import Variant
from ..models.loading import load_pipeline, variant_of
from ..models.trained_modules import load_trained_whole
from ..run_dir import TRANSFORMER_DIR, TrainedWeights, resolve_trained
from .render import render, write_mp4

logger = logging.getLogger(__name__)


def trained_variant(trained: TrainedWeights) -> Variant:
    return variant_of(trained.config.model)


def pipeline_with_weights(trained: TrainedWeights, variant: Variant, device: torch.device, release_dtype: bool = False):
    """The variant's stock pipeline with the trained weights applied: LoRA via load_lora_weights (LoHa/LoKr via peft,
    `apply_lora`), SFT via a new
    transformer. In the variant's dtype on accelerators (and everywhere with `release_dtype`, as a merged export
    ships), fp32 on CPUs."""
    config = trained.config
    dtype = variant.dtype if release_dtype else variant.compute_dtype(device)
    if trained.mode == "lora":
        pipe = load_pipeline(config.model.path, variant, dtype, config.model.revision)
        apply_lora(pipe, trained.weights_dir)
        load_trained_whole(pipe.transformer, trained.weights_dir)  # a control model's widened input, if any
    else:
        transformer = variant.spec.diffusers_class("transformer").from_pretrained(
            str(trained.weights_dir / TRANSFORMER_DIR), dtype=dtype)
        pipe = load_pipeline(config.model.path, variant, dtype, config.model.revision, transformer=transformer)
    return pipe.to(device)


def _attention_here(trained: TrainedWeights, device: torch.device, variant: Variant) -> str:
    """The run's `model.attention`, or SDPA (the same attention) where FlashAttention-4 cannot run."""
    attention = trained.config.model.attention
    problem = fa4_unavailable(device, variant.dtype) if attention == "fa4" else None
    if problem:
        logger.warning("the run's model.attention=fa4 cannot run here (%s); sampling with torch SDPA", problem)
        return "sdpa"
    return attention


def _clip_size(trained: TrainedWeights, variant: Variant, frames: int | None, height: int | None,
               width: int | None) -> tuple[int, int, int]:
    """The video's size: the run's training size (its largest bucket) unless given; what the variant cannot make is
    refused by flag."""
    data = trained.config.data
    largest = data.largest_size
    size = (frames or data.num_frames, height or largest[0], width or largest[1])
    variant.check_clip_size(*size, names=("--frames", "--height", "--width", "--frames"))
    return size


def sample(source: str, prompt: str, out: str, steps: int | None = None, seed: int | None = None,
           guidance_scale: float | None = None, device: str | None = None, cache: str | None = None, *,
           image: str | None = None, control: str | None = None, video: str | None = None, strength: float = 0.8,
           frames: int | None = None, height: int | None = None, width: int | None = None) -> Path:
    """One video from `--from RUN_OR_CHECKPOINT`, at the run's training size unless told otherwise; image-to-video
    models start from `image`, control models follow `control`, and a text-to-video model may restyle `video`
    (SDEdit to `strength`)."""
    trained = resolve_trained(source)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible here; leave --device out, or use --device cpu")
    variant = trained_variant(trained)
    num_frames, height, width = _clip_size(trained, variant, frames, height, width)
    inputs = _conditioning(trained, variant, target, (num_frames, height, width), image, control, video)
    pipe = pipeline_with_weights(trained, variant, target)
    set_attention(pipe.transformer, _attention_here(trained, target, variant), target, variant.dtype,
                  variant.attention_processor)
    apply_block_options(pipe.transformer, False, compile_enabled(trained.config, target))
    if video is not None:
        pipe = variant.video_to_video(pipe)
        if pipe is None:
            raise ConfigError(f"--video: {variant.name} makes its videos from its own conditions, not from a source "
                              "video; leave --video out")
    cfg = trained.config.validation
    steps = cfg.num_inference_steps if steps is None else steps
    logger.info("sampling from %s (%s weights in %s)", trained.run_dir, trained.mode, trained.weights_dir)
    pipe.set_progress_bar_config(disable=True)  # one labelled bar instead of the pipeline's bare one
    denoised = steps if video is None else max(1, int(steps * strength))  # SDEdit starts part of the way down
    with tqdm(total=denoised, desc="sample", unit="step") as bar:
        frames_out = render(
            pipe, variant, target, num_frames=num_frames, height=height, width=width, steps=steps,
            guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale,
            seed=cfg.seed if seed is None else seed, prompt=prompt, strength=strength,
            cache=cfg.cache if cache is None else cache, on_step=lambda: bar.update(1), **inputs,
        )
    return write_mp4(frames_out, Path(out), cfg.fps)


def _conditioning(trained: TrainedWeights, variant: Variant, target: torch.device, size: tuple[int, int, int],
                  image: str | None, control: str | None, video: str | None) -> dict:
    """What the video is made from beside the prompt, read at its size: refused by flag where the model cannot use it
    or lacks it."""
    num_frames, height, width = size
    data = trained.config.data
    for flag, given, condition, what in (("--image", image, "image", "an image"),
                                         ("--control", control, "control", "a control video")):
        if condition in variant.conditions and given is None:
            raise ConfigError(f"{flag}: {variant.name} makes a video from {what} and a prompt; give {flag} FILE")
        if given is not None and condition not in variant.conditions:
            raise ConfigError(f"{flag}: {variant.name} takes no {condition}; leave {flag} out")
    return {
        "image": None if image is None else conditioning_image(image, height, width, data.resize, "--image"),
        "control": None if control is None else read_control(control, num_frames, height, width, data, "--control",
                                                             target),
        "source_video": None if video is None else read_frames(video, num_frames, height, width, data, "--video"),
    }
