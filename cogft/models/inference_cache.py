"""diffusers' approximate inference caches by name (`validation.cache`), and how many steps each computes.

Validation, `cogft sample`, bench and the cost model all read the schedule from here.
"""

from __future__ import annotations

import torch

TAYLORSEER_WARMUP = 3    # full forwards before the first prediction
TAYLORSEER_INTERVAL = 4  # then a full forward every 4th step: 15 of 50 steps


def taylorseer_full_steps(steps: int) -> int:
    """How many of `steps` denoising steps run the transformer under the taylorseer preset (diffusers' schedule)."""
    return sum(1 for i in range(steps)
               if i < TAYLORSEER_WARMUP or (i - TAYLORSEER_WARMUP - 1) % TAYLORSEER_INTERVAL == 0)


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
