"""One training step: forward + backward of a micro-batch, then the guarded optimizer update.

This is the hot path. The trainer runs it, and `cogft bench` times exactly this code, so a speed-up
measured by the benchmark is a speed-up of real training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.dataset import PRIOR
from ..models.family import ModelInputs, TrainingDraws, Variant
from ..models.modes import adapter_disabled
from ..models.objective_options import REFERENCE, Objective
from .backends import uses_deepspeed, uses_fsdp
from .bf16_adamw import BackwardAdamW


@dataclass
class UpdateResult:
    """What an update leaves behind, on the device where it can: reading it is the trainer's (one step later)."""

    grad_norm: torch.Tensor
    finite: torch.Tensor | bool
    loss_scale: torch.Tensor | float


@dataclass
class StepParts:
    """Everything one training step needs, built by `assemble_step` (the trainer's and the bench's)."""

    accelerator: Any
    transformer: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    noise_scheduler: Any
    variant: Variant
    max_grad_norm: float
    block_settings: tuple[bool | float, bool, int] = (False, False, 0)  # (checkpointing, offload, swapped blocks)
    condition_dropout: float = 0.0                   # share of samples whose conditions (an image) are zeroed
    caption_dropout: float = 0.0                     # share of samples trained on the empty prompt
    empty_prompt: torch.Tensor | None = None         # its embedding [L, D], on the device (with caption_dropout)
    prior_weight: float = 1.0                        # a prior batch's loss is scaled by it before its backward
    objective: Objective = REFERENCE                 # the timesteps drawn, the loss's form and weighting (train.*)


