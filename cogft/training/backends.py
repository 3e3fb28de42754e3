"""What changes when accelerate runs the training under DeepSpeed or FSDP instead of plain DDP.

cogft's config stays the one source of truth: the DeepSpeed config accelerate builds from an
`accelerate_configs/*.yaml` gets the variant's precision (fp16 with dynamic loss scaling for 2B, bf16
for 5B), `train.max_grad_norm`, the micro-batch size and the gradient accumulation written into it
before `prepare`, so the launcher file only chooses the sharding. DeepSpeed then owns loss scaling,
clipping and the fp32 master weights; the trainer's own GradScaler stays off.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from ..config import Config, ConfigError
from ..models.family import Variant
from ..optimizers import Launch, optimizer_entry

logger = logging.getLogger(__name__)

# accelerate imports deepspeed wherever it is installed (unwrap_model, PartialState), and deepspeed then says on
# stdout that it fell back to the CPU (a warning; older releases add an info line): a machine without a GPU can
# do nothing about it, and where a GPU went undetected the trainer's first line already says device=cpu.
_DEEPSPEED_ON_CPU = ("Setting accelerator to CPU.", "Setting ds_accelerator to cpu ")
logging.getLogger("DeepSpeed").addFilter(lambda record: not record.getMessage().startswith(_DEEPSPEED_ON_CPU))


class BackendError(ConfigError):
    """The launch config's backend cannot run this training as configured."""


def _launched_with(backend: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true"


def accelerator_on_cpu() -> bool:
    """Whether to create the Accelerator with `cpu=True` (no GPU). DeepSpeed, which has a CPU mode, is only
    taken up by accelerate when not told to use the CPU; FSDP only on GPUs, so it is refused here rather
    than silently training unsharded. A DeepSpeed launch without deepspeed installed (it is not installed
    by default off Linux) is refused by name here, before accelerate's bare ImportError."""
    if _launched_with("DEEPSPEED") and importlib.util.find_spec("deepspeed") is None:
        raise BackendError(
            "the accelerate launch config uses DeepSpeed (distributed_type: DEEPSPEED), "
            "but deepspeed is not installed: `pip install \"cogft[deepspeed]\"` (it builds on Linux), "
            "or launch with accelerate_configs/single_gpu.yaml, ddp.yaml or fsdp.yaml"
        )
    if torch.cuda.is_available():
        return False
    if _launched_with("FSDP"):
        raise BackendError(
            "the FSDP launch config needs GPUs (accelerate shards with FSDP only on GPUs, and here it would silently "
            "train unsharded); on CPUs use accelerate_configs/deepspeed_zero3.yaml with --num_processes 1"
        )
    return not _launched_with("DEEPSPEED")


def skip_shared_memory_build_on_one_cpu_process() -> None:
    """DeepSpeed on CPUs compiles a C++ shared-memory all-reduce (`deepspeed_shm_comm`) when it starts, about 40 s
    on two cores, the first time on every machine. One process has nothing to all-reduce with, so it is marked
    unbuildable there: DeepSpeed then uses torch's own collectives, as it does on GPUs, where the op never exists."""
    if (not _launched_with("DEEPSPEED") or torch.cuda.is_available()
            or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # the dict DeepSpeed reads before it builds the op
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _zero(accelerator) -> dict:
    return accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})


def zero_stage(accelerator) -> int | None:
    return int(_zero(accelerator).get("stage", 0)) if uses_deepspeed(accelerator) else None


def offloads_optimizer(accelerator) -> bool:
    return (uses_deepspeed(accelerator)
            and _zero(accelerator).get("offload_optimizer", {}).get("device", "none") != "none")


def shards_weights(accelerator) -> bool:
    """True when no rank holds the whole model (ZeRO-3, FSDP): a forward pass then needs every rank."""
    return zero_stage(accelerator) == 3 or uses_fsdp(accelerator)


def backend_name(accelerator) -> str:
    if uses_deepspeed(accelerator):
        return f"deepspeed-zero{zero_stage(accelerator)}" + ("-offload" if offloads_optimizer(accelerator) else "")
    if uses_fsdp(accelerator):
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def launch_of(accelerator, variant: Variant) -> Launch:
    """What the optimizer's refusals look at in this launch."""
    return Launch(device=accelerator.device.type, variant=variant.name, dtype=variant.dtype,
                  processes=accelerator.num_processes,
                  deepspeed_or_fsdp=uses_deepspeed(accelerator) or uses_fsdp(accelerator),
                  offloaded=offloads_optimizer(accelerator))


