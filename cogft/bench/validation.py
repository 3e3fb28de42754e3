"""`cogft bench --validation`: what the motion guard (quality.motion) adds to a LoRA run's validations.

The trainer's own step and its own `ValidationHook` on a random-weight model of the real configuration (random prompt
embeddings of the real shape, a random VAE; no download), in one process, the hook's videos written to a temporary
run folder. Timed, after an untimed short render with the adapter on and off (compilation, cuDNN plans): today's
validation (the guard off), the first validation with the guard (its base renders too) and a later one (the LoRA
renders and their motion measures). One JSON line per figure, and the share of the run's time the guard adds.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..models.build import random_init
from ..models.modes import adapter_disabled, evaluating
from ..training.motion import motion
from ..training.validation import ValidationHook
from .sampling import WARMUP_STEPS
from .timing import device_name, free, sync, time_steps
from .training import bench_setup, cogft_step


def _validations(config: Config) -> int:
    """How many validations a run of `config` makes: every `validation.every` steps, and one at the end."""
    every, steps = config.validation.every, config.train.max_steps
    return steps // every + (config.validation.at_end and steps % every != 0)


def bench_validation(config: Config, warmup: int = 3, steps: int = 10,
                     emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True)) -> list[dict]:
    """Time one validation without the motion guard and with it (first: base renders and measures; later: measures),
    the measure of one video alone, and the trainer's step; the guard's share of a run of `train.max_steps` that
    validates every `validation.every` steps."""
    from safetensors.torch import save_file

    if config.train.mode != "lora" or not config.validation.prompts:
        raise ConfigError("cogft bench --validation times the motion guard of a LoRA run with validation prompts; "
                          "use train.mode=lora and give validation.prompts")
    device, config, variant = bench_setup(config)
    free(device)
    run = cogft_step(config, variant, device)
    model = run.step.accelerator.unwrap_model(run.step.transformer)
    s_per_step = statistics.median(time_steps(run, device, warmup, steps))
    with random_init(device, variant.compute_dtype(device)):
        vae = variant.spec.diffusers_class("vae").from_config(variant.configs.vae).eval()
    if config.data.vae_tiling:
        vae.enable_tiling()
    scheduler = variant.spec.diffusers_class("scheduler").from_config(variant.configs.scheduler)
    pipe = variant.assemble_pipeline(model, vae, scheduler)
    shape = (variant.max_text_seq_length, variant.text_embed_dim)
    generator = torch.Generator().manual_seed(config.train.seed)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cogft-bench-validation-") as folder:
        embeddings = []
        for i in range(len(config.validation.prompts) + 1):  # the prompts, then the negative prompt
            path = Path(folder) / f"prompt-{i}.safetensors"
            save_file({"prompt_embeds": torch.randn(shape, generator=generator).to(variant.dtype)}, str(path))
            embeddings.append(str(path))
        prompts = list(zip(config.validation.prompts, embeddings))

        def hook(guard: bool, name: str, cfg: Config = config) -> ValidationHook:
            cfg = cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"motion": guard})})
            made = ValidationHook(cfg, variant, device, prompts, embeddings[-1], Path(folder) / name)
            made._pipe = pipe  # the random VAE beside the model being trained, not one loaded from model.path
            return made

        def timed(validation: ValidationHook, keep_first: bool = False) -> float:
            sync(device)
            started = time.perf_counter()
            validation(model, 1, keep_first)
            if validation.motion is not None:  # as the trainer's validate: the metrics, the base motions recorded
                validation.motion.log(run.step.accelerator, 1, counts=True)
            sync(device)
            return time.perf_counter() - started

        short = config.model_copy(update={"validation": config.validation.model_copy(update={
            "num_inference_steps": min(WARMUP_STEPS, config.validation.num_inference_steps)})})
        with evaluating(model), adapter_disabled(model):  # untimed: the adapter-off graphs too
            hook(False, "warmup", short)(model, 0)
        hook(False, "warmup", short)(model, 0)
        today = hook(False, "today")
        figures = {"today": timed(today, keep_first=True)}
        guarded = hook(True, "guarded")
        figures["first_with_base_renders"] = timed(guarded)
        figures["with_measures"] = timed(guarded)
        started = time.perf_counter()
        motion(today.first_frames)
        measure = time.perf_counter() - started
    base = {"model": config.model.path, "prompts": len(prompts), "steps": config.validation.num_inference_steps,
            "frames": config.data.num_frames, "height": config.validation_size(0)[0],
            "width": config.validation_size(0)[1], "device": device_name(device)}
    for name, seconds in figures.items():
        rows.append({"figure": "validation_s", "variant": name, "value": round(seconds, 2), **base})
        emit(rows[-1])
    rows.append({"figure": "motion_measure_s", "value": round(measure, 3), "per": "video", **base})
    emit(rows[-1])
    # what the guard adds: the base renders once (the first guarded validation over a later one), and at every
    # validation the measures of its videos (timed alone: the renders are today's; with_minus_today_s checks it)
    validations, today_s, with_s = _validations(config), figures["today"], figures["with_measures"]
    once, added = figures["first_with_base_renders"] - with_s, measure * len(prompts)
    run_s = config.train.max_steps * s_per_step + validations * today_s
    rows.append({"figure": "motion_guard_share", "s_per_step": round(s_per_step, 4), "every": config.validation.every,
                 "max_steps": config.train.max_steps, "validations": validations, "base_renders_once_s": round(once, 2),
                 "added_per_validation_s": round(added, 3), "with_minus_today_s": round(with_s - today_s, 2),
                 "share_of_run": round((once + validations * added) / run_s, 4),
                 "share_per_interval": round(added / (config.validation.every * s_per_step + today_s), 4),
                 "device": device_name(device)})
    emit(rows[-1])
    run = model = pipe = None
    free(device)
    return rows
