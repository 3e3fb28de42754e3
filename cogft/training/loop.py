"""The training run: prepare what is missing, train under accelerate, validate, checkpoint, export.

Precision policy (per family, see models/family.py): trainable weights in fp32, frozen weights and
autocast in fp16 (2B, with a loss scaler) or bf16 (5B). Autocast and the scaler are ours rather than
accelerate's because accelerate turns fp16 off on CPUs, and the CPU tests must run the GPU path.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, save_config
from ..data.buckets import BucketBatchSampler
from ..data.cache import prepare, write_report
from ..data.dataset import LatentDataset, collate
from ..flops import peak_tflops, step_flops
from ..models.attention import resolve_attention, set_attention
from ..models.family import ModelFamily
from ..models.loading import component_configs, family_for, load_scheduler, load_transformer
from ..runs import LORA_DIR
from ..sampling import ValidationHook
from ..tracking import init_trackers, log_videos, trackers_for
from .adapters import setup_trainable
from .backends import (
    accelerator_on_cpu,
    backend_name,
    configure_backend,
    cpu_adamw,
    keep_encoders_whole,
    offloads_optimizer,
    shards_weights,
    uses_deepspeed,
)
from .bf16_adamw import BackwardAdamW
from .checkpointing import (
    CONFIG_FILE,
    TrainingProgress,
    check_resume_config,
    load_checkpoint,
    register_weight_hooks,
    resolve_resume,
    save_checkpoint,
    save_weights,
    sample_generators,
)
from .objective import rotary_cache
from .readout import StepReadout
from .speed import apply_block_options, block_settings, compile_enabled
from .step import TrainingStep

logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_NONFINITE = 20


def make_accelerator(config: Config, run_dir: Path):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # Set up the process group before anything asks who the main process is (the trackers do): with no
    # GPU, ranks started by torchrun then join a gloo group instead of each training alone.
    cpu = accelerator_on_cpu()
    PartialState(cpu=cpu)
    accelerator = Accelerator(
        mixed_precision="no",  # precision is the family's policy, applied here (see module docstring)
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=trackers_for(config, run_dir),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
        step_scheduler_with_optimizer=False,
        cpu=cpu,
    )
    keep_encoders_whole(accelerator)
    return accelerator


def _gather_prepared(accelerator, config: Config, family: ModelFamily, run_dir: Path):
    """Each rank encodes its share of the clips; everyone then trains on all of them."""
    from accelerate.utils import gather_object

    mine = prepare(config, family, accelerator.device, accelerator.process_index, accelerator.num_processes,
                   show_progress=accelerator.is_local_main_process)
    entries, report = mine.entries, mine.report
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        entries, report = gather_object(entries), gather_object(report)
    if accelerator.is_main_process:
        write_report(report, run_dir)
    mine.entries = sorted(entries, key=lambda e: e.latents)
    return mine


def assemble_step(accelerator, transformer, config: Config, family: ModelFamily, configs: dict, noise_scheduler,
                  loader=None):
    """Trainable weights, speed levers, AdamW, schedule, accelerate, loss scaler and checkpoint hooks around
    `transformer`: everything a `TrainingStep` needs. The trainer and `cogft bench` both build it here.

    Returns (step, progress, the prepared loader or None).
    """
    device = accelerator.device
    configure_backend(accelerator, config, family)
    params = setup_trainable(transformer, config,
                             fp32_master=not uses_deepspeed(accelerator) and config.train.optimizer == "adamw")
    checkpointing, offload = block_settings(config, configs, device)
    attention = set_attention(transformer, config.model.attention, device, family.dtype)
    apply_block_options(transformer, checkpointing, compile_enabled(config, device), offload,
                        config.train.compile_autotune)
    logger.info("family=%s dtype=%s backend=%s attention=%s trainable parameters: %s", family.name, family.dtype,
                backend_name(accelerator), attention, f"{sum(p.numel() for p in params):,}")
    optimizer = build_optimizer(config, params, device, offloaded=offloads_optimizer(accelerator))
    lr_scheduler = build_lr_scheduler(config, optimizer)
    if loader is None:
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    else:
        transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    # FSDP replaces the parameters with sharded ones (and points the optimizer at them): clip those
    params = [p for p in accelerator.unwrap_model(transformer).parameters() if p.requires_grad]
    # DeepSpeed scales the fp16 loss itself (its engine runs backward and the optimizer step)
    scaler = torch.amp.GradScaler(device.type, enabled=family.needs_loss_scaling and not uses_deepspeed(accelerator))
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scaler, progress)
    register_weight_hooks(accelerator, config)
    step = TrainingStep(
        accelerator, transformer, params, optimizer, lr_scheduler, scaler, noise_scheduler, family,
        config.train.max_grad_norm,
        rotary_cache(accelerator.unwrap_model(transformer).config, family, config.data.height, config.data.width,
                     device),
        (checkpointing, offload),
    )
    return step, progress, loader


def build_lr_scheduler(config: Config, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.train.lr_scheduler, optimizer,
        num_warmup_steps=config.train.lr_warmup_steps, num_training_steps=config.train.max_steps,
    )


def apply_optimizer_settings(config: Config, optimizer, lr_scheduler) -> None:
    """Re-apply the config's optimizer settings after a resume (the checkpoint carries the old ones).

    The schedule's shape (warm-up, length) already comes from the new config; its base learning rate
    and AdamW's betas, eps and weight decay are restored from the checkpoint and overwritten here.
    """
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)
    schedule.base_lrs = [config.train.learning_rate] * len(schedule.base_lrs)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
        group.update(
            initial_lr=config.train.learning_rate, lr=config.train.learning_rate * factor(schedule.last_epoch),
            betas=(config.train.adam_beta1, config.train.adam_beta2), eps=config.train.adam_epsilon,
            weight_decay=config.train.weight_decay,
        )
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        logger.warning("signal %d: writing a checkpoint, then stopping (send again to stop at once)", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable weights: the fused kernel (one launch for all params, and a skip decided on
    the device), a CPU AdamW when DeepSpeed keeps the optimizer in host memory, or bf16 AdamW inside the
    backward pass."""
    settings = dict(lr=config.train.learning_rate, betas=(config.train.adam_beta1, config.train.adam_beta2),
                    weight_decay=config.train.weight_decay, eps=config.train.adam_epsilon)
    if config.train.optimizer == "adamw_bf16":
        return BackwardAdamW(params, seed=config.train.seed, **settings)
    if offloaded:
        return cpu_adamw(params, implementation=config.train.cpu_adam, **settings)
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **settings)


