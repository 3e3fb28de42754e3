"""Validation / `cogft sample` rendering: the approximate caches really skip work, and leave exact sampling exact."""

import numpy as np
import torch

from cogft.bench.sampling import random_pipeline
from cogft.inference.render import render
from cogft.models.inference_cache import taylorseer_full_steps
from cogft.models.loading import load_variant


def tiny_pipeline(make_config):
    """The tiny config's stock pipeline with random weights, and a random prompt and negative embedding for it."""
    config = make_config()
    variant = load_variant(config.model.path, config.model.dtype)
    pipe = random_pipeline(variant, torch.device("cpu"))
    shape = (1, variant.max_text_seq_length, variant.text_embed_dim)
    return pipe, variant, torch.randn(shape), torch.randn(shape)


def test_taylorseer_runs_the_blocks_only_on_its_full_steps(make_config):
    pipe, variant, embeds, negative = tiny_pipeline(make_config)
    device = torch.device("cpu")
    block_runs = []
    pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *_: block_runs.append(1))

    def video(cache: str) -> np.ndarray:
        block_runs.clear()
        return render(pipe, variant, device, num_frames=9, height=64, width=96, steps=12, guidance_scale=6.0, seed=0,
                      prompt_embeds=embeds, negative_prompt_embeds=negative, cache=cache)

    exact = video("none")
    assert len(block_runs) == 12
    approximate = video("taylorseer")
    assert len(block_runs) == 5 == taylorseer_full_steps(12)  # steps 0, 1, 2, then 4 and 8; 7 are predicted
    assert np.isfinite(approximate).all() and not np.array_equal(approximate, exact)
    assert np.array_equal(video("none"), exact) and len(block_runs) == 12  # the cache is gone afterwards


def test_render_reports_every_denoising_step_and_keeps_the_video(make_config):
    """Validation's progress bar counts the pipeline's steps through its callback, which must not change the video."""
    pipe, variant, embeds, negative = tiny_pipeline(make_config)
    device = torch.device("cpu")
    kwargs = dict(num_frames=9, height=64, width=96, steps=3, guidance_scale=6.0, seed=0, prompt_embeds=embeds,
                  negative_prompt_embeds=negative)
    ticks = []
    counted = render(pipe, variant, device, **kwargs, on_step=lambda: ticks.append(1))
    assert len(ticks) == 3
    assert np.array_equal(counted, render(pipe, variant, device, **kwargs))
