"""`cogft estimate`: the cost model's prediction for a config, printed for a person or as one JSON line."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..config import Config
from ..models.cost import (
    Estimate,
    HostEstimate,
    as_trained,
    cache_bytes_per_window,
    estimate,
    host_advice,
    host_estimate,
)
from ..models.loading import load_for_config
from ..optimizers import OPTIMIZERS, optimizer_entry


def run_estimate(config: Config, gpu: str, as_json: bool, gpu_memory: float | None = None,
                 host_ram: float | None = None) -> str:
    """The estimate on `gpu` (with `gpu_memory` GiB usable, any card by its memory) with the block settings the
    trainer would pick there under the config's budget, and the host memory it needs (against `host_ram` GiB)."""
    config, variant = load_for_config(config, validates=False)
    gpu = gpu if gpu_memory is None else f"{gpu}@{gpu_memory}"
    config = as_trained(config, variant, gpu, host_ram)
    result = estimate(config, variant, gpu)
    host = host_estimate(config, variant)
    advice = host_advice(config, variant, host, host_ram) if host_ram and host.training_gib > host_ram else []
    cache = cache_bytes_per_window(config, variant)
    if as_json:
        return json.dumps({**asdict(result), "cache_bytes_per_window": cache, "host": asdict(host),
                           "host_ram_gib": host_ram, "host_advice": advice})
    return format_estimate(config, result, cache) + "\n" + format_host(host, host_ram, advice)


def format_host(host: HostEstimate, host_ram: float | None, advice: list[str]) -> str:
    def verdict(gib: float) -> str:
        return "" if host_ram is None else ("  (fits)" if gib <= host_ram else f"  (does NOT fit {host_ram:g} GiB)")

    lines = [f"  host peak, prepare  {host.prepare_gib:7.2f} GiB{verdict(host.prepare_gib)}",
             f"  host peak, training {host.training_gib:7.2f} GiB{verdict(host.training_gib)}"]
    lines += [f"    {name:18s}{gib:7.2f} GiB" for name, gib in host.parts_gib.items()]
    return "\n".join(lines + [f"  try: {line}" for line in advice])


def format_estimate(config: Config, result: Estimate, cache_bytes: int | None = None) -> str:
    """The estimate for a person; `cache_bytes`: what prepare caches per clip window (`cache_bytes_per_window`), shown
    where given."""
    frames, samples = result.batch
    what = (f"batch {samples}" if frames == config.data.num_frames and samples == config.train.batch_size else
            f"a batch of {samples} still images (data.image_batch_size: more tokens than {config.train.batch_size} "
            f"clip{'s' if config.train.batch_size > 1 else ''})")
    size = "x".join(map(str, config.data.largest_size))
    largest = " (the largest bucket)" if len(config.data.sizes) > 1 else ""
    extrapolated = " (extrapolated from H100 measurements)" if result.extrapolated else ""
    budget = config.train.memory_budget_gib
    chosen = f", chosen for train.memory_budget_gib={budget}" if budget else ""
    lines = [
        f"{config.model.path} {config.train.mode}, {frames}x{size}{largest}, {what} on {result.gpu}{extrapolated}",
        f"  peak allocated  {result.peak_allocated_gib:7.2f} GiB  ({'fits' if result.fits else 'does NOT fit'})",
        f"  step time       {result.seconds_per_step:7.3f} s (attention: {result.attention})",
        *([f"  prior step      {result.prior_seconds_per_step:7.3f} s (a kind: prior batch: one more forward, the "
           "adapter off)"] if any(s.kind == "prior" for s in config.data.sets or ()) else []),
        f"  checkpointing   {config.train.gradient_checkpointing} "
        f"(offload_checkpoints={config.train.offload_checkpoints}, blocks_to_swap={config.train.blocks_to_swap}, "
        f"fp8_base={config.model.fp8_base}{chosen})",
    ]
    lines += [f"    {name:18s}{gib:7.2f} GiB" for name, gib in result.parts_gib.items()]
    if cache_bytes is not None:
        lines.append(f"  cache           {cache_bytes / 2**20:7.2f} MiB per clip window (latents and conditions; the "
                     "prompt's embedding beside it)")
    if config.train.optimizer not in OPTIMIZERS:  # an import path: its state measured on a CPU, or assumed
        entry = optimizer_entry(config.train)
        lines.append(f"  optimizer state {entry.state_bytes:7.2f} bytes per trained parameter "
                     + ("(measured after one step on a small matrix on the CPU)" if entry.state_measured else
                        "(unknown: it cannot step on a CPU; AdamW's 8 assumed)"))
    cached = "" if result.sample_seconds_cached is None else f"; {result.sample_seconds_cached:.1f} s with taylorseer"
    lines.append(f"  validation video {result.sample_seconds:6.1f} s exact "
                 f"({config.validation.num_inference_steps} steps, "
                 f"guidance {config.validation.guidance_scale:g}, decode included){cached}")
    lines += [f"  try: {advice}" for advice in result.advice]
    return "\n".join(lines)