class _NonFiniteGuard:
    """Counts skipped (non-finite) steps; too many in a row stop the run with advice."""

    def __init__(self, total: int) -> None:
        self.total, self.in_a_row = total, 0

    def record(self, finite: bool, step: int, loss: float, sample_ids: torch.Tensor) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        logger.warning("step %d: non-finite loss/gradient (loss=%s); update skipped (samples %s)",
                       step, loss, sample_ids.tolist())
        if self.in_a_row >= MAX_CONSECUTIVE_NONFINITE:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite steps in a row at step {step}: lower train.learning_rate, "
                "raise train.lr_warmup_steps, or use model.dtype=bf16/fp32"
            )


class _Ema:
    """The smoothed loss curve (exponential moving average, 0.9)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def update(self, x: float) -> float:
        if self.value is None or not math.isfinite(self.value):
            self.value = x
        else:
            self.value = 0.9 * self.value + 0.1 * x
        return self.value


@dataclass
class _FinishedStep:
    """A launched optimizer step, reported once its scalars reach the host (while the next step runs)."""

    step: int
    readout: StepReadout
    sample_ids: torch.Tensor
    latent_shape: torch.Size
    step_time: float
    data_wait: float
    lr: float
    epoch: int


def _step_metrics(accelerator, config: Config, family: ModelFamily, transformer_config, finished: _FinishedStep,
                  values: dict[str, float], skipped_steps: int) -> dict:
    """What one logged step reports to W&B and metrics.jsonl."""
    accum, processes = config.train.gradient_accumulation_steps, accelerator.num_processes
    flops = _batch_flops(transformer_config, family, finished.latent_shape, accum)
    samples = finished.latent_shape[0] * accum * processes
    step_time = finished.step_time
    metrics = {
        "loss": values["mean_loss"],
        "lr": finished.lr,
        "grad_norm": values["grad_norm"],
        "loss_scale": values["loss_scale"],
        "skipped_steps": skipped_steps,
        "step_time": step_time,
        "samples_per_s": samples / step_time,
        "tokens_per_s": flops.tokens * samples / step_time,
        "data_wait_s": finished.data_wait,
        "epoch": finished.epoch,
    }
    device = accelerator.device
    if device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(torch.cuda.get_device_name(device))
        if peak:
            metrics["mfu"] = flops.training(config.train.mode) / step_time / (peak * 1e12)
    return metrics


def _batch_flops(transformer_config, family: ModelFamily, latent_shape: torch.Size, accum: int):
    """Model FLOPs of one optimizer step on this process, from the batch's latent shape [B, C, F, h, w]."""
    batch, _, frames, height, width = latent_shape
    return step_flops(transformer_config, (frames - 1) * family.vae_scale_temporal + 1,
                      height * family.vae_scale_spatial, width * family.vae_scale_spatial, batch * accum,
                      family.vae_scale_spatial, family.vae_scale_temporal)


