"""The pieces a run is built from: the accelerator, the optimizer and schedule, and the training step.

Precision policy (per variant, see models/spec.py): trainable weights in fp32, frozen weights and
autocast in fp16 (2B, with a loss scaler) or bf16 (5B). Autocast and the scaler are ours rather than
accelerate's because accelerate turns fp16 off on CPUs, and the CPU tests must run the GPU path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import Config
from ..host_memory import release_freed_host_memory
from ..models.adapters import optimizer_groups, setup_trainable
from ..models.attention import set_attention
from ..models.blocks import apply_block_options, compile_enabled
from ..models.family import Variant
from ..models.objective_options import Objective
from ..optimizers import build_optimizer, optimizer_entry
from ..tracking import trackers_for
from .backends import (
    accelerator_on_cpu,
    backend_name,
    configure_backend,
    keep_encoders_whole,
    offloads_optimizer,
    uses_deepspeed,
)
from .budget import block_settings, resolve_fp8_base
from .checkpointing import TrainingProgress, register_weight_hooks
from .step import StepParts, TrainingStep

logger = logging.getLogger(__name__)


def make_accelerator(config: Config, run_dir: Path):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # Set up the process group before anything asks who the main process is (the trackers do): with no
    # GPU, ranks started by torchrun then join a gloo group instead of each training alone.
    cpu = accelerator_on_cpu()
    PartialState(cpu=cpu)
    accelerator = Accelerator(
        mixed_precision="no",  # precision is the variant's policy, applied here (see module docstring)
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=trackers_for(config, run_dir),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
        step_scheduler_with_optimizer=False,
        cpu=cpu,
    )
    keep_encoders_whole(accelerator)
    return accelerator


def build_lr_scheduler(config: Config, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.train.lr_scheduler, optimizer,
        num_warmup_steps=config.train.lr_warmup_steps, num_training_steps=config.train.max_steps,
    )


def assemble_step(accelerator, transformer, config: Config, variant: Variant, noise_scheduler, loader=None,
                  empty_prompt: torch.Tensor | None = None):
    """Trainable weights, speed levers, AdamW, schedule, accelerate, loss scaler and checkpoint hooks around
    `transformer`: everything a `TrainingStep` needs. The trainer and `cogft bench` both build it here.

    `empty_prompt`: the embedding of "" that `data.caption_dropout` trains on. Returns (step, progress, the
    prepared loader or None).
    """
    device = accelerator.device
    configure_backend(accelerator, config, variant)
    config = resolve_fp8_base(config, variant, accelerator)  # `cogft bench`; the trainer resolved it already
    params = setup_trainable(transformer, config,
                             fp32_master=not uses_deepspeed(accelerator)
                             and not optimizer_entry(config.train).bf16_weights,
                             whole_modules=variant.trained_with_adapter)
    checkpointing, offload, swapped = block_settings(config, variant, device)
    attention = set_attention(transformer, config.model.attention, device, variant.dtype,
                              variant.attention_processor)
    swap = apply_block_options(transformer, checkpointing, compile_enabled(config, device), offload,
                               config.train.compile_autotune, swapped, device)
    if swap is not None:  # before prepare moves the model to the device: the swapped weights never go there
        swap.install()
        logger.info("train.blocks_to_swap: %d blocks' frozen weights in host memory (%.2f GiB)", swapped,
                    swap.host_bytes() / 2**30)
    logger.info("variant=%s dtype=%s backend=%s attention=%s trainable parameters: %s", variant.name, variant.dtype,
                backend_name(accelerator), attention, f"{sum(p.numel() for p in params):,}")
    optimizer = build_optimizer(config.train, optimizer_groups(transformer, config, params), device,
                                offloaded=offloads_optimizer(accelerator))
    lr_scheduler = build_lr_scheduler(config, optimizer)
    if loader is None:
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    else:
        transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    release_freed_host_memory()  # the model's host copy, now on the device: else resident beside the pinned buffers
    # FSDP replaces the parameters with sharded ones (and points the optimizer at them): clip those
    params = [p for p in accelerator.unwrap_model(transformer).parameters() if p.requires_grad]
    # DeepSpeed scales the fp16 loss itself (its engine runs backward and the optimizer step)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.needs_loss_scaling and not uses_deepspeed(accelerator))
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scaler, progress)
    register_weight_hooks(accelerator, config, variant.lora_format)
    parts = StepParts(accelerator=accelerator, transformer=transformer, params=params, optimizer=optimizer,
                      lr_scheduler=lr_scheduler, scaler=scaler, noise_scheduler=noise_scheduler, variant=variant,
                      max_grad_norm=config.train.max_grad_norm,
                      block_settings=(checkpointing, offload, swapped), condition_dropout=config.data.image_dropout,
                      caption_dropout=config.data.caption_dropout,
                      empty_prompt=None if empty_prompt is None else empty_prompt.to(device),
                      prior_weight=config.data.prior_weight, objective=Objective.of(config.train))
    return TrainingStep(parts), progress, loader
