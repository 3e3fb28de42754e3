"""The memory budget: which checkpointing/offloading the trainer uses under `train.memory_budget_gib`.

The choice is the cost model's (`cogft/models/cost.py`), the same one `cogft estimate` prints.
"""

from __future__ import annotations

import logging

import torch

from ..config import Config
from ..models.cost import AUTO_BUDGET_SHARE, checkpointing_for_budget
from ..models.family import Variant

logger = logging.getLogger(__name__)


def memory_budget(config: Config, device: torch.device) -> float | None:
    """`train.memory_budget_gib` in GiB: as set, or with `auto`, 90 % of this CUDA device (None on a CPU)."""
    budget = config.train.memory_budget_gib
    if budget != "auto":
        return budget
    if device.type != "cuda":
        logger.info("train.memory_budget_gib=auto applies on CUDA GPUs; using the configured checkpointing")
        return None
    return AUTO_BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory / 2**30


def block_settings(config: Config, variant: Variant, device: torch.device) -> tuple[bool | float, bool]:
    """(gradient_checkpointing, offload_checkpoints) to use: as configured, or, with
    `train.memory_budget_gib`, the fastest that `cogft estimate` predicts fits the budget."""
    budget = memory_budget(config, device)
    if budget is None:
        return config.train.gradient_checkpointing, config.train.offload_checkpoints
    setting, offload, result = checkpointing_for_budget(config, variant, budget)
    if result is None:
        logger.warning("train.memory_budget_gib=%s (%.1f GiB): even full offloaded checkpointing is estimated "
                       "above it; using it anyway", config.train.memory_budget_gib, budget)
        return setting, offload
    logger.info("train.memory_budget_gib=%s (%.1f GiB): gradient_checkpointing=%s offload_checkpoints=%s "
                "(estimated %.2f GiB)", config.train.memory_budget_gib, budget, setting, offload,
                result.peak_allocated_gib)
    return setting, offload
