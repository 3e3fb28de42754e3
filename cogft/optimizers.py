"""The optimizers `train.optimizer` names: one table, read by everything the choice changes.

Each `OptimizerEntry` says how to build it, what it keeps per trained parameter (for `cogft estimate`), when it
cannot run (`problem`), which package and pip extra bring it, and which param-group values come from the config
(`settings`: passed to the builder, and written again over the checkpoint's after a resume, so every optimizer
resumes through `reapply_settings`). The config validates `train.optimizer` against `OPTIMIZERS`, so adding a row
adds an optimizer. Every optimizer's state is a plain `state_dict`, saved and restored by accelerate with the
checkpoint, so a resume continues exactly.

Beside the table, `train.optimizer` may name any `torch.optim.Optimizer` subclass by its import path: the schema
imports it (only then) and checks `train.optimizer_args` against its signature, and `optimizer_entry` makes it an
entry like the table's, its state bytes measured on a small parameter after one step (`probe_state_bytes`).

The schema imports this module, and the CLI validates a config before importing torch: so nothing from cogft
is imported here, and torch and the optimizers' packages only inside the builders (and for an import path).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "adamw"  # what a refusal suggests instead: runs everywhere, needs no extra package
LR_RATIO = "lr_ratio"  # a param group's learning rate as a multiple of train.learning_rate (LoRA+'s B matrices)


class TrainKeys(Protocol):
    """The `train.*` values the optimizers read (`config.TrainConfig`; named here as the schema imports this)."""

    optimizer: str
    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    lr_warmup_steps: int
    seed: int
    cpu_adam: str
    optimizer_args: dict[str, Any]


@dataclass(frozen=True)
class Launch:
    """What an optimizer's refusals look at: where this process trains and who owns the optimizer step."""

    device: str                      # the torch device type: "cuda", "cpu", ...
    variant: str                     # the model variant's name and the dtype its weights train in
    dtype: torch.dtype
    processes: int = 1
    deepspeed_or_fsdp: bool = False  # the backend owns the weights and the optimizer step
    offloaded: bool = False          # DeepSpeed keeps the optimizer in host memory, where only CPU AdamW runs


Builder = Callable[[list, dict[str, Any], TrainKeys, "torch.device", bool], "torch.optim.Optimizer"]


def adam_settings(train: TrainKeys) -> dict[str, Any]:
    """AdamW's param-group values from the config."""
    return dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                weight_decay=train.weight_decay, eps=train.adam_epsilon)


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    summary: str                  # the config key's description of it
    build: Builder                # (params, settings, train, device, offloaded) -> the optimizer
    state_bytes: float            # optimizer state per trained parameter, beside its weight and gradient
    settings: Callable[[TrainKeys], dict[str, Any]] = adam_settings
    package: str | None = None    # the module it needs beyond cogft's dependencies, and the extra that installs it
    extra: str | None = None
    needs_cuda: bool = False
    bf16_weights: bool = False    # trains the model's bf16 weights themselves, no fp32 master copy
    in_backward: bool = False     # steps each weight inside the backward pass, freeing its gradient there
    runs_offloaded: bool = False  # has a CPU implementation for a DeepSpeed config that offloads the optimizer
    learning_rate: float | None = None  # its own default for train.learning_rate, when it means something else
    state_measured: bool = True   # False: an import path whose state could not be measured (8 bytes assumed)

    @property
    def bytes_per_parameter(self) -> float:
        """A trained parameter's memory: its weight (fp32 master, or the bf16 weight itself), its gradient (none
        kept when stepping in backward) and the optimizer's state."""
        weight = 2 if self.bf16_weights else 4
        return weight + (0 if self.in_backward else weight) + self.state_bytes

    def problem(self, launch: Launch) -> str | None:
        """Why it cannot run in this launch, naming the fix; None when it can."""
        import torch

        name = f"train.optimizer={self.name}"
        if self.bf16_weights and launch.dtype != torch.bfloat16:
            return (f"{name} trains bf16 weights, but the {launch.variant} variant runs in {launch.dtype}: set "
                    f"model.dtype=bf16 or use train.optimizer={DEFAULT_OPTIMIZER}")
        if self.in_backward and launch.processes > 1:
            return (f"{name} updates each weight inside the backward pass, before the gradients of "
                    f"{launch.processes} processes could be averaged: it is for one GPU; with several use "
                    f"train.optimizer={DEFAULT_OPTIMIZER} (with deepspeed_zero2/zero3 or fsdp when it does not fit)")
        if self.in_backward and launch.deepspeed_or_fsdp:
            return (f"{name} updates weights inside the backward pass, which DeepSpeed and FSDP own; use "
                    f"train.optimizer={DEFAULT_OPTIMIZER} with these launch configs")
        if launch.offloaded and not self.runs_offloaded:
            return (f"{name}: this DeepSpeed config keeps the optimizer in host memory, where only its CPU AdamW runs; "
                    f"use train.optimizer={DEFAULT_OPTIMIZER} with it, or a launch config without offload_optimizer")
        if self.needs_cuda and launch.device != "cuda":
            return (f"{name}: {self.package or self.name} runs on CUDA GPUs, and this process trains on "
                    f"{launch.device}; use train.optimizer={DEFAULT_OPTIMIZER} here")
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{name} needs the {self.package} package: pip install \"cogft[{self.extra}]\""
        return None

    def describe(self) -> str:
        install = f" (pip install 'cogft[{self.extra}]')" if self.extra else ""
        return f"{self.name}{install}: {self.summary}"


