"""What a run reports per step: the metrics row, the smoothed loss, and the guard on non-finite steps."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..models.family import Variant
from ..models.flops import peak_tflops, step_flops
from .readout import StepReadout

logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_NONFINITE = 20


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; too many in a row stop the run with advice."""

    def __init__(self, total: int) -> None:
        self.total, self.in_a_row = total, 0

    def record(self, finite: bool, step: int, loss: float, sample_ids: torch.Tensor) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        logger.warning("step %d: non-finite loss/gradient (loss=%s); update skipped (samples %s)",
                       step, loss, sample_ids.tolist())
        if self.in_a_row >= MAX_CONSECUTIVE_NONFINITE:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite steps in a row at step {step}: lower train.learning_rate, "
                "raise train.lr_warmup_steps, or use model.dtype=bf16/fp32"
            )


class SmoothedLoss:
    """The smoothed loss curve (exponential moving average, 0.9)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def update(self, x: float) -> float:
        if self.value is None or not math.isfinite(self.value):
            self.value = x
        else:
            self.value = 0.9 * self.value + 0.1 * x
        return self.value


@dataclass
class Waited:
    """One step's waits for its batches: the host's time in the data loader, and on CUDA a pair of events around
    each fetch, whose distance on the GPU's clock is how long the GPU sat idle for want of that batch (the host
    fetches while the GPU still runs the previous step's work, so host time alone overstates it)."""

    host_s: float = 0.0
    events: list = field(default_factory=list)

    def device_s(self) -> float:
        """The GPU's idle time (the events have run once the step's scalars are read); the host's without a GPU."""
        if not self.events:
            return self.host_s
        self.events[-1][1].synchronize()  # done already where the scalars were read; never raise "not ready"
        return sum(start.elapsed_time(end) for start, end in self.events) / 1000


class DataWait:
    """Times each fetch of a batch, `fetching()` before it and `fetched()` after; `take()` hands over a step's."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.waited, self._started, self._mark = Waited(), 0.0, None

    def fetching(self) -> None:
        self._started = time.perf_counter()
        if self.cuda:  # runs on the GPU once the work queued so far is done
            self._mark = torch.cuda.Event(enable_timing=True)
            self._mark.record()

    def fetched(self) -> None:
        self.waited.host_s += time.perf_counter() - self._started
        if self.cuda:  # runs as soon as it is queued if the GPU is idle: the distance is the GPU's wait
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.waited.events.append((self._mark, end))

    def take(self) -> Waited:
        waited, self.waited = self.waited, Waited()
        return waited


@dataclass
class FinishedStep:
    """A launched optimizer step, reported once its scalars reach the host (while the next step runs)."""

    step: int
    readout: StepReadout
    sample_ids: torch.Tensor
    geometry: tuple[int, int, int, int]  # the batch's (samples, frames, height, width): `Variant.batch_geometry`
    step_time: float
    data_wait: Waited
    lr: float
    epoch: int


def batch_flops(variant: Variant, geometry: tuple[int, int, int, int], accum: int):
    """Model FLOPs of one optimizer step on this process, from the batch's (samples, frames, height, width)."""
    batch, frames, height, width = geometry
    return step_flops(variant, frames, height, width, batch * accum)


def step_metrics(accelerator, config: Config, variant: Variant, finished: FinishedStep, values: dict[str, float],
                 skipped_steps: int) -> dict:
    """What one logged step reports to W&B and metrics.jsonl."""
    accum, processes = config.train.gradient_accumulation_steps, accelerator.num_processes
    flops = batch_flops(variant, finished.geometry, accum)
    samples = finished.geometry[0] * accum * processes
    step_time = finished.step_time
    metrics = {
        "loss": values["mean_loss"],
        "lr": finished.lr,
        "grad_norm": values["grad_norm"],
        "loss_scale": values["loss_scale"],
        "skipped_steps": skipped_steps,
        "step_time": step_time,
        "samples_per_s": samples / step_time,
        "tokens_per_s": flops.tokens * samples / step_time,
        "data_wait_s": finished.data_wait.device_s(),  # the device idle for want of data (the host's, on a CPU)
        "data_fetch_s": finished.data_wait.host_s,      # the host in the data loader, mostly while the GPU computes
        "epoch": finished.epoch,
    }
    device = accelerator.device
    if device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(torch.cuda.get_device_name(device))
        if peak:
            metrics["mfu"] = flops.training(config.train.mode) / step_time / (peak * 1e12)
    return metrics
