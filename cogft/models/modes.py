"""The modes a model is run in outside its training step: evaluation (validation renders, the held-out eval, the
export probe) and the base model with its adapter switched off. Training and inference both reach them here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no LoRA dropout) and without gradients inside the block, then back in its mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def adapter_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The base model inside the block: the LoRA layers bypassed (diffusers' `disable_adapters`), then back on with
    each weight's requires_grad as it was (peft's re-enabling marks every adapter weight trainable)."""
    params = list(transformer.parameters())
    trainable = [p.requires_grad for p in params]
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
        for param, flag in zip(params, trainable):
            param.requires_grad_(flag)
