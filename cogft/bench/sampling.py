"""`cogft bench --sample`: time a validation/sample video at full size, beside the stock pipeline.

Random-weight transformer and VAE of the real configuration (no download, no T5: random prompt
embeddings of the real shape), the configured `validation.num_inference_steps` with classifier-free
guidance, VAE decode included. "plain" is the variant's stock pipeline as it comes; "cogft" is what
validation and `cogft sample` run: per-block compile (`train.compile`), the VAE's spread group norms,
exact and, when `validation.cache` names one, with that approximate cache. One JSON line per figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..config import Config
from ..inference.render import render
from ..models.attention import attention_in_use, set_attention
from ..models.blocks import apply_block_options, compile_enabled
from ..models.build import random_init
from ..models.family import Variant
from ..models.group_norm import spread_group_norms
from ..models.loading import load_for_config
from .timing import device_name, free, profile as profile_steps, sync
from .training import random_transformer

WARMUP_STEPS = 8  # an untimed render of this many steps meets every graph, cuDNN plan and cache path first


def random_pipeline(variant: Variant, device: torch.device):
    """The variant's stock pipeline with a random transformer and VAE of its configured size (no text encoder)."""
    dtype = variant.dtype if device.type == "cuda" else torch.float32
    transformer = random_transformer(variant, dtype, device).eval()
    with random_init(device, dtype):
        vae = variant.spec.diffusers_class("vae").from_config(variant.configs.vae).eval()
    scheduler = variant.spec.diffusers_class("scheduler").from_config(variant.configs.scheduler)
    return variant.assemble_pipeline(transformer, vae, scheduler)


def bench_sample(config: Config, baseline: bool = False, profile: bool = False,
                 emit: Callable[[dict], None] = print) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, variant = load_for_config(config, validates=False)
    free(device)
    pipe = random_pipeline(variant, device)
    if config.data.vae_tiling:  # as validation decodes
        pipe.vae.enable_tiling()
    dtype = pipe.transformer.dtype
    shape = (1, variant.max_text_seq_length, variant.text_embed_dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(shape, generator=gen).to(device, dtype)
    negative = torch.randn(shape, generator=gen).to(device, dtype)
    cfg, data = config.validation, config.data
    image = None  # image-to-video: a random start image at the video's size (the pipeline encodes it each render)
    if "image" in variant.conditions:
        from PIL import Image

        pixels = torch.randint(0, 256, (data.height, data.width, 3), generator=gen, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy())

    def timed(cache: str, steps: int) -> float:
        sync(device)
        started = time.perf_counter()
        render(pipe, variant, device, num_frames=data.num_frames, height=data.height, width=data.width, steps=steps,
               guidance_scale=cfg.guidance_scale, seed=cfg.seed, prompt_embeds=embeds,
               negative_prompt_embeds=negative, image=image, cache=cache)
        sync(device)
        return time.perf_counter() - started

    compiled = compile_enabled(config, device)
    variants = [("plain", False, "none")] if baseline else []
    variants.append(("cogft", compiled, "none"))
    if cfg.cache != "none":
        variants.append(("cogft", compiled, cfg.cache))
    rows, tuned = [], False
    for name, compile_blocks, cache in variants:
        if name == "cogft" and not tuned:  # once: "plain" comes first, the cogft variants share it
            set_attention(pipe.transformer, config.model.attention, device, variant.dtype,
                          variant.attention_processor)
            apply_block_options(pipe.transformer, False, compile_blocks)
            spread_group_norms(pipe.vae)
            tuned = True
        timed(cache, min(cfg.num_inference_steps, WARMUP_STEPS))  # untimed: compilation, cuDNN plans, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(cache, cfg.num_inference_steps)
        row = {"variant": name, "figure": "sample_s", "value": round(seconds, 2), "model": config.model.path,
               "steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale, "compile": compile_blocks,
               "cache": cache, "attention": attention_in_use(pipe.transformer), "frames": data.num_frames,
               "height": data.height, "width": data.width,
               "device": device_name(device)}
        if device.type == "cuda":
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        emit(row)
        if profile and name == "cogft" and cache == "none":
            profile_steps(lambda _: timed("none", 2), device)
    if baseline:
        plain, *ours = rows
        for row in ours:
            rows.append({"figure": "sample_speedup_vs_plain", "cache": row["cache"],
                         "ratio": round(plain["value"] / row["value"], 3)})
            emit(rows[-1])
    return rows
