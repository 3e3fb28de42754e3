"""`train.ema_decay`: an exponential moving average of the trained weights, for validation and the export.

The average is kept in fp32 beside the weights it follows: on the GPU for a LoRA (a few MB), in host memory
for full fine-tuning (a second copy of the model would not fit beside the optimizer). It updates after every
step the optimizer took (a skipped, non-finite step leaves it alone, decided on the device where it can),
is saved in each checkpoint (a resume continues it exactly), and is swapped into the model for validation
videos and the final export, whose raw weights are exported beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """Shadow copies of `params`: shadow = decay · shadow + (1 − decay) · weight after each step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, on_host: bool):
        self.params, self.decay = params, decay
        self.device = torch.device("cpu") if on_host else None
        self.shadows = [p.detach().to(self.device or p.device, torch.float32, copy=True) for p in params]
        # host copies of the weights, made once and refilled each step (a full model's worth for SFT); pinned where
        # they are copied from a GPU
        pin = on_host and any(p.is_cuda for p in params)
        self.staged = [torch.empty_like(s, pin_memory=pin) for s in self.shadows] if on_host else None

    @torch.no_grad()
    def update(self, finite: torch.Tensor | bool) -> None:
        """Move the average toward the weights, unless the step was skipped (`finite` false)."""
        if self.staged is not None:  # host copies: the skip is read here, once per step
            if bool(finite):
                for staged, param in zip(self.staged, self.params):
                    staged.copy_(param.detach())
                torch._foreach_lerp_(self.shadows, self.staged, 1.0 - self.decay)
            return
        weight = (1.0 - self.decay) * torch.as_tensor(finite, dtype=torch.float32, device=self.shadows[0].device)
        torch._foreach_lerp_(self.shadows, [p.detach().float() for p in self.params], [weight] * len(self.shadows))

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (validation, export); the trained ones after."""
        trained = [p.detach().to(self.device or p.device, copy=True) for p in self.params]  # beside the average
        for param, shadow in zip(self.params, self.shadows):
            param.copy_(shadow)
        try:
            yield
        finally:
            for param, kept in zip(self.params, trained):
                param.copy_(kept)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadows": [s.cpu() for s in self.shadows]}

    def load_state_dict(self, state: dict) -> None:
        for shadow, saved in zip(self.shadows, state["shadows"], strict=True):
            shadow.copy_(saved)