def cpu_adamw(params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
              implementation: str = "auto"):
    """DeepSpeed's vectorised CPUAdam (AdamW mode); torch's AdamW when asked or when the native op cannot be
    built here."""
    import torch

    if implementation == "torch":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
    except Exception as error:  # the op is compiled on first use and needs g++ and the Python headers
        logger.warning("DeepSpeed CPUAdam unavailable (%s: %s); the offloaded optimizer runs torch's AdamW on the CPU",
                       type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _adamw(params, settings, train, device, offloaded):
    """The fused kernel (one launch for all params, and a skip decided on the device), or a CPU AdamW when
    DeepSpeed keeps the optimizer in host memory."""
    import torch

    if offloaded:
        return cpu_adamw(params, implementation=train.cpu_adam, **settings)
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **settings)


def _adamw_bf16(params, settings, train, device, offloaded):
    from .training.bf16_adamw import BackwardAdamW

    return BackwardAdamW(params, seed=train.seed, **settings)


def _adamw8bit(params, settings, train, device, offloaded):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, **settings)


def _prodigy_settings(train: TrainKeys) -> dict[str, Any]:
    # the settings its authors give for diffusion fine-tuning: bias correction, and a step size that warm-up
    # cannot inflate
    return {**adam_settings(train), "use_bias_correction": True, "safeguard_warmup": train.lr_warmup_steps > 0}


def _prodigy(params, settings, train, device, offloaded):
    from prodigyopt import Prodigy

    if train.learning_rate < 0.1:
        logger.warning("train.optimizer=prodigy with train.learning_rate=%g: Prodigy finds the step size itself and "
                       "the learning rate multiplies it (1.0 is usual); this one will barely train",
                       train.learning_rate)
    return Prodigy(params, **settings)


OPTIMIZERS: dict[str, OptimizerEntry] = {entry.name: entry for entry in (
    OptimizerEntry(DEFAULT_OPTIMIZER, "fp32 master weights, gradients and AdamW state", _adamw,
                   state_bytes=8, runs_offloaded=True),
    OptimizerEntry("adamw_bf16", "bf16 weights (a bf16 variant's) with stochastic rounding and bf16 state, applied "
                   "during the backward pass (5B SFT on one 80 GB GPU; no clipping; one process, no DeepSpeed/FSDP)",
                   _adamw_bf16, state_bytes=4, bf16_weights=True, in_backward=True),
    # two 8-bit moments, and an fp32 scale for each of them per block of 256 (measured: 2B SFT 9.34 GiB below adamw)
    OptimizerEntry("adamw8bit", "bitsandbytes' 8-bit AdamW state (CUDA GPUs)", _adamw8bit,
                   state_bytes=2 + 2 * 4 / 256, package="bitsandbytes", extra="bnb", needs_cuda=True),
    # fp32 moments, Prodigy's running sum s and the starting weights p0
    OptimizerEntry("prodigy", "Prodigy, which finds the step size itself (train.learning_rate is its multiplier, "
                   "1.0 unless set)", _prodigy, state_bytes=16, settings=_prodigy_settings, package="prodigyopt",
                   extra="prodigy", learning_rate=1.0),
)}


CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")  # `module.Class`: an optimizer by its import path
PROBE_SHAPE = (256, 64)  # the parameter `probe_state_bytes` steps once: a matrix, as the trained weights are


