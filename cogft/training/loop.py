"""The training run as a recipe: open the run, load the variant, prepare what is missing, assemble the step,
train with logging, checkpoints and validation, then validate and export at the end."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..config_file import save_config
from ..data.buckets import BucketBatchSampler, bucket_name, still_batch_sizes
from ..data.cache import PreparedData, prepare, write_report
from ..data.dataset import PRIOR, LatentDataset, collate
from ..data.images import check_validation_images
from ..data.mixing import epoch_mix
from ..inference.check_export import check_export
from ..inference.hub import check_run_push, push_run_export
from ..models.attention import resolve_attention
from ..models.cost import Plan
from ..models.family import Variant
from ..models.loading import load_for_config, load_scheduler, load_transformer
from ..optimizers import reapply_settings
from ..run_dir import CONFIG_FILE, LORA_DIR, RAW_EXPORT_DIR, checkpoint_step, hold
from ..tracking import check_tensorboard, check_wandb_login, continue_metrics, init_trackers, log_videos
from .assemble import assemble_step, make_accelerator
from .backends import (
    accelerator_on_cpu,
    backend_name,
    configure_backend,
    shards_weights,
    skip_shared_memory_build_on_one_cpu_process,
)
from .best import best_entry, improves, restored_best, write_best
from .budget import check_host_memory, resolve_fp8_base
from .checkpointing import (
    check_resume_config,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    sample_generators,
    save_checkpoint,
    save_export,
    save_release,
)
from .clip_losses import ClipLossRecorder
from .clip_records import continue_records
from .ema import WeightAverage
from .evaluation import HeldOutEval, mean_loss, split_holdout
from .export_probe import export_probe
from .metrics import DataWait, FinishedStep, NonFiniteGuard, SmoothedLoss, step_metrics
from .motion import check_motion_guard
from .readout import StepReadout
from .recommend import comparable_evals, update_recommended
from .report import write_run_report
from .stop import StopRequest
from .summary import run_summary
from .timeout import process_group_timeout
from .topology import Topology
from .trigger import bleed_probe
from .validation import ValidationHook

logger = logging.getLogger(__name__)


class _Replan(Exception):
    """Out of GPU memory under a memory budget: go on from the last step with `config`'s block settings."""

    def __init__(self, config: Config):
        super().__init__("re-planned after an out-of-memory")
        self.config = config


def train(config: Config) -> Path:
    """Run (or resume) the training described by `config`; returns the run directory. A CUDA out-of-memory ends it
    with `OutOfMemory` (what ran, the peak, what fits); under `train.memory_budget_gib` the run instead re-plans
    once with the next saving and resumes from the last finished step, exactly as a run started with that plan."""
    try:
        return _train(config, may_replan=config.train.memory_budget_gib is not None)
    except _Replan as replan:
        config = replan.config
    gc.collect()  # the first attempt's model and optimizer, before the second's
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _train(config, may_replan=False)


def _train(config: Config, may_replan: bool) -> Path:
    trainer = Trainer(config)
    try:
        try:
            trainer.setup()
            stopped = trainer.run()
            if not stopped:
                trainer.doing = "the final validation and export"
                trainer.finish()
        except torch.OutOfMemoryError:
            raise trainer.out_of_memory(may_replan) from None
        trainer.accelerator.end_training()
        if trainer.accelerator.is_main_process:
            write_run_report(trainer.config, trainer.run_dir, stopped)
            logger.info("%s", run_summary(trainer.config, trainer.run_dir, stopped))
            if not stopped and trainer.config.tracking.push_to_hub:  # last: a failed upload loses nothing local
                push_run_export(trainer.config, trainer.run_dir)
    finally:
        if trainer.hold is not None:
            trainer.hold.release()
    return trainer.run_dir