def drop_captions(prompt_embeds: torch.Tensor, empty: torch.Tensor, fraction: float,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """Each sample's prompt replaced by the empty prompt with probability `fraction` (one draw from its generator,
    on the device: no step waits for the host), so the model also learns the unconditional half of guidance."""
    dropped = torch.stack([torch.rand((), generator=g, device=g.device) < fraction for g in generators])
    return torch.where(dropped.to(prompt_embeds.device)[:, None, None], empty.to(prompt_embeds.dtype), prompt_embeds)


class TrainingStep:
    """One optimizer step over the parts: `forward_backward` per micro-batch, then `update`."""

    def __init__(self, parts: StepParts):
        self.parts = parts
        self.accelerator, self.transformer, self.params = parts.accelerator, parts.transformer, parts.params
        self.optimizer, self.lr_scheduler, self.scaler = parts.optimizer, parts.lr_scheduler, parts.scaler
        self.variant = parts.variant
        self.num_train_timesteps = parts.noise_scheduler.config.num_train_timesteps
        self.deepspeed = uses_deepspeed(parts.accelerator)
        self.inner_optimizer = getattr(parts.optimizer, "optimizer", parts.optimizer)  # accelerate's wrapper holds ours
        self.in_backward = self.inner_optimizer if isinstance(self.inner_optimizer, BackwardAdamW) else None
        # a fused AdamW takes the skip decision as a tensor (`found_inf`), so no step waits for the host;
        # FSDP's sharded (DTensor) weights keep the host check, the path measured with them
        self.skips_on_device = (getattr(self.inner_optimizer, "_step_supports_amp_scaling", False)
                                and not uses_fsdp(parts.accelerator))
        self.sample_losses: tuple[torch.Tensor, torch.Tensor] | None = None  # the last micro-batch's, per sample
        if parts.caption_dropout and parts.empty_prompt is None:
            raise ValueError("caption dropout needs the empty prompt's embedding")

    def loss(self, model: torch.nn.Module, inputs: ModelInputs, objective: Objective = REFERENCE,
             prior: bool = False, per_sample: bool = False) -> torch.Tensor:
        """The family's objective on `inputs` with `model` (the training step's, or the evaluation's unwrapped one),
        with `objective`'s loss form and weighting (the evaluation's: the reference); `prior`: towards the base
        model's own prediction (`base_prediction`) instead of the clean latents; `per_sample`: each sample's [B]."""
        # DeepSpeed's engine holds the model in fp16/bf16 and turns autocast off inside forward
        objective_of = self.variant.sample_losses if per_sample else self.variant.loss
        return objective_of(model, inputs, self.parts.noise_scheduler, cast_inputs=self.deepspeed,
                            objective=objective, target=self.base_prediction(model, inputs) if prior else None)

    def base_prediction(self, model: torch.nn.Module, inputs: ModelInputs):
        """A prior sample's target: `model`'s prediction at (x_t, t) with its adapter switched off, without
        gradient (one more forward, no backward)."""
        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with adapter_disabled(self.accelerator.unwrap_model(model)), torch.no_grad():
                return self.variant.predict(model, x_t, t, inputs, self.deepspeed)
        return predict

    def forward_backward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        """Loss of one micro-batch (fp32, detached, unweighted) after its backward pass; a prior set's batch
        (`batch[PRIOR]`) is trained towards the base model, its loss scaled by `prior_weight` for the backward.
        Leaves `sample_losses`: (timesteps, each sample's loss), on the device, of which the loss is the mean (None
        where the family gives its loss per batch only)."""
        draws = TrainingDraws(generators, self.parts.condition_dropout, self.parts.objective)
        inputs = self.variant.draw_inputs(batch, draws, self.parts.noise_scheduler)
        if self.parts.caption_dropout:  # drawn last: runs without it draw as before
            inputs.prompt_embeds = drop_captions(inputs.prompt_embeds, self.parts.empty_prompt,
                                                 self.parts.caption_dropout, generators)
        prior = bool(batch.get(PRIOR, False))
        per_sample = self.variant.gives_sample_losses
        losses = self.loss(self.transformer, inputs, self.parts.objective, prior, per_sample)
        loss = losses.mean() if per_sample else losses
        self.sample_losses = (inputs.timesteps.detach(), losses.detach()) if per_sample else None
        if self.in_backward is not None:
            self.in_backward.begin(self.accelerator.sync_gradients)
        scaled = loss * self.parts.prior_weight if prior and self.parts.prior_weight != 1 else loss
        self.accelerator.backward(self.scaler.scale(scaled))
        return loss.detach()

    def update(self, loss: torch.Tensor) -> UpdateResult:
        """Unscale, clip, step; a non-finite loss or gradient skips the update (the fp16 scaler's way too).

        With a fused AdamW nothing here waits for the GPU: the skip is decided on the device, and the
        result's tensors are read by the trainer while the next step runs.
        """
        if self.deepspeed:
            return self._deepspeed_update(loss)
        if self.in_backward is not None:
            return self._closing_update(loss)
        # the scaler hands a fused optimizer its found-inf flag as a tensor; accelerate's wrapper hides that
        optimizer = self.inner_optimizer if self.skips_on_device else self.optimizer
        self.scaler.unscale_(optimizer)
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.parts.max_grad_norm)
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
        loss_scale = self.scaler._get_scale_async().clone() if self.scaler.is_enabled() else 1.0  # update() moves it
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)  # skips a step with non-finite gradients itself
        elif self.skips_on_device:
            optimizer.found_inf = (~finite).float()
            optimizer.step()
            del optimizer.found_inf
        elif finite:
            optimizer.step()
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(grad_norm, finite, loss_scale)

    def _deepspeed_update(self, loss: torch.Tensor) -> UpdateResult:
        """DeepSpeed already unscaled, clipped and stepped inside `accelerator.backward`; read what it did."""
        norm = self.accelerator.clip_grad_norm_(self.params, self.parts.max_grad_norm)  # the engine's global norm
        grad_norm = torch.tensor(float("nan") if norm is None else float(norm))
        skipped = self.optimizer.step_was_skipped  # fp16 overflow: DeepSpeed lowered the scale, kept the weights
        finite = not skipped and bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
        engine_optimizer = self.optimizer.optimizer
        loss_scale = float(getattr(engine_optimizer, "loss_scale", 1.0)) if self.variant.needs_loss_scaling else 1.0
        self.lr_scheduler.step()
        return UpdateResult(grad_norm, finite, loss_scale)

    def _closing_update(self, loss: torch.Tensor) -> UpdateResult:
        """bf16 AdamW already updated each weight during backward (no clipping); close the step."""
        grad_norm, finite = self.in_backward.grad_norm_and_finite()
        self.optimizer.step()
        self.lr_scheduler.step()
        return UpdateResult(grad_norm, finite & torch.isfinite(loss), 1.0)