def configure_backend(accelerator, config: Config, variant: Variant) -> None:
    """Check the launcher's backend and optimizer fit the model variant; write cogft's settings into a
    DeepSpeed config. Idempotent: the trainer calls it early, `assemble_step` again."""
    if uses_fsdp(accelerator) and variant.needs_loss_scaling:
        raise BackendError(
            f"FSDP with the {variant.name} variant's fp16 weights: fp16 loss scaling is not supported under FSDP here; "
            "launch with accelerate_configs/deepspeed_zero2.yaml or deepspeed_zero3.yaml, or set model.dtype=bf16"
        )
    if problem := optimizer_entry(config.train).problem(launch_of(accelerator, variant)):
        raise BackendError(problem)
    if config.model.fp8_base is True and (uses_deepspeed(accelerator) or uses_fsdp(accelerator)):
        raise BackendError("model.fp8_base keeps float8 weights that DeepSpeed and FSDP would cast or shard as their "
                           "own; launch without them (one GPU, or multi-GPU DDP) or set model.fp8_base=false")
    if config.train.blocks_to_swap and accelerator.num_processes > 1:
        raise BackendError("train.blocks_to_swap keeps frozen weights in this process's host memory, which DDP, "
                           "DeepSpeed and FSDP would broadcast or shard; launch one process or set "
                           "train.blocks_to_swap=0")
    if config.train.ema_decay is not None and (uses_deepspeed(accelerator) or uses_fsdp(accelerator)):
        raise BackendError("train.ema_decay averages the weights each process holds whole, and DeepSpeed and FSDP "
                           "shard or own them; launch without them (one GPU, or multi-GPU DDP) or set "
                           "train.ema_decay=null")
    if uses_deepspeed(accelerator):
        _configure_deepspeed(accelerator, config, variant)


def _configure_deepspeed(accelerator, config: Config, variant: Variant) -> None:
    """Write cogft's precision, clipping, batch and accumulation into accelerate's DeepSpeed config."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise BackendError(
                f"the DeepSpeed config sets '{key}': cogft builds AdamW and the lr schedule from train.* itself; "
                f"remove '{key}' from the DeepSpeed config"
            )
    if variant.dtype == torch.float16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
        ds["bf16"] = {"enabled": False}
    else:
        ds["bf16"] = {"enabled": variant.dtype == torch.bfloat16}
        ds["fp16"] = {"enabled": False}
    accumulation = config.train.gradient_accumulation_steps
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", accumulation):
        logger.warning("DeepSpeed config gradient_accumulation_steps=%s replaced by "
                       "train.gradient_accumulation_steps=%d",
                       ds["gradient_accumulation_steps"], accumulation)
    ds["gradient_accumulation_steps"] = accumulation
    ds["gradient_clipping"] = config.train.max_grad_norm
    ds["train_micro_batch_size_per_gpu"] = config.train.batch_size
    ds["train_batch_size"] = config.train.batch_size * accumulation * accelerator.num_processes
    ds["zero_force_ds_cpu_optimizer"] = False  # cogft builds the CPU optimizer itself, with all of AdamW's settings
    ds.setdefault("steps_per_print", 10**9)  # progress is cogft's bar and tracker, not DeepSpeed's prints
    if zero_stage(accelerator) == 3:
        _zero(accelerator)["stage3_gather_16bit_weights_on_model_save"] = True  # full weights for checkpoints/export


def keep_encoders_whole(accelerator) -> None:
    """Under ZeRO-3, accelerate tells transformers to partition every model it loads, the T5 encoder that
    prepare runs outside the engine included (its forward then fails). Only the transformer is trained
    and sharded, by `prepare`; the frozen encoders load whole."""
    if uses_deepspeed(accelerator):
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights with the unwrapped module's keys. Gathers shards (ZeRO-3, FSDP), so every
    rank calls it; where each rank holds the whole model, the module's own tensors, not a copy."""
    if shards_weights(accelerator):
        return accelerator.get_state_dict(model)
    return accelerator.unwrap_model(model).state_dict()
