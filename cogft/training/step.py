"""One training step: forward + backward of a micro-batch, then the guarded optimizer update.

This is the hot path. The trainer runs it, and `cogft bench` times exactly this code, so a speed-up
measured by the benchmark is a speed-up of real training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.family import ModelFamily
from .backends import uses_deepspeed, uses_fsdp
from .bf16_adamw import BackwardAdamW
from .objective import diffusion_loss, draw_inputs


@dataclass
class UpdateResult:
    """What an update leaves behind, on the device where it can: reading it is the trainer's (one step later)."""

    grad_norm: torch.Tensor
    finite: torch.Tensor | bool
    loss_scale: torch.Tensor | float


class TrainingStep:
    """Holds the pieces one step needs; `rotary_for(latent_frames)` gives 3D RoPE or None;
    `block_settings` records the (checkpointing, offload) the blocks were set up with."""

    def __init__(self, accelerator, transformer, params, optimizer, lr_scheduler, scaler: torch.amp.GradScaler,
                 noise_scheduler, family: ModelFamily, max_grad_norm: float,
                 rotary_for: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None],
                 block_settings: tuple[bool | float, bool] = (False, False)):
        self.accelerator = accelerator
        self.transformer = transformer
        self.params = params
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scaler = scaler
        self.noise_scheduler = noise_scheduler
        self.family = family
        self.max_grad_norm = max_grad_norm
        self.rotary_for = rotary_for
        self.block_settings = block_settings
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.device_type = accelerator.device.type
        self.deepspeed = uses_deepspeed(accelerator)
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds ours
        self.in_backward = self.inner_optimizer if isinstance(self.inner_optimizer, BackwardAdamW) else None
        # a fused AdamW takes the skip decision as a tensor (`found_inf`), so no step waits for the host;
        # FSDP's sharded (DTensor) weights keep the host check, the path measured with them
        self.skips_on_device = (getattr(self.inner_optimizer, "_step_supports_amp_scaling", False)
                                and not uses_fsdp(accelerator))

    def forward_backward(self, batch: dict[str, torch.Tensor], generators: list[torch.Generator]) -> torch.Tensor:
        """Loss of one micro-batch (fp32, detached) after its backward pass."""
        inputs = draw_inputs(batch["latent_mean"], batch["latent_logvar"], self.family.scaling_factor,
                             self.num_train_timesteps, generators)
        prompt_embeds = batch["prompt_embeds"]
        rotary = self.rotary_for(inputs.x0.shape[1])
        autocast = self.family.dtype != torch.float32
        if self.deepspeed:  # its engine holds the model in fp16/bf16 and turns autocast off inside forward
            prompt_embeds = prompt_embeds.to(self.family.dtype)

        def predict_velocity(x_t, t):
            if self.deepspeed:
                x_t = x_t.to(self.family.dtype)
            with torch.autocast(self.device_type, dtype=self.family.dtype, enabled=autocast):
                return self.transformer(hidden_states=x_t, encoder_hidden_states=prompt_embeds, timestep=t,
                                        image_rotary_emb=rotary, return_dict=False)[0]

        loss = diffusion_loss(predict_velocity, self.noise_scheduler, inputs)
        if self.in_backward is not None:
            self.in_backward.begin(self.accelerator.sync_gradients)
        self.accelerator.backward(self.scaler.scale(loss))
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
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
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
        norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)  # the engine's global norm
        grad_norm = torch.tensor(float("nan") if norm is None else float(norm))
        skipped = self.optimizer.step_was_skipped  # fp16 overflow: DeepSpeed lowered the scale, kept the weights
        finite = not skipped and bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
        engine_optimizer = self.optimizer.optimizer
        loss_scale = float(getattr(engine_optimizer, "loss_scale", 1.0)) if self.family.needs_loss_scaling else 1.0
        self.lr_scheduler.step()
        return UpdateResult(grad_norm, finite, loss_scale)

    def _closing_update(self, loss: torch.Tensor) -> UpdateResult:
        """bf16 AdamW already updated each weight during backward (no clipping); close the step."""
        grad_norm, finite = self.in_backward.grad_norm_and_finite()
        self.optimizer.step()
        self.lr_scheduler.step()
        return UpdateResult(grad_norm, finite & torch.isfinite(loss), 1.0)
