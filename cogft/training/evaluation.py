"""The held-out eval loss: clips kept out of training, scored with the training objective at fixed timesteps and
fixed noise, so two evaluations of the same weights give the same numbers and the curve carries no sampling noise
(the training loss, drawn at random timesteps, swings by more than a run improves).

x0 is the cached latent mean (no sampling). Each (clip, timestep) probe's noise comes from a CPU generator seeded by
(train.seed, the clip's cache key, the timestep): it depends on neither the training step, the device nor the number
of processes. The clips are spread over the ranks, and the probe losses summed into one table, so every rank
computes the same averages. A LoRA run also scores the base model (the adapter off), once: the base is frozen, so
its loss is the same at every evaluation, and `eval/lora_gain` = base − tuned says whether training moved anything.
Each clip whose caption carries a trigger (`data/triggers.py`) is also scored with the caption without it, at the same
timesteps and noise: `eval/trigger_gain` = that loss − the loss with the trigger says whether the trigger itself
calls up what was learnt (0 where no held-out caption carries one: nothing is run for them).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import Config, ConfigError
from ..data.cache import CacheEntry
from ..models.modes import adapter_disabled, evaluating
from ..seeding import mixed_seed
from .step import TrainingStep
from .topology import Topology

RANGES = 3  # the eval loss is also reported per third of the schedule: t < T/3, T/3 <= t < 2T/3, t >= 2T/3


def clip_key(entry: CacheEntry) -> str:
    """A clip's identity: a hash of its bytes (and its given image's), so a resume that encodes it otherwise
    (data.image_noise_draws changed) holds out the same clips; entries made by hand: their first file's name."""
    return entry.clip or Path(entry.latents[0]).stem


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_holdout(entries: list[CacheEntry], holdout: int | float, seed: int) -> tuple[list[CacheEntry],
                                                                                      list[CacheEntry]]:
    """(training entries, held-out entries) for `eval.holdout`: the clips ranked by a hash of (train.seed, clip key),
    so the choice depends on neither the listing order nor the rank, and a resume holds out the same clips. Entries
    of one clip (the same bytes listed with two captions) go together: a held-out clip is never trained on."""
    if not holdout or not entries:  # no clips at all: the dataset's own error says why
        return entries, []
    keys = sorted({clip_key(e) for e in entries}, key=lambda key: _rank(seed, key))
    count = holdout if isinstance(holdout, int) else max(1, round(holdout * len(keys)))
    if len(keys) < 2:
        raise ConfigError(f"eval.holdout={holdout}: the dataset has 1 clip; holding clips out needs at least 2 (one "
                          "to train on); add clips, or set eval.holdout=0")
    if count >= len(keys):
        raise ConfigError(f"eval.holdout={holdout} holds out {count} of the {len(keys)} clips, leaving none to train "
                          f"on; hold out at most {len(keys) - 1} (or a fraction such as 0.1)")
    held = set(keys[:count])
    held_out = sorted((e for e in entries if clip_key(e) in held), key=lambda e: (_rank(seed, clip_key(e)), e.prompt))
    return [e for e in entries if clip_key(e) not in held], held_out


