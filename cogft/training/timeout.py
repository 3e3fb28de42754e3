"""How long ranks may wait for one another: the process group's timeout, set from the estimated validation time.

Ranks meet in collectives around every validation. A rank that renders videos while the others wait in a
barrier must finish before the group's timeout (NCCL's default is 10 minutes), or the job dies with a
timeout that names no cause; a 1.5-5B validation video takes minutes even on an H200. The timeout is set
when the process group is made, before the model loads, from the cost model's estimate of one video on
this GPU (the slowest GPU it knows where it does not know this one).
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta

import torch

from ..config import Config
from ..models.cost import GPUS, estimate
from ..models.loading import variant_of

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch's default for gloo; NCCL's is 10 minutes
SAFETY = 3.0                             # the estimate's worst miss is ~15 %; slow disks, first compiles
FIXED_S = 600.0                          # VAE load, inference compile and the checkpoint written beside it


def _gpu_name() -> str:
    """The cost model's name for this process's GPU; its slowest GPU where it knows none (a safe overestimate)."""
    name = torch.cuda.get_device_name(int(os.environ.get("LOCAL_RANK", 0)))
    known = next((key for key in GPUS if key.lower() in name.lower()), None)
    return known or min(GPUS, key=lambda key: GPUS[key].tflops)


def process_group_timeout(config: Config) -> timedelta:
    """The default, or long enough for every validation video of a run to be rendered by one rank (an upper
    bound: with replicated weights the prompts are spread over the ranks) three times over."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or not config.validation.prompts or not torch.cuda.is_available():
        return DEFAULT_TIMEOUT  # no collective to time out, or CPU ranks (gloo) whose tiny videos take seconds
    variant = variant_of(config.model, build=False)
    per_video = estimate(variant.resolve(config), variant, _gpu_name(), advise=False).sample_seconds
    needed = timedelta(seconds=math.ceil(SAFETY * len(config.validation.prompts) * per_video + FIXED_S))
    timeout = max(DEFAULT_TIMEOUT, needed)
    logger.info("process group timeout %.0f min (%d validation videos, estimated %.0f s each here)",
                timeout.total_seconds() / 60, len(config.validation.prompts), per_video)
    return timeout