def load_checked_variant(accelerator, config: Config) -> tuple[Config, Variant]:
    """The model's variant and the config resolved with its defaults, after every check that can refuse the
    run before prepare's long work."""
    with accelerator.main_process_first():  # a tiny:// or random:// model is built once, by the main process
        config, variant = load_for_config(config)
    check_validation_images(config.validation.images)
    check_motion_guard(config)
    unmatched = variant.unmatched_lora_targets(config.lora.target_modules) if config.train.mode == "lora" else []
    if unmatched:
        block = "transformer_blocks.0."
        in_a_block = sorted(n.removeprefix(block) for n in variant.transformer_layout[1] if n.startswith(block))
        raise ConfigError(f"lora.target_modules: {', '.join(unmatched)} match no linear layer of {variant.name}; "
                          f"each of its blocks has {', '.join(in_a_block)}")
    configure_backend(accelerator, config, variant)
    resolve_attention(config.model.attention, accelerator.device, variant.dtype)
    return config, variant


def gather_prepared(accelerator, config: Config, variant: Variant, run_dir: Path) -> PreparedData:
    """Each rank encodes its share of the clips; everyone then trains on all of them."""
    from accelerate.utils import gather_object

    mine = prepare(config, variant, accelerator.device, accelerator.process_index, accelerator.num_processes,
                   show_progress=accelerator.is_local_main_process)
    entries, report = mine.entries, mine.report
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        entries, report = gather_object(entries), gather_object(report)
    if accelerator.is_main_process:
        write_report(report, run_dir)
    # ordered by content, not by cache file names: those carry the model folder's path and file times, and a run
    # must draw the same data wherever its model and clips sit
    mine.entries = sorted(entries, key=lambda e: (e.clip, e.caption, e.set, e.line, e.latents))
    return mine


