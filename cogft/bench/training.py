"""`cogft bench`: time the real training step on a full-size model, beside the plain recipe.

The model is built from the configuration (the local pipeline's, or the built-in copy of the real
one for a hub id, so no download) with random weights: same compute and memory as the real
checkpoint. The cogft figure runs `TrainingStep`, the trainer's own code; `--baseline` also runs the
plain diffusers + peft recipe (default SDPA, AdamW, autocast + GradScaler, diffusers' all-or-nothing
gradient checkpointing) in the same process, and prints the ratio. One JSON line per figure.
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data.dataset import PRIOR
from ..disk import folder_bytes
from ..host_memory import host_peak_gib
from ..models.attention import attention_in_use
from ..models.blocks import compile_enabled
from ..models.build import random_init
from ..models.family import LOSS_MASK, Variant
from ..models.flops import peak_tflops, step_flops
from ..models.loading import load_for_config
from ..training.backends import accelerator_on_cpu, backend_name
from ..training.budget import apply_gpu_memory_cap, card_memory_gib, gpu_memory_capped
from .timing import device_name, free, profile, reset_peak, time_back_to_back, time_steps


def random_transformer(variant: Variant, dtype: torch.dtype, device: torch.device):
    """The variant's transformer at its configured size with random weights, built on `device`."""
    with random_init(device, dtype):
        return variant.spec.diffusers_class("transformer").from_config(variant.configs.transformer)


def synthetic_batch(config: Config, variant: Variant, device: torch.device, seed: int,
                    size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A batch shaped like the cache's at `size` (default: the config's first), from the family
    (`Variant.synthetic_batch`)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return variant.synthetic_batch(config, config.train.batch_size, config.data.num_frames,
                                   *(size or config.data.sizes[0]), generator)


def cogft_step(config: Config, variant: Variant, device: torch.device, on_host: bool = False):
    """The trainer's path, assembled by the trainer's own `assemble_step`. `on_host`: the model is built in host
    memory and placed by `assemble_step`, as the trainer loads it (under a memory cap the whole model never fits the
    GPU: swapped blocks stay in host memory)."""
    from accelerate import Accelerator

    from ..data.cache import CacheEntry
    from ..training.assemble import assemble_step
    from ..training.checkpointing import load_checkpoint, sample_generators, save_checkpoint
    from ..training.clip_losses import ClipLossRecorder

    accelerator = Accelerator(mixed_precision="no", cpu=accelerator_on_cpu())
    transformer = random_transformer(variant, variant.dtype, torch.device("cpu") if on_host else device)
    scheduler = variant.spec.diffusers_class("scheduler").from_config(variant.configs.scheduler)
    batches = {size: synthetic_batch(config, variant, device, config.train.seed, size) for size in config.data.sizes}
    batch = [batches[config.data.sizes[0]]]  # the one `run` trains on; `run.use(size)` switches the bucket
    step, _, _ = assemble_step(accelerator, transformer, config, variant, scheduler,
                               empty_prompt=torch.zeros_like(batch[0]["prompt_embeds"][0]))  # caption dropout's
    step.transformer.train()
    # the per-clip loss records, as the trainer keeps them: on the device through the step, written a step later
    records = tempfile.TemporaryDirectory(prefix="cogft-bench-")
    samples = config.train.batch_size
    recorder = ClipLossRecorder(Path(records.name), [CacheEntry((f"sample-{i}",), "", "", "", 0, 0, 0)
                                                     for i in range(samples)], step.num_train_timesteps, 0, False,
                                variant.gives_sample_losses)
    index, launched = torch.arange(samples, device=device), [0]

    def run(i: int) -> None:
        loss = step.forward_backward(batch[0], sample_generators(config.train.seed, i, 0, 0, samples, device))
        recorder.add({**batch[0], "index": index}, step.sample_losses)
        step.update(loss)
        launched[0] += 1
        recorder.launch(launched[0])
        recorder.write(launched[0] - 1)

    def use(size: tuple[int, int], prior: bool = False, loss_mask: bool = False) -> None:
        """Train on the batch of `size`; `prior`: as a `kind: prior` set's (towards the base model); `loss_mask`:
        carrying a random loss mask (drawn once per size, from the config's seed)."""
        batch[0] = dict(batches[size])
        if prior:
            batch[0][PRIOR] = True
        if loss_mask:
            generator = torch.Generator(device=device).manual_seed(config.train.seed)
            batch[0][LOSS_MASK] = variant.synthetic_loss_mask(batch[0], generator)
        run.loss_mask = loss_mask

    def checkpoint_roundtrip(folder: Path) -> dict:
        """The trainer's own save and resume of this model, optimizer and scheduler state."""
        started = time.perf_counter()
        path = save_checkpoint(accelerator, folder, 1, 1, config)
        saved = time.perf_counter() - started
        size = folder_bytes(path)
        started = time.perf_counter()
        load_checkpoint(accelerator, path)
        return {"checkpoint_save_s": round(saved, 2), "checkpoint_load_s": round(time.perf_counter() - started, 2),
                "checkpoint_mib": round(size / 2**20, 2)}

    run.checkpoint_roundtrip = checkpoint_roundtrip
    run.records = records  # removed with `run`
    run.use = use
    run.step = step
    run.backend = backend_name(accelerator)
    run.loss_mask = False
    run.block_settings = step.parts.block_settings
    run.attention = attention_in_use(accelerator.unwrap_model(step.transformer))
    return run


