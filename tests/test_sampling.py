"""Validation / `cogft sample` rendering: the approximate caches really skip work, and leave exact sampling exact."""

import numpy as np
import torch

from cogft.bench.sampling import random_pipeline
from cogft.inference.render import render
from cogft.models.inference_cache import taylorseer_full_steps
from cogft.models.loading import load_variant


def test_taylorseer_runs_the_blocks_only_on_its_full_steps(make_config):
    config = make_config()
    variant = load_variant(config.model.path, config.model.dtype)
    device = torch.device("cpu")
    pipe = random_pipeline(variant, device)
    shape = (1, variant.max_text_seq_length, variant.text_embed_dim)
    embeds, negative = torch.randn(shape), torch.randn(shape)
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
