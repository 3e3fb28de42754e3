"""The memory budget: which checkpointing/offloading/block swapping the trainer uses under
`train.memory_budget_gib` (or `train.blocks_to_swap: auto`).

The choice is the cost model's (`cogft/models/cost.py`), the same one `cogft estimate` prints.
"""

from __future__ import annotations

import logging

import torch

from ..config import Config, ConfigError
from ..models.blocks import swapped_block_count
from ..models.cost import AUTO_BUDGET_SHARE, Plan, plan_for_budget, swap_for_budget
from ..models.family import Variant

logger = logging.getLogger(__name__)


def memory_budget(config: Config, device: torch.device) -> float | None:
    """`train.memory_budget_gib` in GiB: as set, or with `auto` (or unset with `train.blocks_to_swap: auto`), 90 %
    of this CUDA device (None on a CPU, or with neither set)."""
    budget = config.train.memory_budget_gib
    if budget is not None and budget != "auto":
        return budget
    if budget is None and config.train.blocks_to_swap != "auto":
        return None
    if device.type != "cuda":
        logger.info("train.memory_budget_gib=auto and train.blocks_to_swap=auto apply on CUDA GPUs; using the "
                    "configured checkpointing and no block swapping")
        return None
    return AUTO_BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory / 2**30


def block_settings(config: Config, variant: Variant, device: torch.device) -> tuple[bool | float, bool, int]:
    """(gradient_checkpointing, offload_checkpoints, blocks_to_swap) to use: as configured, or, with
    `train.memory_budget_gib` (`train.blocks_to_swap: auto`), the fastest that `cogft estimate` predicts fits."""
    train, layers = config.train, variant.configs.transformer["num_layers"]
    budget = memory_budget(config, device)
    if budget is None:
        swapped = 0 if train.blocks_to_swap == "auto" else swapped_block_count(train.blocks_to_swap, layers)
        if swapped > layers:
            raise ConfigError(f"train.blocks_to_swap={swapped}: {variant.name} has {layers} transformer blocks; "
                              f"use at most {layers}, `all` or `auto`")
        return train.gradient_checkpointing, train.offload_checkpoints, swapped
    if train.memory_budget_gib is None:
        plan = swap_for_budget(config, variant, budget)
    else:
        plan = plan_for_budget(config, variant, budget)
    log_plan(config, plan, budget)
    return plan.gradient_checkpointing, plan.offload_checkpoints, plan.blocks_to_swap


def log_plan(config: Config, plan: Plan, budget: float) -> None:
    what = (f"train.memory_budget_gib={config.train.memory_budget_gib}" if config.train.memory_budget_gib is not None
            else "train.blocks_to_swap=auto")
    if plan.estimate is None:
        logger.warning("%s (%.1f GiB): even %s is estimated above it; using it anyway", what, budget, plan.describe())
        return
    logger.info("%s (%.1f GiB): %s (estimated %.2f GiB, %.3f s/step)", what, budget, plan.describe(),
                plan.estimate.peak_allocated_gib, plan.estimate.seconds_per_step)
