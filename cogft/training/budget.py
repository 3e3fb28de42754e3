"""The memory budget: which checkpointing/offloading/block swapping the trainer uses under
`train.memory_budget_gib` (or `train.blocks_to_swap: auto`).

The choice is the cost model's (`cogft/models/cost.py`), the same one `cogft estimate` prints.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..config import Config, ConfigError
from ..models.blocks import swapped_block_count
from ..models.cost import (
    HOST_PROCESS_GIB,
    Plan,
    auto_budget_gib,
    estimate,
    host_advice,
    host_estimate,
    plan_for_budget,
    swap_for_budget,
)
from ..models.family import Variant

logger = logging.getLogger(__name__)
_usable_gib: float | None = None  # `cogft bench --gpu-memory`: the card as if it had this much memory


@contextlib.contextmanager
def gpu_memory_capped(gib: float | None):
    """Plan as if the GPU had `gib` of memory (`cogft bench --gpu-memory`) for the duration; `apply_gpu_memory_cap`
    enforces it. On exit the whole card is planned and usable again, so a cap never outlives its bench."""
    global _usable_gib
    _usable_gib = gib
    try:
        yield
    finally:
        if _usable_gib is not None and torch.cuda.is_initialized():
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        _usable_gib = None


def apply_gpu_memory_cap(device: torch.device) -> None:
    """Hold this process's CUDA allocations to the capped memory (torch's per-process memory fraction)."""
    if _usable_gib is not None and device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index  # torch wants an index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, _usable_gib * 2**30 / total), index)


def card_memory_gib(device: torch.device) -> float:
    """The CUDA device's memory in GiB, or the cap `cogft bench --gpu-memory` set."""
    return _usable_gib or torch.cuda.get_device_properties(device).total_memory / 2**30


def memory_budget(config: Config, device: torch.device) -> float | None:
    """`train.memory_budget_gib` in GiB: as set, or with `auto` (or unset with `train.blocks_to_swap: auto`), 90 %
    of this CUDA device, less on a small one (`auto_budget_gib`; None on a CPU, or with neither set)."""
    budget = config.train.memory_budget_gib
    if budget is not None and budget != "auto":
        return budget
    if budget is None and config.train.blocks_to_swap != "auto":
        return None
    if device.type != "cuda":
        logger.info("train.memory_budget_gib=auto and train.blocks_to_swap=auto apply on CUDA GPUs; using the "
                    "configured checkpointing and no block swapping")
        return None
    return auto_budget_gib(card_memory_gib(device))


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
        plan = plan_for_budget(config, variant, budget, host_gib=host_memory_gib())
    log_plan(config, plan, budget)
    return plan.gradient_checkpointing, plan.offload_checkpoints, plan.blocks_to_swap


def resolve_fp8_base(config: Config, variant: Variant, accelerator) -> Config:
    """`model.fp8_base: auto` as the memory plan chooses it (`train.memory_budget_gib` on a GPU); false without a
    budget, for full fine-tuning, and under DeepSpeed or FSDP (which would cast or shard float8 weights)."""
    from .backends import uses_deepspeed, uses_fsdp

    if config.model.fp8_base != "auto":
        return config
    chosen = False
    budget = memory_budget(config, accelerator.device)
    allowed = config.train.mode == "lora" and not (uses_deepspeed(accelerator) or uses_fsdp(accelerator))
    if allowed and budget is not None and config.train.memory_budget_gib is not None:
        chosen = bool(plan_for_budget(config, variant, budget, host_gib=host_memory_gib()).fp8_base)
    logger.info("model.fp8_base=auto: %s", "float8 storage (the memory plan is faster with it)" if chosen else "off")
    return config.model_copy(update={"model": config.model.model_copy(update={"fp8_base": chosen})})


def log_plan(config: Config, plan: Plan, budget: float) -> None:
    what = (f"train.memory_budget_gib={config.train.memory_budget_gib}" if config.train.memory_budget_gib is not None
            else "train.blocks_to_swap=auto")
    if plan.estimate is None:
        logger.warning("%s (%.1f GiB): even %s is estimated above it; using it anyway", what, budget, plan.describe())
        return
    logger.info("%s (%.1f GiB): %s (estimated %.2f GiB, %.3f s/step)", what, budget, plan.describe(),
                plan.estimate.peak_allocated_gib, plan.estimate.seconds_per_step)


def host_memory_gib() -> float:
    """What this run can hold in host memory: what the system has available now, plus this process (running
    already, which the estimate counts as `HOST_PROCESS_GIB`)."""
    import psutil

    return psutil.virtual_memory().available / 2**30 + HOST_PROCESS_GIB


def check_host_memory(config: Config, variant: Variant, device: torch.device) -> None:
    """Refuse, before any work, a run whose planned host memory (the model read whole, pinned swapped weights,
    offloaded checkpoints, data workers) is above what the host has available, naming what would fit."""
    checking, offload, swapped = block_settings(config, variant, device)
    planned = config.model_copy(update={"train": config.train.model_copy(update={
        "gradient_checkpointing": checking, "offload_checkpoints": offload, "blocks_to_swap": swapped})})
    host, available = host_estimate(planned, variant), host_memory_gib()
    if host.training_gib <= available:
        return
    parts = ", ".join(f"{name} {gib:.1f}" for name, gib in host.parts_gib.items() if gib)
    advice = "; or ".join(host_advice(planned, variant, host, available))
    raise ConfigError(f"host memory: this run needs about {host.training_gib:.1f} GiB ({parts} GiB) and the host has "
                      f"{available:.1f} GiB available; try {advice} (`cogft estimate --host-ram GIB` plans it)")


class OutOfMemory(ConfigError):
    """A CUDA out-of-memory, explained: what ran, the peak, and the settings the estimate says fit (exit 2)."""


def next_saving(config: Config, variant: Variant, settings: tuple[bool | float, bool, int]) -> Plan:
    """The plan after `settings` ran out of memory: the fastest the cost model says needs at most 85 % of what it
    predicted for them (the leanest when none does)."""
    current = Plan(*settings, None)
    predicted = estimate(current.applied(config), variant, advise=False).peak_allocated_gib
    return plan_for_budget(config, variant, 0.85 * predicted, host_gib=host_memory_gib())


def explain_out_of_memory(config: Config, variant: Variant, settings: tuple[bool | float, bool, int], doing: str,
                          device: torch.device) -> OutOfMemory:
    """The error a run ends with when the GPU's memory ran out while `doing`."""
    peak = ""
    if device.type == "cuda":
        total = card_memory_gib(device)
        peak = f": peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated of {total:.1f} GiB"
    plan = next_saving(config, variant, settings)
    fits = f"the estimate says {plan.describe()} fits" + (
        f" ({plan.estimate.peak_allocated_gib} GiB, {plan.estimate.seconds_per_step} s/step predicted)"
        if plan.estimate else " best (nothing is estimated to fit: lower data.num_frames / data.height / data.width)")
    return OutOfMemory(f"out of GPU memory in {doing}{peak} with {Plan(*settings, None).describe()}; {fits}; or set "
                       "train.memory_budget_gib=auto to re-plan and go on by itself")