def plain_step(config: Config, variant: Variant, device: torch.device):
    """The plain diffusers + peft recipe, as in the diffusers CogVideoX example script."""
    from diffusers.training_utils import cast_training_params

    from ..models.adapters import lora_config

    transformer = random_transformer(variant, variant.dtype if config.train.mode == "lora" else torch.float32, device)
    if config.train.mode == "lora":
        transformer.requires_grad_(False)
        transformer.add_adapter(lora_config(config))
        cast_training_params(transformer, dtype=torch.float32)
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate,
                                  betas=(config.train.adam_beta1, config.train.adam_beta2),
                                  weight_decay=config.train.weight_decay, eps=config.train.adam_epsilon)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.dtype == torch.float16)
    scheduler = variant.spec.diffusers_class("scheduler").from_config(variant.configs.scheduler)
    batch = synthetic_batch(config, variant, device, config.train.seed)
    transformer.train()

    def run(i: int) -> None:
        loss = variant.reference_loss(transformer, batch, scheduler)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    run.block_settings = (bool(config.train.gradient_checkpointing), False, 0)  # diffusers' all or nothing
    run.attention = attention_in_use(transformer)
    return run


def _measure(name: str, build, config: Config, variant: Variant, device: torch.device,
             warmup: int, steps: int, profiled: bool = False, checkpoint: bool = False) -> dict:
    free(device)
    extra = {}
    try:
        run = build(config, variant, device)
        apply_gpu_memory_cap(device)  # after the build: the model is made on the GPU whole, then swapped out
        reset_peak(device)  # the training peak: a model built on the GPU in full precision first is not training
        times = time_steps(run, device, warmup, steps)
        back_to_back = time_back_to_back(run, device, warmup + steps, steps)
        if profiled:
            profile(run, device)
        if checkpoint and hasattr(run, "checkpoint_roundtrip"):
            with tempfile.TemporaryDirectory(prefix="cogft-bench-") as folder:
                extra = run.checkpoint_roundtrip(Path(folder))
    except torch.OutOfMemoryError as error:
        detail = str(error).split(". Including")[0]  # what was asked for, and what the process held then
        del error
        free(device)
        return {"variant": name, "error": "out of memory", "detail": detail,
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    row = _row(name, config, variant, device, run, times, back_to_back, config.data.sizes[0])
    row.update(extra)
    del run
    free(device)
    return row


def _row(name: str, config: Config, variant: Variant, device: torch.device, run, times: list[float],
         back_to_back: float, size: tuple[int, int]) -> dict:
    """One figure's JSON row: the step time at `size`, its throughput and the memory peak so far."""
    flops = step_flops(variant, config.data.num_frames, *size, config.train.batch_size)
    checkpointing, offload, swapped = run.block_settings
    seconds = statistics.median(times)
    tflop = flops.training(config.train.mode) / 1e12
    row = {
        "variant": name, "model": config.model.path, "model_variant": variant.name, "mode": config.train.mode,
        "frames": config.data.num_frames, "height": size[0], "width": size[1],
        "batch_size": config.train.batch_size, "lora_rank": config.lora.rank if config.train.mode == "lora" else None,
        "lora_type": config.lora.type if config.train.mode == "lora" else None,
        "gradient_checkpointing": checkpointing,
        "offload_checkpoints": offload,
        "blocks_to_swap": swapped,
        "memory_budget_gib": config.train.memory_budget_gib if name != "plain" else None,
        "gpu_memory_cap_gib": card_memory_gib(device) if device.type == "cuda" else None,
        "compile": compile_enabled(config, device) if name != "plain" else False,
        "attention": run.attention,
        "s_per_step": round(seconds, 4), "s_per_step_min": round(min(times), 4),
        "s_per_step_back_to_back": round(back_to_back, 4), "steps": len(times),
        "tokens": flops.tokens, "us_per_token": round(seconds / (flops.tokens * config.train.batch_size) * 1e6, 3),
        "model_tflop_per_step": round(tflop, 2), "tflops": round(tflop / seconds, 1),
        "device": device_name(device), "host_peak_gib": host_peak_gib(),
    }
    if device.type == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        peak = peak_tflops(row["device"])
        row["mfu"] = round(tflop / seconds / peak, 3) if peak else None
    row["backend"] = getattr(run, "backend", "plain")
    row["loss_mask"] = getattr(run, "loss_mask", False)
    return row


def bench_setup(config: Config) -> tuple[torch.device, Config, Variant]:
    """The device, the config with its model's defaults and the variant; TF32 matmuls as the trainer sets them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.train.allow_tf32
    config, variant = load_for_config(config, validates=False)
    return device, config, variant


def _held_out_entries(config: Config, variant: Variant, folder: Path, count: int, trigger: bool = False) -> list:
    """`count` cache entries shaped like prepare's (latent distribution [C, F, h, w], prompt embedding [L, D]) with
    random values, written to `folder`: what the held-out eval reads, without a VAE or a text encoder. `trigger`:
    each with another embedding as its caption without the trigger."""
    from safetensors.torch import save_file

    from ..data.cache import CacheEntry

    (height, width), frames = config.data.sizes[0], config.data.num_frames
    entries = []
    for i in range(count):
        batch = synthetic_batch(config, variant, torch.device("cpu"), config.train.seed + i)
        key = f"{i:032x}"  # named like prepare's entries: a hex key, which the eval seeds each clip's noise from
        latents, prompt = folder / f"{key}.safetensors", folder / f"prompt-{key}.safetensors"
        save_file({k: batch[k][0].contiguous() for k in batch if k != "prompt_embeds"}, str(latents))
        save_file({"prompt_embeds": batch["prompt_embeds"][0].contiguous()}, str(prompt))
        bare = folder / f"bare-{key}.safetensors"
        if trigger:  # the next clip's prompt: an embedding of the same shape and kind
            other = synthetic_batch(config, variant, torch.device("cpu"), config.train.seed + count + i)
            save_file({"prompt_embeds": other["prompt_embeds"][0].contiguous()}, str(bare))
        entries.append(CacheEntry((str(latents),), str(prompt), f"clip-{i}", f"caption {i}", frames, height, width,
                                  untriggered_prompt=str(bare) if trigger else ""))
    return entries


def bench_eval(config: Config, clips: int = 8, warmup: int = 3, steps: int = 10, every: int = 100,
               emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True),
               trigger: bool = False) -> dict:
    """What the held-out eval costs: the trainer's step timed, then `HeldOutEval` on `clips` clips (the first call
    scores the base model too, for a LoRA, and compiles what it must), again, and the step once more (an eval
    must not slow the training that follows); the eval's share of the time between two evaluations `every`
    steps apart. `trigger`: then a second row, the same eval with every caption carrying a trigger
    (`eval/trigger_gain`) and `quality/bleed` on the validation prompts (a LoRA), beside it."""
    from ..training.evaluation import HeldOutEval
    from ..training.trigger import BleedProbe, BleedPrompt

    device, config, variant = bench_setup(config)
    free(device)
    run = cogft_step(config, variant, device)
    model = run.step.accelerator.unwrap_model(run.step.transformer)
    before = statistics.median(time_steps(run, device, warmup, steps))
    with tempfile.TemporaryDirectory(prefix="cogft-bench-eval-") as folder:
        evaluation = HeldOutEval(config, run.step, _held_out_entries(config, variant, Path(folder), clips))
        first = time_steps(lambda _: evaluation(model), device, 0, 1)[0]
        again = statistics.median(time_steps(lambda _: evaluation(model), device, 0, 3))
        if trigger:
            triggered = HeldOutEval(config, run.step, _held_out_entries(config, variant, Path(folder), clips, True))
            pairs = [BleedPrompt(e.prompt, e.untriggered_prompt, config.data.num_frames, *config.data.largest_size)
                     for e in triggered.clips[:len(config.validation.prompts)]]
            bleed = BleedProbe(config, run.step, pairs) if pairs and config.train.mode == "lora" else None
            with_trigger = [time_steps(lambda _: triggered(model), device, 0, 1)[0],
                            statistics.median(time_steps(lambda _: triggered(model), device, 0, 3))]
            with_bleed = [time_steps(lambda _: bleed(model), device, 0, 1)[0],
                          statistics.median(time_steps(lambda _: bleed(model), device, 0, 3))] if bleed else [0.0, 0.0]
    after = statistics.median(time_steps(run, device, 1, steps))
    row = {"figure": "held_out_eval", "model": config.model.path, "mode": config.train.mode, "clips": clips,
           "eval_timesteps": config.eval.timesteps, "frames": config.data.num_frames,
           "height": config.data.sizes[0][0], "width": config.data.sizes[0][1], "attention": run.attention,
           "compile": compile_enabled(config, device), "s_per_step": round(before, 4),
           "s_per_step_after_eval": round(after, 4), "eval_s_first": round(first, 3), "eval_s": round(again, 3),
           "every": every, "eval_share": round(again / (every * before + again), 4), "device": device_name(device)}
    emit(row)
    if trigger:
        both = with_trigger[1] + with_bleed[1]
        emit({**row, "figure": "held_out_eval_trigger_bleed", "bleed_prompts": len(pairs),
              "eval_s_first": round(with_trigger[0] + with_bleed[0], 3), "eval_s": round(both, 3),
              "trigger_eval_s": round(with_trigger[1], 3), "bleed_s": round(with_bleed[1], 3),
              "added_share": round((both - again) / again, 4),
              "eval_share": round(both / (every * before + both), 4)})
    run = model = evaluation = triggered = bleed = None  # the model and its optimizer go before the next measurement
    free(device)
    return row


def bench_buckets(config: Config, warmup: int = 3, steps: int = 10,
                  emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True)) -> list[dict]:
    """What resolution buckets cost: one trainer step, timed first at the first size alone (a single-size run, as
    compiled for that one shape), then at every size of `data.buckets` after all of them have run, as a bucketed
    run interleaves them; one row per figure and the cost per token of each bucket against the single size."""
    device, config, variant = bench_setup(config)
    free(device)
    run, sizes = cogft_step(config, variant, device), config.data.sizes
    reset_peak(device)
    single = _row("single_size", config, variant, device, run, time_steps(run, device, warmup, steps),
                  time_back_to_back(run, device, warmup + steps, steps), sizes[0])
    rows = [single]
    emit(single)
    for size in sizes:  # every shape once, so the compiled blocks have seen them all before any is timed
        run.use(size)
        time_steps(run, device, warmup, 0)
    for size in sizes:
        run.use(size)
        rows.append(_row("bucket", config, variant, device, run, time_steps(run, device, 1, steps),
                         time_back_to_back(run, device, steps + 1, steps), size))
        emit(rows[-1])
    for row in rows[1:]:
        ratio = {"figure": "bucket_cost_per_token_vs_single_size", "size": f"{row['height']}x{row['width']}",
                 "ratio": round(row["us_per_token"] / single["us_per_token"], 3)}
        rows.append(ratio)
        emit(ratio)
    del run
    free(device)
    return rows


PAIRED = {  # what `bench_paired` times against the plain step: (its row's name, `run.use`'s keyword)
    "prior": ("prior_step", "prior"),  # a `kind: prior` set's batch: one more forward with the adapter off
    "loss_mask": ("masked_step", "loss_mask"),  # a batch carrying a loss mask
}


def bench_paired(config: Config, feature: str, warmup: int = 3, steps: int = 10,
                 emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True)) -> list[dict]:
    """What a feature of the batch costs (`PAIRED`: a prior set's batch, a loss mask): the trainer's step timed on a
    plain batch and on the same batch with the feature, on one model, with their ratio. Both kinds run before either
    is timed (the compiled blocks have seen both), then are timed in the order plain, feature, feature, plain, so a
    drift of the machine's speed over the run weighs on both alike; each row holds both of its kind's timings."""
    name, keyword = PAIRED[feature]
    if feature == "prior" and config.train.mode != "lora":
        raise ConfigError("cogft bench --prior: a prior set trains the adapter towards the base model, and "
                          "train.mode=sft has none; use train.mode=lora")
    device, config, variant = bench_setup(config)
    free(device)
    run, size = cogft_step(config, variant, device), config.data.sizes[0]
    for on in (False, True):
        run.use(size, **{keyword: on})
        time_steps(run, device, warmup, 0)
    times: dict[bool, list[float]] = {False: [], True: []}
    back_to_back: dict[bool, list[float]] = {False: [], True: []}
    reset_peak(device)
    for on in (False, True, True, False):
        run.use(size, **{keyword: on})
        times[on] += time_steps(run, device, 1, steps)
        back_to_back[on].append(time_back_to_back(run, device, steps + 1, steps))
    rows = []
    for row_name, on in (("clip_step", False), (name, True)):
        run.use(size, **{keyword: on})
        rows.append(_row(row_name, config, variant, device, run, times[on], statistics.mean(back_to_back[on]), size))
        emit(rows[-1])
    rows.append(_ratio(f"{name}_vs_clip_step", rows[1]["s_per_step"] / rows[0]["s_per_step"], rows, device))
    emit(rows[-1])
    del run
    free(device)
    return rows


def bench(config: Config, baseline: bool = False, only_baseline: bool = False, warmup: int = 3, steps: int = 10,
          profiled: bool = False, checkpoint: bool = False, gpu_memory_gib: float | None = None,
          emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True)) -> list[dict]:
    """The plain recipe's step (`baseline`) and cogft's, one row each; `gpu_memory_gib`: train as on a card with that
    much memory (planned for it, and held to it)."""
    device, config, variant = bench_setup(config)
    rows = []
    builds = [("plain", plain_step)] if baseline or only_baseline else []
    if not only_baseline:
        builds.append(("cogft", functools.partial(cogft_step, on_host=gpu_memory_gib is not None)))
    with gpu_memory_capped(gpu_memory_gib):
        for name, build in builds:
            rows.append(_measure(name, build, config, variant, device, warmup, steps, profiled, checkpoint))
            emit(rows[-1])
    if len(rows) == 2 and "error" not in rows[0] and "error" not in rows[1]:
        rows.append(_ratio("speedup_vs_plain", rows[0]["s_per_step"] / rows[1]["s_per_step"], rows, device))
        emit(rows[-1])
    return rows


def _ratio(figure: str, seconds_ratio: float, rows: list[dict], device: torch.device) -> dict:
    """The row comparing two timed rows: `seconds_ratio`, and on a GPU the second row's peak over the first's."""
    ratio = {"figure": figure, "ratio": round(seconds_ratio, 3)}
    if device.type == "cuda":
        ratio["peak_allocated_ratio"] = round(rows[1]["peak_allocated_gib"] / rows[0]["peak_allocated_gib"], 3)
    return ratio