class Trainer:
    """One run: `setup` builds it, `run` trains to `train.max_steps`, `finish` validates and exports."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        skip_shared_memory_build_on_one_cpu_process()
        # one trainer per run directory, held by the main process before anything in it is touched
        state = PartialState(cpu=accelerator_on_cpu(), timeout=process_group_timeout(config))
        if state.is_main_process:  # wandb.init comes after prepare and the model load: refuse a missing login now
            check_wandb_login(config)
            check_tensorboard(config)
            check_run_push(config)
        self.hold = hold(self.run_dir) if state.is_main_process else None
        self.accelerator = make_accelerator(config, self.run_dir)
        accelerator = self.accelerator
        self.topology = Topology.of(accelerator)
        logger.info("world_size=%d process=%d local_process=%d device=%s backend=%s mode=%s",
                    accelerator.num_processes, accelerator.process_index, accelerator.local_process_index,
                    accelerator.device, backend_name(accelerator), config.train.mode)
        self.doing = "setup (the model, the data)"  # what an out-of-memory interrupts, for its message
        self.step_start: tuple[int, int] | None = None  # (global step, micro-batches) where the step in flight began
        self.pending: FinishedStep | None = None  # the last launched step, reported during the next one
        self.smoothed = SmoothedLoss()
        self.data_wait = DataWait(accelerator.device)

    def _open(self) -> Path | None:
        """Check the resume point against the resolved config, and save that config."""
        config, accelerator = self.config, self.accelerator
        resume_from = resolve_resume(config.train.resume, self.run_dir)
        if resume_from is not None:
            for key, (old, new) in check_resume_config(config, resume_from).items():
                logger.info("config change applied on resume: %s: %r -> %r", key, old, new)
        if config.train.allow_tf32 and accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if accelerator.is_main_process:
            save_config(config, self.run_dir / CONFIG_FILE)
            continue_metrics(self.run_dir, None if resume_from is None else checkpoint_step(resume_from))
            continue_records(self.run_dir, None if resume_from is None else checkpoint_step(resume_from))
        return resume_from

    def setup(self) -> None:
        from accelerate.utils import set_seed

        self.config, self.variant = load_checked_variant(self.accelerator, self.config)
        config, accelerator = self.config, self.accelerator
        self.config = config = resolve_fp8_base(config, self.variant, accelerator)  # saved and checked as chosen
        check_host_memory(config, self.variant, accelerator.device)
        resume_from = self._open()
        prepared = gather_prepared(accelerator, config, self.variant, self.run_dir)
        clips = [e for e in prepared.entries if not e.prior]  # a prior set's samples are never held out
        entries, held_out = split_holdout(clips, config.eval.holdout, config.train.seed)  # never trained on
        entries += [e for e in prepared.entries if e.prior]
        self.dataset = LatentDataset(entries, config.train.seed)  # refuses an empty one before the model loads
        mix = epoch_mix([e.set for e in entries], self.dataset.buckets, config.data, config.train.seed)
        self.has_prior = any(e.prior for e in entries)
        sampler = BucketBatchSampler(self.dataset.buckets, config.train.batch_size, config.train.seed,
                                     still_batch_sizes(self.dataset.buckets, config.data.image_batch_size),
                                     accelerator.num_processes, mix)  # refuses too few samples before the model loads
        logger.info("batches per epoch: %d (%d short: every sample once per epoch); per bucket: %s", len(sampler),
                    sampler.short_batches(), sampler.describe())
        set_seed(config.train.seed)
        transformer = load_transformer(config.model.path, self.variant, config.model.revision)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                            num_workers=config.data.dataloader_workers)
        scheduler = load_scheduler(config.model.path, self.variant, config.model.revision)
        empty_prompt = load_file(prepared.negative_prompt)["prompt_embeds"]  # "" (caption dropout's)
        self.step, self.progress, self.loader = assemble_step(accelerator, transformer, config, self.variant,
                                                              scheduler, loader, empty_prompt)
        self.clip_losses = ClipLossRecorder(  # one file per data rank (a context-parallel group's samples once)
            self.run_dir, self.dataset.entries, self.step.num_train_timesteps, self.topology.data_rank,
            accelerator.is_main_process, self.variant.gives_sample_losses and self.topology.context_rank == 0)
        self.ema = None
        if config.train.ema_decay is not None:  # registered before a resume loads its saved state into it
            self.ema = WeightAverage(self.step.params, config.train.ema_decay, on_host=config.train.mode == "sft")
            accelerator.register_for_checkpointing(self.ema)
        if resume_from is not None:
            load_checkpoint(accelerator, resume_from)
            reapply_settings(config.train, self.step.optimizer, self.step.lr_scheduler)
            self.smoothed.value = self.progress.loss_smoothed
        self.unwrapped = accelerator.unwrap_model(self.step.transformer)
        self.evaluation = None
        if held_out:  # spread over the ranks like validation
            self.evaluation = HeldOutEval(config, self.step, held_out, self.topology, shards_weights(accelerator))
        self.bleed = bleed_probe(config, self.step, prepared.bleed_prompts, held_out, self.topology,
                                 shards_weights(accelerator))
        # the best as of the resumed checkpoint: one of the redone steps' is forgotten
        self.progress.best = restored_best(self.progress.best, self.evaluation and self.evaluation.identity)
        if accelerator.is_main_process:
            write_best(self.run_dir, self.progress.best)
        self.progress.evals = comparable_evals(self.progress.evals, self.evaluation and self.evaluation.identity,
                                               self.progress.global_step)
        self.recommend(rotate=False)
        self.validation = None
        if config.validation.prompts:  # spread over the ranks; every rank in every video with sharded weights
            self.validation = ValidationHook(config, self.variant, accelerator.device, prepared.validation_prompts,
                                             prepared.negative_prompt, self.run_dir, self.topology,
                                             shards_weights(accelerator))
        buckets = Counter(self.dataset.buckets)
        init_trackers(accelerator, config, self.run_dir, {
            "clips": len(self.dataset), "held_out": len(held_out),
            **({"sets": dict(Counter(f"data.sets[{e.set}]" for e in entries))} if config.data.sets else {}),
            "windows": sum(len(e.latents) for e in self.dataset.entries),
            "buckets": {bucket_name(bucket): buckets[bucket] for bucket in sorted(buckets, reverse=True)},
            "batches": sampler.describe(),
        })
        # sample ids, for the noise generators, must not overlap between processes whose batches differ in size
        self.sample_stride = max(config.train.batch_size, config.data.image_batch_size or 0)
        self.guard = NonFiniteGuard(self.progress.skipped_steps)

    def run(self) -> bool:
        """Train to `train.max_steps`; True when a signal stopped the run early (after a checkpoint)."""
        self.bar = tqdm(total=self.config.train.max_steps, initial=self.progress.global_step, desc="train",
                        unit="step", disable=not self.accelerator.is_local_main_process)
        self.step.transformer.train()
        with StopRequest() as stop:
            while self.progress.global_step < self.config.train.max_steps:
                if self._epoch(stop):
                    break
        self.bar.close()
        return stop.requested

    def _epoch(self, stop: StopRequest) -> bool:
        """The rest of the current epoch (resumed mid-epoch where the progress says); True when the run ends."""
        accelerator, progress, config = self.accelerator, self.progress, self.config
        epoch, skip = divmod(progress.micro_batches, len(self.loader))
        self.loader.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        batches = accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        micro = 0  # micro-batch within the optimizer step (checkpoints fall on step boundaries)
        kinds: dict[str, torch.Tensor] = {}  # the step's last clip batch's and prior batch's loss
        step_started = time.perf_counter()
        self.data_wait.fetching()
        for batch in batches:
            self.data_wait.fetched()
            if micro == 0:
                self.step_start = (progress.global_step, progress.micro_batches)
            samples, frames, height, width = self.variant.batch_geometry(batch)
            self.doing = f"training step {progress.global_step + 1} ({frames}x{height}x{width}, batch {samples})"
            progress.micro_batches += 1
            with accelerator.accumulate(self.step.transformer):
                size = batch["prompt_embeds"].shape[0]
                generators = sample_generators(config.train.seed, progress.global_step, micro,
                                               self.topology.first_sample(self.sample_stride), size, accelerator.device)
                micro += 1
                loss = self.step.forward_backward(batch, generators)
                kinds[PRIOR if batch.get(PRIOR) else "clips"] = loss
                self.clip_losses.add(batch, self.step.sample_losses)
                if not accelerator.sync_gradients:
                    self.data_wait.fetching()
                    continue
                result = self.step.update(loss)
                if self.ema is not None:
                    self.ema.update(result.finite)
            micro = 0
            progress.global_step += 1
            self.doing = f"the end of step {progress.global_step} (checkpoint, held-out eval)"
            readout = StepReadout(**self._scalars(loss, result, kinds))
            self.clip_losses.launch(progress.global_step)
            kinds = {}
            self._report(self.pending)  # the previous step's scalars are on the host by now
            self.pending = FinishedStep(progress.global_step, readout, batch["index"],
                                        self.variant.batch_geometry(batch),
                                        time.perf_counter() - step_started, self.data_wait.take(),
                                        self.step.lr_scheduler.get_last_lr()[0], epoch)
            self.bar.update(1)
            if self._step_boundary(stop):
                return True
            step_started = time.perf_counter()
            self.data_wait.fetching()
        return False

    def out_of_memory(self, may_replan: bool) -> Exception:
        """After a CUDA out-of-memory: with `may_replan`, checkpoint the last finished step (the step in flight is
        redone from its start) and hand over the next saving's settings; else the explanation to end with."""
        from .budget import explain_out_of_memory, next_saving

        config, device = self.config, self.accelerator.device
        step = getattr(self, "step", None)
        settings = step.parts.block_settings if step is not None else (
            config.train.gradient_checkpointing, config.train.offload_checkpoints,
            0 if config.train.blocks_to_swap == "auto" else config.train.blocks_to_swap)
        if isinstance(settings[2], str):
            settings = (*settings[:2], self.variant.configs.transformer["num_layers"])
        if not may_replan or not self.doing.startswith("training step") or self.accelerator.num_processes > 1:
            return explain_out_of_memory(config, self.variant, settings, self.doing, device)
        plan = next_saving(config, self.variant, settings)
        logger.warning("out of GPU memory in %s with %s: re-planned to %s; going on from step %d", self.doing,
                       Plan(*settings, None).describe(), plan.describe(), self.step_start[0])
        self.step.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step, self.progress.micro_batches = self.step_start
        self._report(self.pending)
        self.pending = None
        if self.progress.global_step > 0:
            save_checkpoint(self.accelerator, self.run_dir, self.progress.global_step,
                            config.train.checkpoints_keep, config)
        self.step = self.unwrapped = self.loader = self.ema = self.evaluation = self.validation = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        replanned = plan.applied(config)
        return _Replan(replanned.model_copy(update={"train": replanned.train.model_copy(update={
            "memory_budget_gib": None, "resume": "latest"})}))

    def _scalars(self, loss: torch.Tensor, result, kinds: dict[str, torch.Tensor]) -> dict:
        """The step's scalars, still on the device; a logged step also averages the loss over processes
        (every process takes part in that reduction). With a prior set, `loss` averages the clip batches' losses and
        `loss/prior` the prior batches' (`kinds`: each kind's last on this process)."""
        scalars = dict(loss=loss, grad_norm=result.grad_norm, finite=result.finite, loss_scale=result.loss_scale)
        step = self.progress.global_step
        if step % self.config.tracking.log_every == 0 or step == self.config.train.max_steps:
            if not self.has_prior:
                scalars["mean_loss"] = self.accelerator.reduce(loss, reduction="mean")
                return scalars
            zero = torch.zeros((), device=loss.device)
            parts = [value for kind in ("clips", PRIOR) for value in
                     ((kinds[kind], zero + 1) if kind in kinds else (zero, zero))]
            totals = self.accelerator.reduce(torch.stack(parts), reduction="sum")
            scalars.update(mean_loss=totals[0] / totals[1], clip_batches=totals[1], prior_loss=totals[2] / totals[3],
                           prior_batches=totals[3])
        return scalars

    def _report(self, finished: FinishedStep | None) -> None:
        """Count a non-finite step and log the metrics, once the step's scalars are on the host."""
        if finished is None:
            return
        values = finished.readout.values()
        self.clip_losses.write(finished.step)
        self.guard.record(values["finite"] > 0, finished.step, values["loss"], finished.sample_ids)
        self.progress.skipped_steps = self.guard.total
        if "mean_loss" in values:
            metrics = step_metrics(self.accelerator, self.config, self.variant, finished, values, self.guard.total)
            if values.get("prior_batches"):
                metrics["loss/prior"] = values["prior_loss"]
            if values.get("clip_batches", 1):
                metrics["loss_smoothed"] = self.progress.loss_smoothed = self.smoothed.update(metrics["loss"])
            else:  # prior batches only: no clip loss this step, and the smoothed clip loss as it was
                del metrics["loss"]
                if self.progress.loss_smoothed is not None:
                    metrics["loss_smoothed"] = self.progress.loss_smoothed
            self.accelerator.log(metrics, step=finished.step)
            self.bar.set_postfix(loss=f"{metrics.get('loss', metrics.get('loss/prior')):.4f}",
                                 lr=f"{metrics['lr']:.2e}")

    def _step_boundary(self, stop: StopRequest) -> bool:
        """Checkpoint and validate when due; True when the run ends here (last step or a stop request)."""
        step, config = self.progress.global_step, self.config
        last = step >= config.train.max_steps
        checkpoint_due = step % config.train.checkpoint_every == 0 or last or stop.requested
        validation_due = step % config.validation.every == 0 and not last
        eval_due = self.evaluation is not None and self.evaluation.due(step, last)
        bleed_due = self.bleed is not None and self.bleed.due(step, last)
        if checkpoint_due or validation_due or eval_due or bleed_due:  # the checkpoint records this step's skip count
            self._report(self.pending)
            self.pending = None
        new_best = eval_due and self.evaluate(step, checkpoint_due)  # before the checkpoint, which records the best
        if bleed_due:
            self.accelerator.log(self.bleed(self.unwrapped), step=step)
        if checkpoint_due:  # best.json names a new best once its checkpoint is complete; the old best then goes
            save_checkpoint(self.accelerator, self.run_dir, step, config.train.checkpoints_keep, config,
                            best=self.progress.best if new_best else None)
        if validation_due:
            self.validate(step)
        if checkpoint_due or validation_due:  # after the rotation, which spared the checkpoint recommended until now,
            self.recommend()                  # and after this step's measures, which judge this step's checkpoint
        if stop.requested:
            logger.warning("stopped at step %d; resume with train.resume=latest", step)
        return last or stop.requested

    def evaluate(self, step: int, checkpointed: bool) -> bool:
        """Log the held-out eval loss; True when it makes this step's checkpoint the best so far (every rank agrees:
        the losses are summed over them). It scores the trained weights, which a checkpoint holds and `--best`
        exports; with `train.ema_decay` the average is scored too, as `eval/loss_ema` (the final export's)."""
        metrics = self.evaluation(self.unwrapped)
        if self.ema is not None:
            with self.ema.applied():
                metrics["eval/loss_ema"] = mean_loss(self.evaluation.losses(self.unwrapped))
        self.accelerator.log(metrics, step=step)
        loss = metrics["eval/loss"]
        logger.info("eval at step %d: loss %.6g%s", step, loss, f" (base model {metrics['eval/loss_base']:.6g}, LoRA "
                    f"gain {metrics['eval/lora_gain']:+.4g})" if "eval/loss_base" in metrics else "")
        if not (checkpointed and improves(self.progress.best, loss)):
            return False
        self.progress.best = best_entry(step, loss, self.evaluation.identity)
        return True

    def validate(self, step: int, keep_first: bool = False) -> None:
        """Each rank renders its share of the prompts; the main process logs all of them, in prompt order.
        `keep_first`: keep the first prompt's frames for the export check."""
        from accelerate.utils import gather_object

        if self.validation is None:  # no prompts: the same on every rank
            return
        with self.averaged():
            written = self.validation(self.unwrapped, step, keep_first)
        if self.validation.motion is not None:  # every rank: the motions are summed over them
            self.validation.motion.log(self.accelerator, step, self.validation.writes_videos)
        if self.accelerator.num_processes > 1:
            written = gather_object(written)
        log_videos(self.accelerator, [(text, path) for _, text, path in sorted(written)], step)
        self.accelerator.wait_for_everyone()

    def recommend(self, rotate: bool = True) -> None:
        """RUN/recommended.json as the rule of training/recommend.py says now (the main process writes it); then, with
        `rotate`, the rotation again, so a checkpoint spared only while its successor's measures were pending does not
        outlive them (not at setup: a run resumed from an older checkpoint keeps what it found until it saves one)."""
        if self.accelerator.is_main_process:
            update_recommended(self.run_dir, self.config.quality, self.progress.evals)
            if rotate:
                prune_checkpoints(self.run_dir, self.config.train.checkpoints_keep)

    def averaged(self):
        """The weight average in the model (`train.ema_decay`), or the trained weights as they are."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def finish(self) -> None:
        """The last validation (unless it just ran) and the export, in the variant's dtype as diffusers expects."""
        step = self.progress.global_step
        if self.config.validation.at_end or step % self.config.validation.every == 0:
            self.validate(step, keep_first=self.config.validation.check_export)
            self.recommend()
        with self.averaged():  # with train.ema_decay the export is the average; the trained weights go beside it
            path = save_export(self.accelerator, self.step.transformer, self.config, self.run_dir, step, self.variant)
        if path is not None:
            logger.info("exported %s", path)
        if self.ema is not None:
            raw = self.run_dir / RAW_EXPORT_DIR
            raw_path = save_release(self.accelerator, self.step.transformer, self.config, raw / LORA_DIR, raw,
                                    self.variant)
            if raw_path is not None:
                logger.info("exported the trained weights without averaging to %s", raw_path)
        if self.config.validation.check_export:
            self.check_export(step)

    def check_export(self, step: int) -> None:
        """The export rendered by a stock pipeline in a fresh process, against the final validation's first video
        (on the main process, which rendered it) and the trained model's probe prediction (every process makes it).
        The model is let go first, so that process gets the GPU memory."""
        if self.validation is None:  # no prompts: the same on every rank
            return
        (prompts, negative), frames = self.validation.embedding_files, self.validation.first_frames
        with self.averaged():  # the weights the export holds
            probe = export_probe(self.step, self.unwrapped, self.config, prompts[0])
        if not self.accelerator.is_main_process or frames is None:  # no final video of the first prompt
            return
        device = str(self.accelerator.device)
        self.step = self.unwrapped = self.evaluation = self.validation = self.ema = self.loader = self.bleed = None
        self.accelerator.free_memory()  # the run's training is over: its model, optimizer and pipeline go
        metrics = check_export(self.run_dir, frames, prompts[0], negative, device, probe)
        if metrics is not None:
            self.accelerator.log(metrics, step=step)
