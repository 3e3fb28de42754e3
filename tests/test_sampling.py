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


def test_a_source_video_is_restyled_as_far_as_its_strength_says(make_config):
    """`cogft sample --video`: SDEdit through the stock video-to-video pipeline: the source video shapes the result,
    `strength` says how many of the denoising steps run, and the models that take conditions have no such route."""
    from pathlib import Path

    from cogft.config import DataConfig
    from cogft.data.control import read_frames

    pipe, variant, embeds, negative = tiny_pipeline(make_config)
    restyle = variant.video_to_video(pipe)
    videos = Path(__file__).resolve().parent.parent / "data" / "videos"
    calls = []
    restyle.transformer.register_forward_pre_hook(lambda *_: calls.append(1))

    def video(name: str, strength: float) -> np.ndarray:
        source = read_frames(str(videos / name), 9, 64, 96, DataConfig(path="data"), "--video")
        calls.clear()
        return render(restyle, variant, torch.device("cpu"), num_frames=9, height=64, width=96, steps=10,
                      guidance_scale=1.0, seed=0, prompt_embeds=embeds, negative_prompt_embeds=negative,
                      source_video=source, strength=strength)

    square = video("bouncing_square.mp4", 0.5)
    assert len(calls) == 5 and square.shape == (9, 64, 96, 3)
    assert not np.array_equal(square, video("fractal_zoom.mp4", 0.5))
    assert len(video("bouncing_square.mp4", 0.3)) == 9 and len(calls) == 3
    assert load_variant("tiny://5b-i2v").video_to_video(pipe) is None