def train(config: Config) -> Path:
    """Run (or resume) the training described by `config`; returns the run directory."""
    from accelerate.utils import set_seed

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(config, run_dir)
    device = accelerator.device
    logger.info(
        "world_size=%d process=%d local_process=%d device=%s backend=%s mode=%s", accelerator.num_processes,
        accelerator.process_index, accelerator.local_process_index, device, backend_name(accelerator), config.train.mode,
    )
    resume_from = resolve_resume(config.train.resume, run_dir)
    if resume_from is not None:
        for key, (old, new) in check_resume_config(config, resume_from).items():
            logger.info("config change applied on resume: %s: %r -> %r", key, old, new)
    if config.train.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        save_config(config, run_dir / CONFIG_FILE)

    with accelerator.main_process_first():  # a tiny:// model is built once, by the main process
        family = family_for(config.model.path, config.model.dtype, config.model.revision)
    configure_backend(accelerator, config, family)  # refuses a mismatch before prepare's long work
    resolve_attention(config.model.attention, device, family.dtype)  # likewise model.attention=fa4 where it can't run
    prepared = _gather_prepared(accelerator, config, family, run_dir)
    set_seed(config.train.seed)

    transformer = load_transformer(config.model.path, family.dtype, config.model.revision)
    dataset = LatentDataset(prepared.entries, config.train.seed)
    loader = DataLoader(
        dataset, batch_sampler=BucketBatchSampler(dataset.frames, config.train.batch_size, config.train.seed),
        collate_fn=collate, num_workers=config.data.dataloader_workers,
    )
    step, progress, loader = assemble_step(
        accelerator, transformer, config, family, component_configs(config.model.path, config.model.revision),
        load_scheduler(config.model.path, config.model.revision), loader,
    )
    transformer, optimizer, lr_scheduler = step.transformer, step.optimizer, step.lr_scheduler
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)
        apply_optimizer_settings(config, optimizer, lr_scheduler)

    unwrapped = accelerator.unwrap_model(transformer)
    validation = None
    # Sharded weights (ZeRO-3, FSDP): every rank runs the forward passes, the main process writes the videos
    if config.validation.prompts and (accelerator.is_main_process or shards_weights(accelerator)):
        validation = ValidationHook(config, family, device, prepared.validation_prompts, prepared.negative_prompt,
                                    run_dir, writes_videos=accelerator.is_main_process)

    buckets = Counter(dataset.frames)
    init_trackers(accelerator, config, run_dir, {
        "clips": len(dataset), "windows": sum(len(e.latents) for e in dataset.entries),
        "buckets": {f"{frames} frames": buckets[frames] for frames in sorted(buckets, reverse=True)},
    })
    micro_per_epoch = len(loader)

    def run_validation(at_step: int) -> None:
        if validation is not None:
            log_videos(accelerator, validation(unwrapped, at_step), at_step)
        accelerator.wait_for_everyone()

    bar = tqdm(total=config.train.max_steps, initial=progress.global_step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    nonfinite = _NonFiniteGuard(progress.skipped_steps)
    smoothed = _Ema()
    pending: _FinishedStep | None = None  # the last launched step, reported during the next one

    def report(finished: _FinishedStep | None) -> None:
        """Count a non-finite step and log the metrics, once the step's scalars are on the host."""
        if finished is None:
            return
        values = finished.readout.values()
        nonfinite.record(values["finite"] > 0, finished.step, values["loss"], finished.sample_ids)
        progress.skipped_steps = nonfinite.total
        if "mean_loss" in values:
            metrics = _step_metrics(accelerator, config, family, unwrapped.config, finished, values, nonfinite.total)
            metrics["loss_smoothed"] = smoothed.update(metrics["loss"])
            accelerator.log(metrics, step=finished.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    stopped_early = False
    transformer.train()
    with _StopRequest() as stop:
        while progress.global_step < config.train.max_steps and not stopped_early:
            epoch, skip = divmod(progress.micro_batches, micro_per_epoch)
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            micro = 0  # micro-batch within the optimizer step (checkpoints fall on step boundaries)
            step_started = fetch_started = time.perf_counter()
            data_wait = 0.0
            for batch in batches:
                data_wait += time.perf_counter() - fetch_started
                progress.micro_batches += 1
                with accelerator.accumulate(transformer):
                    size = batch["latent_mean"].shape[0]
                    generators = sample_generators(config.train.seed, progress.global_step, micro,
                                                   accelerator.process_index * size, size, device)
                    micro += 1
                    loss = step.forward_backward(batch, generators)
                    if not accelerator.sync_gradients:
                        fetch_started = time.perf_counter()
                        continue
                    result = step.update(loss)

                micro = 0
                progress.global_step += 1
                gstep = progress.global_step
                logged = gstep % config.tracking.log_every == 0 or gstep == config.train.max_steps
                scalars = dict(loss=loss, grad_norm=result.grad_norm, finite=result.finite, loss_scale=result.loss_scale)
                if logged:  # every process takes part in the reduction
                    scalars["mean_loss"] = accelerator.reduce(loss, reduction="mean")
                report(pending)
                pending = _FinishedStep(gstep, StepReadout(**scalars), batch["index"], batch["latent_mean"].shape,
                                        time.perf_counter() - step_started, data_wait, lr_scheduler.get_last_lr()[0],
                                        epoch)
                bar.update(1)
                last = gstep >= config.train.max_steps
                checkpoint_due = gstep % config.train.checkpoint_every == 0 or last or stop.requested
                validation_due = gstep % config.validation.every == 0 and not last
                if checkpoint_due or validation_due:  # the checkpoint records this step's skip count
                    report(pending)
                    pending = None
                if checkpoint_due:
                    save_checkpoint(accelerator, run_dir, gstep, config.train.checkpoints_keep, config)
                if validation_due:
                    run_validation(gstep)
                if stop.requested:
                    logger.warning("stopped at step %d; resume with train.resume=latest", gstep)
                    stopped_early = True
                if last or stopped_early:
                    break
                step_started = fetch_started = time.perf_counter()
                data_wait = 0.0
    bar.close()

    if not stopped_early:
        if config.validation.at_end or progress.global_step % config.validation.every == 0:
            run_validation(progress.global_step)
        export_final(accelerator, transformer, config, family, run_dir)
    accelerator.end_training()
    return run_dir


def export_final(accelerator, transformer, config: Config, family: ModelFamily, run_dir: Path) -> None:
    """lora/pytorch_lora_weights.safetensors or transformer/ in the family's dtype, as diffusers expects."""
    path = save_weights(accelerator, transformer, config, run_dir / LORA_DIR, run_dir, dtype=family.dtype)
    if path is not None:
        logger.info("exported %s", path)
    accelerator.wait_for_everyone()

