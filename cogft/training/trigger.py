"""`quality/bleed`: how much a LoRA changes what it should leave alone, measured by prediction, not rendering.

For each prompt that carries a trigger (the validation prompts with `data.caption_prefix` in front; without any, the
held-out clips' captions) and the same prompt without it, the transformer predicts once with the adapter on and once
off, on one fixed input per (prompt, timestep): noise from a CPU generator seeded by (train.seed, prompt, timestep),
at the held-out eval's timesteps. Bleed = ‖change without the trigger‖ / ‖change with it‖, each change the LoRA's
prediction minus the base model's, pooled over the prompts and timesteps. 0: prompts without the trigger are
untouched; 1: they change as much as triggered ones. A LoRA that changes nothing (0/0, as before the first step)
has bleed 0: it leaks nothing. The base model's predictions are made once per run (its weights are frozen); no
generator the training draws from is touched, so a resume stays exact. Logged at the held-out eval's steps (each
checkpoint, `eval.every`), where a checkpoint can be chosen by it. Also the summary's and report's lines on the
trigger: `eval/trigger_gain` (the held-out eval's) and the bleed against `quality.max_bleed`.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ..config import Config
from ..data.cache import CacheEntry
from ..models.modes import adapter_disabled, evaluating
from ..seeding import mixed_seed
from .evaluation import eval_due, probe_timesteps
from .metric_rows import rows_with
from .step import TrainingStep
from .topology import Topology

logger = logging.getLogger(__name__)

BLEED, GAIN = "quality/bleed", "eval/trigger_gain"


@dataclass(frozen=True)
class BleedPrompt:
    triggered: str  # embedding file of the prompt with its trigger
    bare: str       # and without
    frames: int     # the clip size it is predicted at
    height: int
    width: int


def bleed_prompts(config: Config, validation: list[tuple[str, str]],
                  held_out: list[CacheEntry]) -> list[BleedPrompt]:
    """The validation prompts' pairs (prepare's `bleed_prompts`) at the training clip size, or else the held-out
    clips' captions that carry a trigger, each at its clip's bucket."""
    if validation:
        return [BleedPrompt(triggered, bare, config.data.num_frames, *config.data.largest_size)
                for triggered, bare in validation]
    return [BleedPrompt(e.prompt, e.untriggered_prompt, *e.bucket) for e in held_out if e.untriggered_prompt]


def bleed_probe(config: Config, step: TrainingStep, validation: list[tuple[str, str]], held_out: list[CacheEntry],
                topology: Topology = Topology(), shared_forward: bool = False) -> BleedProbe | None:
    """The run's bleed measure, or None where there is nothing to measure (no prompt carries a trigger) or no
    adapter to switch off (full fine-tuning)."""
    prompts = bleed_prompts(config, validation, held_out)
    if not prompts:
        return None
    if config.train.mode != "lora":
        logger.info("quality/bleed compares the adapter on and off; train.mode=sft has none: not measured")
        return None
    source = "validation prompts" if validation else "held-out clips' captions"
    logger.info("quality/bleed: measured on %d %s with and without their trigger", len(prompts), source)
    return BleedProbe(config, step, prompts, topology, shared_forward)


def bleed_ratio(without: float, triggered: float) -> float:
    """‖change without the trigger‖ / ‖change with it‖ from their squared norms; 0 where nothing changes without it
    (a LoRA with zero effect: 0/0), infinite where only the triggerless prompts change."""
    if without == 0:
        return 0.0
    return math.sqrt(without / triggered) if triggered > 0 else math.inf


class BleedProbe:
    """Measures `quality/bleed` of the model's current weights. Prompt i runs on data rank i % data_parallel_size;
    with sharded weights (`shared_forward`) every process takes part in every forward and the main one's count."""

    def __init__(self, config: Config, step: TrainingStep, prompts: list[BleedPrompt],
                 topology: Topology = Topology(), shared_forward: bool = False):
        self.step, self.prompts, self.seed = step, prompts, config.train.seed
        timesteps = probe_timesteps(config.eval.timesteps, len(prompts), step.num_train_timesteps)
        self.probes = [(i, t) for i, listed in enumerate(timesteps) for t in listed]
        self.mine = topology.share(len(prompts), shared_forward)
        self.counts = topology.data_rank == 0 or not shared_forward
        self.every, self.checkpoint_every = config.eval.every, config.train.checkpoint_every
        self.base: dict[int, list[torch.Tensor]] = {}  # probe -> the base model's predictions (with, without), on host

    def due(self, step: int, last: bool) -> bool:
        return eval_due(self.checkpoint_every, self.every, step, last)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{quality/bleed, quality/bleed_seconds}, the same on every process (every process calls it)."""
        started = time.perf_counter()
        device = self.step.accelerator.device
        table = torch.zeros(len(self.probes), 2, device=device)  # squared changes: (without the trigger, with it)
        with evaluating(model):
            for prompt in self.mine:
                for index, (owner, t) in enumerate(self.probes):
                    if owner == prompt:
                        changes = self._changes(model, index, self._inputs(prompt, t, device))
                        if self.counts:
                            table[index] = changes
        without, triggered = self.step.accelerator.reduce(table, reduction="sum").sum(0).tolist()
        return {BLEED: bleed_ratio(without, triggered), "quality/bleed_seconds": time.perf_counter() - started}

    def _inputs(self, prompt: int, t: int, device: torch.device) -> list:
        """The fixed input of (prompt, t) with the prompt with its trigger and without: the same noisy latents."""
        p = self.prompts[prompt]
        embeds = [load_file(path)["prompt_embeds"][None].to(device) for path in (p.triggered, p.bare)]
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, prompt, t))
        inputs = self.step.variant.probe_inputs(p.frames, p.height, p.width, embeds[0], generator, t, device)
        return [inputs, dataclasses.replace(inputs, prompt_embeds=embeds[1])]

    def _changes(self, model: torch.nn.Module, index: int, inputs: list) -> torch.Tensor:
        """The squared norm of the LoRA's change of the prediction, (without the trigger, with it)."""
        if index not in self.base:  # kept in host memory: a full-size prediction is tens of MB, and the GPU is busy
            with adapter_disabled(model):
                self.base[index] = [self._predict(model, x).cpu() for x in inputs]
        tuned = [self._predict(model, x) for x in inputs]
        return torch.stack([(a - b.to(a.device)).square().sum() for a, b in zip(tuned, self.base[index])][::-1])

    def _predict(self, model: torch.nn.Module, inputs) -> torch.Tensor:
        return self.step.variant.predict(model, inputs.x0, inputs.timesteps, inputs,
                                         cast_inputs=self.step.deepspeed).float()