def imported_class(path: str) -> type:
    """The `torch.optim.Optimizer` subclass `path` names; ValueError naming what is wrong and the fix."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"'{path}': module {module_name} does not import ({error}); check the spelling, or install "
                         "the package that provides it") from None
    found = getattr(module, class_name, None)
    if found is None:
        raise ValueError(f"'{path}': module {module_name} has no {class_name}; check the spelling (e.g. "
                         "torch.optim.Adafactor)")
    import torch

    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        raise ValueError(f"'{path}' is not a torch.optim.Optimizer subclass; name an optimizer class, or one of "
                         f"{', '.join(OPTIMIZERS)}")
    return found


def check_arguments(cls: type, args: dict[str, Any], lr: float) -> None:
    """Refuse keyword arguments `cls` does not take, those the config sets itself (`params`, `lr`), and values its
    constructor rejects (built once over a small CPU weight; a ValueError or TypeError is an argument's)."""
    own = sorted({"params", "lr"} & set(args))
    if own:
        raise ValueError(f"{', '.join(own)}: set by cogft (the trained weights, train.learning_rate); leave "
                         f"{' and '.join(own)} out")
    try:
        inspect.signature(cls).bind([], lr=lr, **args)
    except TypeError as error:
        raise ValueError(f"{cls.__module__}.{cls.__name__} does not take these arguments ({error}); it takes "
                         f"{inspect.signature(cls)}") from None
    import torch

    try:
        cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr, **args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{cls.__module__}.{cls.__name__} refuses these arguments with train.learning_rate={lr}: "
                         f"{error}") from None


def probe_state_bytes(cls: type, args: dict[str, Any]) -> float | None:
    """Optimizer-state bytes per parameter of `cls`, measured after one step on a small fp32 matrix on the CPU;
    None when it cannot step there (a CUDA-only optimizer). Factored states (Adafactor's row and column
    statistics) shrink per parameter as matrices grow, so for them this is an upper bound."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(PROBE_SHAPE))
    weight.grad = torch.full(PROBE_SHAPE, 1e-3)
    try:
        optimizer = cls([weight], lr=1e-3, **args)
        optimizer.step()
    except Exception as error:  # a third-party optimizer may fail on a CPU in any way
        logger.info("could not measure %s's state on a CPU (%s: %s)", cls.__name__, type(error).__name__, error)
        return None
    tensors = [v for v in optimizer.state[weight].values() if torch.is_tensor(v) and v.numel() > 1]
    return sum(t.numel() * t.element_size() for t in tensors) / weight.numel()


@functools.lru_cache(maxsize=8)
def _measured(path: str, args: str) -> float | None:
    """`probe_state_bytes` once per optimizer and arguments (the memory planner estimates many settings)."""
    return probe_state_bytes(imported_class(path), json.loads(args))


def _imported_entry(path: str, args: dict[str, Any]) -> OptimizerEntry:
    cls = imported_class(path)
    measured = _measured(path, json.dumps(args, sort_keys=True))

    def build(params, settings, train, device, offloaded):
        return cls(params, **settings)

    return OptimizerEntry(
        path, f"{path} (import path)", build, state_bytes=8.0 if measured is None else measured,
        settings=lambda train: {"lr": train.learning_rate, **train.optimizer_args},
        state_measured=measured is not None)


def optimizer_entry(train: TrainKeys) -> OptimizerEntry:
    """The entry of `train.optimizer`: the table's row, or one made for an import path (see `imported_class`)."""
    if train.optimizer in OPTIMIZERS:
        return OPTIMIZERS[train.optimizer]
    return _imported_entry(train.optimizer, dict(train.optimizer_args))


def build_optimizer(train: TrainKeys, params: list, device: torch.device,
                    offloaded: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable weights, a list of them or of param groups (LoRA+'s, each with
    its `lr`); `offloaded`: DeepSpeed keeps it in host memory."""
    entry = optimizer_entry(train)
    return entry.build(params, entry.settings(train), train, device, offloaded)


def reapply_settings(train: TrainKeys, optimizer, lr_scheduler) -> None:
    """After a resume: the checkpoint restored the state (moments, steps, Prodigy's step-size estimate) and the
    param groups as they were saved; write the config's values over those its entry's `settings` names, so a
    safe change (train.learning_rate, the betas, ...) applies. A group's `lr_ratio` (LoRA+'s B matrices) keeps
    its multiple of the rate. The schedule keeps its position with the new base rate."""
    settings = optimizer_entry(train).settings(train)
    lr = settings["lr"]
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)
    ratios = [group.get(LR_RATIO, 1.0) for group in optimizer.param_groups]
    schedule.base_lrs = [lr * ratio for ratio in ratios]
    for group, ratio, factor in zip(optimizer.param_groups, ratios, schedule.lr_lambdas):
        group.update(settings, initial_lr=lr * ratio, lr=lr * ratio * factor(schedule.last_epoch))
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports until a step
