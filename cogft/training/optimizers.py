"""The optimizer a run steps with, chosen by `train.optimizer` (`backends.optimizer_problem` says why a choice
cannot run in a launch).

adamw: torch's fused AdamW (fp32 state); adamw_bf16: bf16 weights and state, stepped inside the backward pass
(`bf16_adamw.py`); adamw8bit: bitsandbytes' block-wise 8-bit AdamW state (about 6 bytes less per trained
parameter; CUDA only); prodigy: Prodigy, which estimates the step size itself (`train.learning_rate` is
its multiplier, 1.0 unless set). Every optimizer's state is a plain `state_dict`, saved and restored by
accelerate with the checkpoint, so a resume continues exactly.
"""

from __future__ import annotations

import logging

import torch

from ..config import Config
from .backends import cpu_adamw
from .bf16_adamw import BackwardAdamW

logger = logging.getLogger(__name__)


def build_optimizer(config: Config, params: list[torch.nn.Parameter], device: torch.device,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable weights. AdamW is the fused kernel (one launch for all params,
    and a skip decided on the device), a CPU AdamW when DeepSpeed keeps the optimizer in host memory, or bf16
    AdamW inside the backward pass."""
    train = config.train
    settings = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                    weight_decay=train.weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adamw_bf16":
        return BackwardAdamW(params, seed=train.seed, **settings)
    if train.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **settings)
    if train.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if train.learning_rate < 0.1:
            logger.warning("train.optimizer=prodigy with train.learning_rate=%g: Prodigy finds the step size itself and "
                           "the learning rate multiplies it (1.0 is usual); this one will barely train",
                           train.learning_rate)

        # the settings its authors give for diffusion fine-tuning: bias correction, and a step size that warm-up
        # cannot inflate
        return Prodigy(params, use_bias_correction=True, safeguard_warmup=train.lr_warmup_steps > 0, **settings)
    if offloaded:
        return cpu_adamw(params, implementation=train.cpu_adam, **settings)
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **settings)