def _gain_said(row: dict) -> str:
    gain = row[GAIN]
    said = (f"held-out loss {row['eval/loss']:.4f} with the trigger, {row['eval/loss_no_trigger']:.4f} without: "
            f"{GAIN} {gain:+.4g}")
    if "eval/trigger_gain_base" in row:
        said += f" (the base model's {row['eval/trigger_gain_base']:+.4g})"
    if gain > 0:
        return said + ": the trigger calls up what was learnt"
    return said + ": the trigger does not help; the LoRA works as well without it (train longer, or caption what " \
                  "the trigger should not carry)"


def _bleed_said(config: Config, row: dict) -> tuple[str, bool]:
    """What the last bleed says, and whether it is above `quality.max_bleed`."""
    bleed, limit = row[BLEED], config.quality.max_bleed
    said = (f"{BLEED} {bleed:.3g} at step {row['step']}: prompts without the trigger change {100 * bleed:.0f} % as "
            "much as prompts with it")
    above = bleed > limit
    if above:
        said += (f", above quality.max_bleed={limit:g}: the LoRA leaks into other prompts (a kind: prior set in "
                 "data.sets, fewer steps or a lower train.learning_rate hold it back)")
    return said, above


def trigger_lines(config: Config, logged: list[dict]) -> list[str]:
    """The summary's lines: the last trigger gain (where the held-out captions carry a trigger) and the last bleed,
    with a warning above `quality.max_bleed`."""
    lines = []
    if gains := rows_with(logged, GAIN, "eval/loss", "eval/loss_no_trigger"):
        lines.append(f"  trigger: {_gain_said(gains[-1])}")
    if bleeds := rows_with(logged, BLEED):
        said, above = _bleed_said(config, bleeds[-1])
        lines.append(f"  {'WARNING: ' if above else ''}bleed: {said}")
    return lines


def trigger_facts(config: Config, logged: list[dict]) -> list[tuple[str, str]]:
    """report.html's rows (label, HTML) for the same."""
    facts = []
    if gains := rows_with(logged, GAIN, "eval/loss", "eval/loss_no_trigger"):
        facts.append(("trigger gain", html.escape(_gain_said(gains[-1]))))
    if bleeds := rows_with(logged, BLEED):
        said, above = _bleed_said(config, bleeds[-1])
        facts.append(("bleed", f"<strong>warning:</strong> {html.escape(said)}" if above else html.escape(said)))
    return facts
