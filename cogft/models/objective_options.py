"""The training objective's options a family may offer (`train.timestep_sampling`, `train.loss`, ... and loss masks):
which timesteps a step draws, the loss's form, and the masked mean a loss mask makes.

Timesteps are the scheduler's discrete ones, 0 .. T-1 (T = `num_train_timesteps`; a larger t is noisier). A sampler
draws a share τ in [0, 1] from the step's per-sample generator (one draw, on the generator's device: no step waits for
the host) and maps it onto the trained range [lo, hi] = [`min_timestep`, `max_timestep`]:

    t = lo + floor(τ · (hi − lo + 1)), clamped to [lo, hi]

so a range squeezes the sampler's shape into it (musubi-tuner's default). `uniform` draws t directly
(`torch.randint(lo, hi + 1)`: over the whole schedule, the draw the trainer always made). `logit_normal`:
τ = sigmoid(N(logit_mean, logit_std²)) (SD3's). `mode`: τ = 1 − u − s·(cos²(πu/2) − 1 + u) with u uniform and
s = `mode_scale` (SD3's "mode" sampling with heavy tails, monotone for s in [−1, 2/(π−2)]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class Objective:
    """The objective's options, as the `train.*` keys of the same names (described in the config schema). The defaults
    are the reference recipe: uniform timesteps over the whole schedule, the squared error, the family's reference
    weighting. The held-out eval always scores with the defaults, so eval losses compare across runs that differ
    here."""

    timestep_sampling: str = "uniform"       # uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int = 0
    max_timestep: int | None = None          # None: the schedule's last
    loss: str = "mse"                        # mse | huber
    huber_c: float = 0.1
    loss_weighting: str = "reference"        # reference | none | min_snr
    min_snr_gamma: float = 5.0

    @classmethod
    def of(cls, train: Any) -> Objective:
        """The options of a `TrainConfig` (or anything with attributes of the same names)."""
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)})

    def departures(self) -> list[str]:
        """The keys whose choice leaves the reference recipe (a parameter of a sampler not chosen is no departure)."""
        reference = Objective()
        chosen = ("timestep_sampling", "min_timestep", "max_timestep", "loss", "loss_weighting")
        return [f"train.{key}" for key in chosen if getattr(self, key) != getattr(reference, key)]

    def timestep_range(self, schedule: int) -> tuple[int, int]:
        """(lo, hi), both trained, of a schedule of `schedule` timesteps."""
        return self.min_timestep, schedule - 1 if self.max_timestep is None else self.max_timestep


REFERENCE = Objective()


def draw_timestep(generator: torch.Generator, objective: Objective, schedule: int) -> torch.Tensor:
    """One sample's timestep (an int64 scalar on the generator's device), one draw from its generator."""
    low, high = objective.timestep_range(schedule)
    device = generator.device
    if objective.timestep_sampling == "uniform":
        return torch.randint(low, high + 1, (), generator=generator, device=device)
    if objective.timestep_sampling == "logit_normal":
        normal = torch.randn((), generator=generator, device=device)
        share = torch.sigmoid(normal * objective.logit_std + objective.logit_mean)
    elif objective.timestep_sampling == "mode":
        u = torch.rand((), generator=generator, device=device)
        share = 1 - u - objective.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    else:
        raise ValueError(f"unknown timestep sampling {objective.timestep_sampling!r}")
    return (low + torch.floor(share * (high - low + 1))).long().clamp(low, high)


def elementwise_loss(residual: torch.Tensor, objective: Objective) -> torch.Tensor:
    """The loss of each element's residual: `mse` r², or `huber` the pseudo-Huber 2c·(√(r² + c²) − c) (c =
    `huber_c`), which is r² for |r| ≪ c and grows like 2c·|r| beyond, so outliers pull less."""
    if objective.loss == "huber":
        c = objective.huber_c
        return 2 * c * (torch.sqrt(residual**2 + c * c) - c)
    if objective.loss != "mse":
        raise ValueError(f"unknown loss {objective.loss!r}")
    return residual**2


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each sample's mean of `values` [B, ...]; with a `mask` that broadcasts to them (a weight in [0, 1] per latent
    pixel, [B, F, 1, h, w] over [B, F, C, h, w]), the weighted mean Σ m·v / Σ m over the elements (the mask counted
    once per channel). A zero-weight element adds exactly nothing, to the loss or its gradient; a sample whose mask is
    zero everywhere adds 0."""
    if mask is None:
        return values.flatten(1).mean(dim=1)
    dims = tuple(range(1, values.dim()))
    weight = mask.expand_as(values)
    return (values * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(torch.finfo(torch.float32).tiny)