def probe_timesteps(listed: list[int] | None, clips: int, schedule: int) -> list[list[int]]:
    """The timesteps each held-out clip is scored at: `eval.timesteps` for every clip, or one per clip with the
    clips' spread evenly over the schedule (clip i of n at (i + ½)·T/n), one forward pass each."""
    if listed is None:
        return [[(2 * i + 1) * schedule // (2 * clips)] for i in range(clips)]
    beyond = [t for t in listed if t >= schedule]
    if beyond:
        raise ConfigError(f"eval.timesteps: {beyond} not in the model's schedule of {schedule} timesteps; use 0 to "
                          f"{schedule - 1}")
    return [sorted(listed)] * clips


def timestep_ranges(schedule: int) -> list[tuple[int, int]]:
    edges = [schedule * k // RANGES for k in range(RANGES + 1)]
    return list(zip(edges, edges[1:]))


def eval_due(checkpoint_every: int, every: int | None, step: int, last: bool) -> bool:
    """The held-out eval's (and `quality/bleed`'s) steps: each checkpoint's, the last, and every `eval.every`."""
    return last or step % checkpoint_every == 0 or (every is not None and step % every == 0)


def mean_loss(values: list[float]) -> float:
    return math.fsum(values) / len(values)


class HeldOutEval:
    """Scores the held-out clips with the model being trained, at each checkpoint and every `eval.every` steps.

    Clip i runs on data rank i % data_parallel_size (`Topology.share`); with weights sharded over the processes
    (`shared_forward`: ZeRO-3, FSDP) every process takes part in every forward pass and the main one's losses count.
    """

    def __init__(self, config: Config, step: TrainingStep, clips: list[CacheEntry], topology: Topology = Topology(),
                 shared_forward: bool = False):
        self.step, self.clips, self.seed = step, clips, config.train.seed
        schedule = step.num_train_timesteps
        timesteps = probe_timesteps(config.eval.timesteps, len(clips), schedule)
        self.probes = [(i, t) for i, listed in enumerate(timesteps) for t in listed]
        self.ranges = timestep_ranges(schedule)
        self.mine = topology.share(len(clips), shared_forward)
        self.counts = topology.data_rank == 0 or not shared_forward
        self.every, self.checkpoint_every = config.eval.every, config.train.checkpoint_every
        self.lora = config.train.mode == "lora"
        self.base: list[float] | None = None  # the base model's probe losses (frozen weights: computed once)
        self.base_untriggered: list[float] | None = None  # the same without the triggers
        self.triggered = [bool(clip.untriggered_prompt) for clip in clips]  # which captions carry a trigger
        # what makes two eval losses comparable; a resume measured on another set forgets its best (best.py)
        self.identity = hashlib.sha256(json.dumps([self.seed, [clip_key(c) for c in clips], [c.prompt for c in clips],
                                                   self.probes]).encode()).hexdigest()[:16]

    def due(self, step: int, last: bool) -> bool:
        """At each checkpoint step (the last included; a stop request's own checkpoint is not waited on), and every
        `eval.every` steps."""
        return eval_due(self.checkpoint_every, self.every, step, last)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """The eval metrics of `model`'s current weights; every process calls it (the losses are summed over them)."""
        started = time.perf_counter()
        tuned = self.losses(model)
        metrics = {"eval/loss": mean_loss(tuned)}
        for low, high in self.ranges:
            inside = [loss for loss, (_, t) in zip(tuned, self.probes) if low <= t < high]
            if inside:
                metrics[f"eval/loss_t{low:03d}_{high:03d}"] = mean_loss(inside)
        if self.lora:
            if self.base is None:
                with adapter_disabled(model):
                    self.base = self.losses(model)
                    self.base_untriggered = self.untriggered_losses(model, self.base)
            metrics["eval/loss_base"] = mean_loss(self.base)
            metrics["eval/lora_gain"] = metrics["eval/loss_base"] - metrics["eval/loss"]
        untriggered = self.untriggered_losses(model, tuned)
        metrics["eval/trigger_gain"] = mean_loss(untriggered) - metrics["eval/loss"]
        if any(self.triggered):
            metrics["eval/loss_no_trigger"] = mean_loss(untriggered)
            if self.lora:
                metrics["eval/trigger_gain_base"] = mean_loss(self.base_untriggered) - metrics["eval/loss_base"]
        metrics["eval/seconds"] = time.perf_counter() - started
        return metrics

    def untriggered_losses(self, model: torch.nn.Module, triggered: list[float]) -> list[float]:
        """Each probe's loss with its clip's caption without the trigger; a caption that carries none keeps its loss
        in `triggered` (the same input: no forward is spent on it)."""
        if not any(self.triggered):
            return list(triggered)
        bare = self.losses(model, untriggered=True)
        return [bare[i] if self.triggered[clip] else triggered[i] for i, (clip, _) in enumerate(self.probes)]

    def losses(self, model: torch.nn.Module, untriggered: bool = False) -> list[float]:
        """Each probe's loss, in probe order, the same on every process. `untriggered`: the captions without their
        triggers, for the clips that carry one (the others' probes are 0)."""
        device = self.step.accelerator.device
        table = torch.zeros(len(self.probes), device=device)
        with evaluating(model):
            for clip in self.mine:
                if untriggered and not self.triggered[clip]:
                    continue
                cached = self._load(clip, device, untriggered)
                for index, (owner, t) in enumerate(self.probes):
                    if owner == clip:
                        loss = self._probe(model, cached, clip, t)
                        if self.counts:
                            table[index] = loss
        return self.step.accelerator.reduce(table, reduction="sum").tolist()

    def _load(self, clip: int, device: torch.device, untriggered: bool = False) -> dict[str, torch.Tensor]:
        entry = self.clips[clip]
        cached = load_file(entry.latents[0])  # the clip's start, as data.windows=1 trains it
        cached["prompt_embeds"] = load_file(entry.untriggered_prompt if untriggered else entry.prompt)["prompt_embeds"]
        return {key: value[None].to(device) for key, value in cached.items()}

    def _probe(self, model: torch.nn.Module, cached: dict[str, torch.Tensor], clip: int, t: int) -> torch.Tensor:
        """The objective's loss of one clip at timestep t, on its latent mean with its own fixed noise."""
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, int(clip_key(self.clips[clip])[:15], 16), t))
        return self.step.loss(model, self.step.variant.fixed_inputs(cached, generator, t))
