"""`cogft bench --fp8-error`: how far `model.fp8_base` moves the transformer's prediction.

One forward per timestep with the weights as loaded, then the same inputs through the same model after
`store_in_fp8`; the relative error and the cosine of the two velocity predictions. `random://` models are
built at full size on the device with random weights; any other `model.path` is loaded, so on real weights
this measures what a user's LoRA will train against.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from ..config import Config
from ..models.build import RANDOM_SCHEME
from ..models.fp8 import store_in_fp8
from ..models.loading import load_transformer
from .timing import device_name, free
from .training import bench_setup, random_transformer, synthetic_batch

TIMESTEPS = (100, 500, 900)  # low, middle and high noise of the 1000-step schedule


def bench_fp8_error(config: Config, timesteps: tuple[int, ...] = TIMESTEPS,
                    emit: Callable[[dict], None] = lambda row: print(json.dumps(row), flush=True)) -> dict:
    """One row: the relative error and cosine of the float8 model's prediction against the original's, per timestep,
    and how many parameters float8 holds."""
    device, config, variant = bench_setup(config)
    free(device)
    if config.model.path.startswith(RANDOM_SCHEME):
        transformer = random_transformer(variant, variant.dtype, device)
    else:
        transformer = load_transformer(config.model.path, variant, config.model.revision).to(device)
    transformer.eval().requires_grad_(False)
    scheduler = variant.spec.diffusers_class("scheduler").from_config(variant.configs.scheduler)
    batch = synthetic_batch(config, variant, device, config.train.seed)
    # x0 from the batch's latent means, padded as training pads it, with noise fixed by the seed
    inputs = variant.fixed_inputs(batch, torch.Generator().manual_seed(config.train.seed + 1), 0)
    x0 = inputs.x0

    @torch.no_grad()
    def predictions() -> list[torch.Tensor]:
        out = []
        for t in timesteps:
            steps = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
            x_t = scheduler.add_noise(x0, inputs.noise.to(x0.dtype), steps)
            out.append(variant.predict(transformer, x_t, steps, inputs).float())
        return out

    reference = predictions()
    store_in_fp8(transformer, compute_dtype=variant.dtype)
    stored = sum(p.numel() for p in transformer.parameters() if p.dtype == torch.float8_e4m3fn)
    errors, cosines = [], []
    for want, got in zip(reference, predictions()):
        errors.append(round(((got - want).norm() / want.norm()).item(), 5))
        cosines.append(round(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item(), 6))
    row = {"figure": "fp8_error", "model": config.model.path, "dtype": str(variant.dtype).removeprefix("torch."),
           "frames": config.data.num_frames, "height": config.data.sizes[0][0], "width": config.data.sizes[0][1],
           "fp8_parameters": stored, "parameters": sum(p.numel() for p in transformer.parameters()),
           "timesteps": list(timesteps), "relative_error": errors, "cosine": cosines, "device": device_name(device)}
    emit(row)
    transformer = reference = None
    free(device)
    return row
