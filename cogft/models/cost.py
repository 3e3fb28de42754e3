"""The cost model: peak GPU memory and seconds per step (and per validation video) for a config.

Used by `cogft estimate` and by the trainer's memory budget. A physical model, not a lookup:
parameter counts come from the transformer built on the meta device, FLOPs from `flops.py`, and a
few per-GPU rates and per-activation byte counts measured with `cogft bench` (the calibration table
below; the runs behind it are in docs/performance.md). Other GPUs scale the H100 rates by their dense
tensor-core peak and memory bandwidth: an extrapolation, labelled as such.

Swapped blocks (`train.blocks_to_swap`): their frozen weights leave the GPU but for the two blocks resident at a
time, and each is copied host-to-device twice a step (the forward, the backward's recompute) at the card's
achieved PCIe rate (`Gpu.pcie_gbs`), on a side stream while the previous block computes: only the part of a
copy longer than that block's compute (its forward; its recompute and backward) adds to the step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..optimizers import OPTIMIZERS, OptimizerEntry, optimizer_entry
from .adapter_cost import AdapterCost, adapter_cost
from .attention import fa4_installed
from .blocks import checkpointed_block_count, swapped_block_count
from .family import Variant
from .flops import step_flops
from .fp8 import is_fp8_parameter_name
from .inference_cache import taylorseer_full_steps

GIB = 2**30
AUTO_BUDGET_SHARE = 0.9  # of the card's memory for `train.memory_budget_gib: auto`: above the estimate's worst miss
ALLOCATOR_RESERVE_GIB = 0.75  # and at least this much left over on a small card: the caching allocator's fragments.
# Measured under `cogft bench --gpu-memory` (2026-12-06): at 4, 6 and 12 GiB (2B, 5B, 1.5-5B) the plans that today's
# estimate puts within 0.06 GiB of the cap or over it ran out of memory; runs that left 0.71-0.78 GiB trained.


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    tflops: float        # dense fp16/bf16 tensor-core peak
    bandwidth_tbs: float
    fa4: bool            # FlashAttention-4 has kernels for it (Hopper, Blackwell)
    pcie_gbs: float = 25.0  # achieved pinned host-to-device GB/s: PCIe 4.0 x16 (the H100's is 5.0, measured)


# Consumer and workstation cards by their published dense fp16/bf16 tensor peak (fp32 accumulate) and bandwidth.
GPUS = {
    "H100": Gpu("H100 80GB", 79.1, 989.0, 3.35, True, 41.0),
    "H200": Gpu("H200 141GB", 139.8, 989.0, 4.8, True, 41.0),
    "A100": Gpu("A100 80GB", 79.1, 312.0, 2.0, False),
    "L40S": Gpu("L40S 48GB", 44.4, 362.0, 0.86, False),
    "A6000": Gpu("RTX A6000 48GB", 47.5, 155.0, 0.77, False),
    "4090": Gpu("RTX 4090 24GB", 23.6, 165.0, 1.0, False),
    "4080": Gpu("RTX 4080 16GB", 15.6, 97.0, 0.72, False),
    "3090": Gpu("RTX 3090 24GB", 23.6, 71.0, 0.94, False),
    "4070": Gpu("RTX 4070 12GB", 11.7, 58.0, 0.5, False),
    "4060TI": Gpu("RTX 4060 Ti 16GB", 15.7, 44.0, 0.29, False, 12.5),  # PCIe 4.0 x8
    "L4": Gpu("L4 24GB", 22.0, 121.0, 0.3, False),
    "A10": Gpu("A10 24GB", 22.0, 125.0, 0.6, False),
}

# Measured on one H100 with `cogft bench` (2026-11-25): achieved rates of the pieces of a step.
# Attention at 17,776 tokens, head dim 64, (forward, backward) TFLOP/s, the backward doing 2.5x the forward's FLOPs:
ATTENTION_TFLOPS = {
    "sdpa": (396.0, 414.0),  # cuDNN through torch's SDPA, H100
    "fa4": (540.0, 520.0),   # FlashAttention-4's Hopper kernels through cogft's op, H200 (2026-11-29: 2B/5B forward
                             # 537/547, backward 507/536; same tensor cores and clocks as the H100)
}
H100_MATMUL_TFLOPS = 620.0            # projections and feed-forward, fp16/bf16
COMPILED_OVERHEAD_S_PER_ELEMENT = 7.8e-11   # norms, activations, LoRA glue per block per token·width
EAGER_OVERHEAD_S_PER_ELEMENT = 2.85e-10     # the same without torch.compile
OFFLOAD_GBS = 41.0                    # host<->device copies of offloaded block inputs, pinned memory
FP8_WORTH = 0.05                      # `model.fp8_base: auto` takes float8 for a step this much faster, or to fit
SWAP_BLOCK_S = 5e-4                   # a swapped block's copy launches and stream wait, per pass (an estimate: ~40
                                      # copies of ~10 us each; not yet measured)
ACTIVATION_BYTES_COMPILED = 29.5      # bytes kept per token·width element of a block for its backward
ACTIVATION_BYTES_EAGER = 41.5
RECOMPUTE_BACKWARD_BYTES = 12.0       # and beside a recomputed block's activations, its backward's own per element (the
                                      # gradients of q, k, v and of the feed-forward's hidden layer): fitted to the
                                      # lean and swapped 2B, 5B and 1.5-5B rows of 2026-12-06 (under by 6-17 % without)
WORKSPACE_GIB = 0.6                   # attention workspace, loss tensors, allocator slack
# A validation / `cogft sample` video, measured on the same H100 (2B, 50 steps with CFG, 0.567 s a step):
INFERENCE_OVERHEAD_S_PER_ELEMENT = 2.3e-11  # norms and glue of a compiled block's forward per token·width
SKIPPED_STEP_S = 0.007                # a step taylorseer predicts: embeddings, output layers, scheduler
DECODE_S_PER_PIXEL = 1.9 / (49 * 480 * 720)  # VAE decode (spread group norms) and conversion, per output pixel


@dataclass
class Estimate:
    gpu: str
    attention: str                        # the kernel the estimate assumes: "fa4" or "sdpa"
    peak_allocated_gib: float
    seconds_per_step: float
    fits: bool
    parts_gib: dict
    advice: list[str]
    extrapolated: bool
    sample_seconds: float                 # one validation video, exact
    sample_seconds_cached: float | None   # with `validation.cache: taylorseer`; None for other settings
    batch: tuple[int, int]                # (frames, samples) of the batch whose memory is the peak
    prior_seconds_per_step: float | None = None  # a `kind: prior` batch's step: one more forward (LoRA; else None)


def _adapter(variant: Variant, config: Config) -> AdapterCost:
    """What `lora.type` trains and adds to a step (`adapter_cost.py`), from the model built on the meta device."""
    _, linears = variant.transformer_layout
    targets = tuple(config.lora.target_modules)
    targeted = [shape for name, shape in linears.items() if name.endswith(targets)]
    return adapter_cost(config.lora.type, config.lora.rank, targeted, variant.configs.transformer["num_layers"])


def _counts(variant: Variant, config: Config) -> tuple[int, int]:
    """(all transformer parameters, trained parameters of a LoRA run: the adapter's, and the modules trained whole
    beside it, as a control model's widened input) from the model built on the meta device."""
    return variant.transformer_layout[0], _adapter(variant, config).parameters + variant.trained_with_adapter_parameters


def fp8_base_parameters(variant: Variant) -> int:
    """Weights `model.fp8_base` stores in float8: the linear layers outside the patch embedding (`fp8.py`)."""
    return sum(features_in * features_out for name, (features_in, features_out) in variant.transformer_layout[1].items()
               if is_fp8_parameter_name(name))


def block_weight_bytes(config: Config, variant: Variant) -> int:
    """The frozen weights of one transformer block (its linear layers, float8 ones at a byte): what a swap moves."""
    itemsize, fp8 = variant.dtype.itemsize, config.model.fp8_base is True
    return sum(features_in * features_out * (1 if fp8 and is_fp8_parameter_name(name) else itemsize)
               + features_out * itemsize
               for name, (features_in, features_out) in variant.transformer_layout[1].items()
               if name.startswith("transformer_blocks.0."))


@dataclass(frozen=True)
class Plan:
    """What the trainer runs under a memory budget: the block settings and their estimate (None: nothing fits)."""

    gradient_checkpointing: bool | float
    offload_checkpoints: bool
    blocks_to_swap: int
    estimate: Estimate | None
    fp8_base: bool | None = None  # chosen for `model.fp8_base: auto`; None: as configured

    def applied(self, config: Config) -> Config:
        model = config.model if self.fp8_base is None else config.model.model_copy(update={"fp8_base": self.fp8_base})
        return config.model_copy(update={"model": model, "train": config.train.model_copy(update={
            "gradient_checkpointing": self.gradient_checkpointing, "offload_checkpoints": self.offload_checkpoints,
            "blocks_to_swap": self.blocks_to_swap})})

    def describe(self) -> str:
        """The settings as a person types them."""
        text = (f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}"
                + (" train.offload_checkpoints=true" if self.offload_checkpoints else ""))
        text += f" train.blocks_to_swap={self.blocks_to_swap}" if self.blocks_to_swap else ""
        return text + (f" model.fp8_base={str(self.fp8_base).lower()}" if self.fp8_base is not None else "")


def fit_to_budget(config: Config, variant: Variant, budget_gib: float, gpu_name: str = "H100",
                  swap: bool = True, host_gib: float | None = None) -> Plan | None:
    """The fastest checkpointing/offloading/block swapping whose estimated peak fits `budget_gib`.

    For each checkpointed count (a fraction a person can read) and offloading, the fewest swapped blocks that fit
    (swapping only adds time; a swapped block is a checkpointed one): swapping is weighed against checkpointing
    more blocks or offloading their inputs. `swap=False` (full fine-tuning, or `train.blocks_to_swap` held at 0)
    leaves it out. `host_gib`: plans whose training host peak (`host_estimate`) is above it do not fit either.
    With `model.fp8_base: auto` float8 storage is weighed too: taken where it fits what the model's dtype cannot,
    or is more than `FP8_WORTH` faster (it moves the prediction by ~3 %, at no measured cost in time).
    None when even every block checkpointed, offloaded and swapped does not fit.
    """
    swap = swap and config.train.mode == "lora"
    if config.model.fp8_base != "auto" or config.train.mode != "lora":
        fits = _fits(config, variant, budget_gib, gpu_name, swap, host_gib, None)
        return min(fits, key=lambda fit: fit[:5])[-1] if fits else None
    plain = _fits(config, variant, budget_gib, gpu_name, swap, host_gib, False)
    fp8 = _fits(config, variant, budget_gib, gpu_name, swap, host_gib, True)
    best = [min(fits, key=lambda fit: fit[:5]) for fits in (plain, fp8) if fits]
    if not best:
        return None
    if len(best) == 2 and best[1][0] >= (1 - FP8_WORTH) * best[0][0]:
        return best[0][-1]
    return best[-1][-1]


def _fits(config: Config, variant: Variant, budget_gib: float, gpu_name: str, swap: bool, host_gib: float | None,
          fp8: bool | None) -> list[tuple]:
    """(seconds, float8, checkpointed blocks, offload, swapped, Plan) of each checkpointing that fits."""
    layers = variant.configs.transformer["num_layers"]
    fits, seen = [], set()
    for wanted in range(0, layers + 1):
        fraction = math.ceil(wanted / layers * 100) / 100  # a setting a person can read and type
        blocks = checkpointed_block_count(fraction, layers)
        if blocks in seen:
            continue
        seen.add(blocks)
        setting = False if blocks == 0 else (True if blocks == layers else fraction)
        for offload in ((False,) if blocks == 0 else (False, True)):
            for swapped in _swap_counts(config, variant, Plan(setting, offload, 0, None, fp8), budget_gib, gpu_name,
                                        blocks if swap else 0):
                plan = Plan(setting, offload, swapped, None, fp8)
                result = estimate(plan.applied(config), variant, gpu_name, advise=False)
                if host_gib is not None and host_estimate(plan.applied(config), variant).training_gib > host_gib:
                    break  # more swapping only needs more host memory
                if result.peak_allocated_gib <= budget_gib:
                    fits.append((result.seconds_per_step, bool(fp8), blocks, offload, swapped,
                                 dataclasses.replace(plan, estimate=result)))
                    break
    return fits


def _swap_counts(config: Config, variant: Variant, plan: Plan, budget_gib: float, gpu_name: str,
                 most: int) -> list[int]:
    """Swap counts worth trying for `plan`: none, then the fewest whose saving covers the excess (a swapped block
    saves its weights beyond the two resident ones) and the next, within `most`."""
    if most == 0:
        return [0]
    planned = plan.applied(config)
    excess = estimate(planned, variant, gpu_name, advise=False).peak_allocated_gib - budget_gib
    if excess <= 0:
        return [0]
    fewest = 2 + math.ceil(excess * GIB / block_weight_bytes(planned, variant))
    return [count for count in (fewest - 1, fewest, fewest + 1) if 2 < count <= most]


def plan_for_budget(config: Config, variant: Variant, budget_gib: float, gpu_name: str = "H100",
                    host_gib: float | None = None) -> Plan:
    """What the trainer runs under a memory budget: the fastest plan that fits (the host's memory too), else the
    leanest (every block checkpointed with its inputs offloaded, and swapped where LoRA allows; its estimate None)."""
    fit = fit_to_budget(config, variant, budget_gib, gpu_name, host_gib=host_gib)
    if fit is not None:
        return fit
    layers, lora = variant.configs.transformer["num_layers"], config.train.mode == "lora"
    return Plan(True, True, layers if lora else 0, None, True if lora and config.model.fp8_base == "auto" else None)


def as_trained(config: Config, variant: Variant, gpu_name: str = "H100", host_gib: float | None = None) -> Config:
    """The config with the block settings the trainer would pick on `gpu_name` under `train.memory_budget_gib`
    (`auto`: 90 % of that GPU's memory) or for `train.blocks_to_swap: auto`; unchanged otherwise."""
    budget = config.train.memory_budget_gib
    if config.model.fp8_base == "auto" and budget is None:  # float8 only where a memory plan chooses it
        config = config.model_copy(update={"model": config.model.model_copy(update={"fp8_base": False})})
    if budget is None and config.train.blocks_to_swap != "auto":
        return config
    if budget is None or budget == "auto":
        budget = auto_budget_gib(_gpu(gpu_name).memory_gib)
    if config.train.memory_budget_gib is None:  # blocks_to_swap: auto alone: only the swap count is planned
        return swap_for_budget(config, variant, budget, gpu_name).applied(config)
    return plan_for_budget(config, variant, budget, gpu_name, host_gib).applied(config)


def auto_budget_gib(memory_gib: float) -> float:
    """What `train.memory_budget_gib: auto` plans for on a card of `memory_gib`: 90 % of it, and at most all but
    ALLOCATOR_RESERVE_GIB (on a 4-6 GiB card a tenth is less than what the allocator's fragments take)."""
    return min(AUTO_BUDGET_SHARE * memory_gib, memory_gib - ALLOCATOR_RESERVE_GIB)


def swap_for_budget(config: Config, variant: Variant, budget_gib: float, gpu_name: str = "H100") -> Plan:
    """`train.blocks_to_swap: auto` with the checkpointing as configured: the fewest swapped blocks that fit (every
    block when none does)."""
    train, layers = config.train, variant.configs.transformer["num_layers"]
    for swapped in range(layers + 1):
        plan = Plan(train.gradient_checkpointing, train.offload_checkpoints, swapped, None)
        result = estimate(plan.applied(config), variant, gpu_name, advise=False)
        if result.peak_allocated_gib <= budget_gib:
            return dataclasses.replace(plan, estimate=result)
    return Plan(train.gradient_checkpointing, train.offload_checkpoints, layers, None)


def _gpu(gpu_name: str) -> Gpu:
    """A GPU of the table by (part of) its name; `NAME@GIB` is that card with GIB of usable memory."""
    name, _, memory = gpu_name.partition("@")
    key = next((k for k in GPUS if k.lower() in name.lower().replace(" ", "")), None)
    if key is None:
        raise ConfigError(f"--gpu {name!r}: unknown GPU; choose one of {', '.join(GPUS)}")
    if not memory:
        return GPUS[key]
    return dataclasses.replace(GPUS[key], name=f"{GPUS[key].name} with {float(memory):g} GiB usable",
                               memory_gib=float(memory))


def _advice(config: Config, variant: Variant, gpu_name: str, memory_gib: float) -> list[str]:
    """The fastest setting that fits, else what else to change."""
    fit = fit_to_budget(config, variant, memory_gib, gpu_name)
    if fit is not None:
        return [f"{fit.describe()} (estimated {fit.estimate.peak_allocated_gib} GiB, "
                f"{fit.estimate.seconds_per_step} s/step)"]
    if config.train.mode == "sft":
        optimizer = optimizer_entry(config.train)
        leanest = min(OPTIMIZERS.values(), key=_full_bytes)
        kept = f"full fine-tuning keeps {_full_bytes(optimizer):.0f} bytes per parameter here"
        if _full_bytes(leanest) >= _full_bytes(optimizer):
            return [f"{kept}: use train.mode=lora, or a GPU with more memory"]
        lean = f"train.optimizer={leanest.name} ({_full_bytes(leanest):.0f} bytes" + (
            ", bf16 models)" if leanest.bf16_weights else ")")
        offload = "deepspeed_zero2_offload.yaml, " if optimizer.runs_offloaded else ""
        return [f"{kept}: try {lean}, {offload}train.mode=lora, or a GPU with more memory"]
    return ["nothing fits this GPU at this size: lower data.num_frames / data.height / data.width "
            "(or the largest of data.buckets)"]


def _full_bytes(optimizer: OptimizerEntry) -> float:
    """Bytes per parameter of full fine-tuning: the optimizer's, and autocast's half copy beside an fp32 master."""
    return optimizer.bytes_per_parameter + (0 if optimizer.bf16_weights else 2)


def attention_kernel(config: Config, gpu: Gpu) -> str:
    """What `model.attention` will run on `gpu`: `auto` counts on fa4 when this environment has the package."""
    wanted = config.model.attention == "fa4" or (config.model.attention == "auto" and fa4_installed())
    return "fa4" if gpu.fa4 and wanted else "sdpa"


def batch_shapes(config: Config) -> list[tuple[int, int]]:
    """(frames, samples) of each batch a run can train: the clips', and with `data.image_batch_size` the stills'
    (one frame each, yet at 480x720 twelve of them are more tokens than one 49-frame clip)."""
    return [(config.data.num_frames, config.train.batch_size)] + (
        [(1, config.data.image_batch_size)] if config.data.image_batch_size else [])


def estimate(config: Config, variant: Variant, gpu_name: str = "H100", advise: bool = True) -> Estimate:
    """The peak of the batch shape with the most memory (the most tokens) at the largest size, and the time of the
    slowest shape's step."""
    results = [_estimate(config, variant, gpu_name, advise, batch) for batch in batch_shapes(config)]
    peak = max(results, key=lambda result: result.peak_allocated_gib)
    advice = peak.advice
    if advise and not peak.fits and peak.batch[0] == 1:
        advice = [f"lower data.image_batch_size ({peak.batch[1]} still images are the largest batch)", *advice]
    slowest = max(results, key=lambda result: result.seconds_per_step)
    return dataclasses.replace(peak, seconds_per_step=slowest.seconds_per_step, advice=advice,
                               prior_seconds_per_step=slowest.prior_seconds_per_step)


def cache_bytes_per_window(config: Config, variant: Variant) -> int:
    """Bytes of one window's cache entry at the largest size, as prepare writes it on a GPU (the variant's dtype):
    the family's cached tensors (`synthetic_batch`, shaped as `encode_sample`'s: the latents and the conditions'
    own, an image's draws or a control video's latents), without the prompt's embedding (one per caption). Built
    from random tensors of that size: measured once per `cogft estimate`, never inside the planner's search."""
    import torch

    batch = variant.synthetic_batch(config, 1, config.data.num_frames, *config.data.largest_size,
                                    torch.Generator().manual_seed(0))
    return sum(t.numel() * t.element_size() for key, t in batch.items() if key != "prompt_embeds")


def _estimate(config: Config, variant: Variant, gpu_name: str, advise: bool, batch: tuple[int, int]) -> Estimate:
    gpu = _gpu(gpu_name)
    attention = attention_kernel(config, gpu)
    scale = gpu.tflops / GPUS["H100"].tflops
    attention_fwd, attention_bwd = (tflops * 1e12 * scale for tflops in ATTENTION_TFLOPS[attention])
    tcfg = variant.configs.transformer
    total, lora = _counts(variant, config)
    train = config.train
    # the largest bucket decides the memory (and the slowest step)
    frames, samples = batch
    flops = step_flops(variant, frames, *config.data.largest_size, samples)
    layers = tcfg["num_layers"]
    width = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    elements = flops.tokens * width * samples                   # one block's token x width
    swapped = 0 if train.blocks_to_swap == "auto" else swapped_block_count(train.blocks_to_swap, layers)
    checkpointed = max(swapped, checkpointed_block_count(train.gradient_checkpointing, layers))  # swapped: checkpointed
    compiled = train.compile is True or train.compile == "auto"
    half = 2  # bytes of an fp16/bf16 element

    optimizer = optimizer_entry(train)
    if train.mode == "lora":
        fp8 = fp8_base_parameters(variant) if config.model.fp8_base is True else 0  # a byte each instead of two
        weights, trainable = total * variant.dtype.itemsize - fp8 * (variant.dtype.itemsize - 1), lora
        state = trainable * optimizer.bytes_per_parameter         # trained weight, its gradient, optimizer state
    elif optimizer.bf16_weights:
        weights, trainable = total * half, total                  # the model's own weights are the trained ones
        state = total * (_full_bytes(optimizer) - half)
    else:
        weights, trainable = 0, total
        state = total * _full_bytes(optimizer)
    adapter = _adapter(variant, config) if train.mode == "lora" else AdapterCost(0)
    tokens = flops.tokens * samples
    per_block = (elements * (ACTIVATION_BYTES_COMPILED if compiled else ACTIVATION_BYTES_EAGER)
                 + adapter.kept_bytes + tokens * adapter.kept_bytes_per_token)
    kept = (layers - checkpointed) * per_block
    saved_inputs = 0 if train.offload_checkpoints else checkpointed * elements * half
    # the checkpointed blocks are the first ones: their recompute comes after the backward of the later, kept blocks
    # has freed those blocks' activations, so the step's peak is the larger of the two, not their sum
    recompute = max(0, per_block + elements * RECOMPUTE_BACKWARD_BYTES - kept) if checkpointed else 0
    block_bytes = block_weight_bytes(config, variant) if train.mode == "lora" else 0
    weights -= (swapped - min(2, swapped)) * block_bytes  # in host memory, but for the two blocks on the GPU
    parts = {"weights": weights, "trainable_state": state, "activations": kept, "checkpoint_inputs": saved_inputs,
             "recompute_beyond_kept": recompute, "workspace": WORKSPACE_GIB * GIB}
    peak = sum(parts.values()) / GIB

    per_block_attention = flops.attention / layers
    per_block_linear = flops.linear / layers
    linear_passes = 2 if train.mode == "lora" else 3
    seconds = (flops.attention / attention_fwd + 2.5 * flops.attention / attention_bwd
               + linear_passes * flops.linear / (H100_MATMUL_TFLOPS * 1e12 * scale))
    seconds += checkpointed * (per_block_attention / attention_fwd
                               + per_block_linear / (H100_MATMUL_TFLOPS * 1e12 * scale))
    passes = layers * (1 + checkpointed / layers)
    seconds += passes * elements * (COMPILED_OVERHEAD_S_PER_ELEMENT if compiled else EAGER_OVERHEAD_S_PER_ELEMENT)
    if train.offload_checkpoints:
        seconds += 2 * checkpointed * elements * half / (OFFLOAD_GBS * 1e9 * gpu.bandwidth_tbs / 3.35)
    seconds += 28 * trainable / (gpu.bandwidth_tbs * 1e12)      # fused AdamW reads and writes its state
    matmul, bandwidth = H100_MATMUL_TFLOPS * 1e12 * scale, gpu.bandwidth_tbs * 1e12
    seconds += passes * ((adapter.forward_flops + tokens * adapter.forward_flops_per_token) / matmul
                         + (adapter.forward_bytes + tokens * adapter.forward_bytes_per_token) / bandwidth)
    seconds += layers * (tokens * adapter.backward_flops_per_token / matmul
                         + tokens * adapter.backward_bytes_per_token / bandwidth)
    if swapped:  # each copy overlaps the previous block's compute; only what is longer shows
        copy = block_bytes / (gpu.pcie_gbs * 1e9)
        forward = (per_block_attention / attention_fwd + per_block_linear / (H100_MATMUL_TFLOPS * 1e12 * scale)
                   + elements * (COMPILED_OVERHEAD_S_PER_ELEMENT if compiled else EAGER_OVERHEAD_S_PER_ELEMENT))
        backward = forward + 2.5 * per_block_attention / attention_bwd + per_block_linear / (
            H100_MATMUL_TFLOPS * 1e12 * scale)
        seconds += swapped * (2 * SWAP_BLOCK_S + max(0.0, copy - forward) + max(0.0, copy - backward))

    # a prior batch's target: one more forward, adapter off and without gradient (no activations kept)
    prior = seconds + (flops.attention / attention_fwd + flops.linear / (H100_MATMUL_TFLOPS * 1e12 * scale)
                       + layers * elements * (COMPILED_OVERHEAD_S_PER_ELEMENT if compiled else
                                              EAGER_OVERHEAD_S_PER_ELEMENT)) if train.mode == "lora" else None

    advice = []
    fits = peak <= gpu.memory_gib
    if not fits and advise:
        advice = _advice(config, variant, gpu_name, gpu.memory_gib)
    steps = config.validation.num_inference_steps
    sample = functools.partial(_sample_seconds, config, variant, gpu, attention_fwd)
    cached = sample(taylorseer_full_steps(steps)) if config.validation.cache == "taylorseer" else None
    extrapolated = not gpu.name.startswith(GPUS["H100"].name)
    return Estimate(gpu.name, attention, round(peak, 2), round(seconds, 3), fits,
                    {k: round(v / GIB, 2) for k, v in parts.items()}, advice, extrapolated,
                    round(sample(steps), 1), None if cached is None else round(cached, 1), (frames, samples),
                    None if prior is None else round(prior, 3))


def _sample_seconds(config: Config, variant: Variant, gpu: Gpu, attention_fwd: float, full_steps: int) -> float:
    """One validation video: `full_steps` compiled transformer forwards (both CFG halves in one batch), the
    other steps predicted by the cache, then the VAE decode."""
    tcfg, data, validation = variant.configs.transformer, config.data, config.validation
    batch = 2 if validation.guidance_scale > 1 else 1
    height, width = data.largest_size  # what validation renders at unless validation.sizes says otherwise
    flops = step_flops(variant, data.num_frames, height, width, batch)
    scale = gpu.tflops / GPUS["H100"].tflops
    elements = flops.tokens * tcfg["num_attention_heads"] * tcfg["attention_head_dim"] * batch * tcfg["num_layers"]
    forward = (flops.attention / attention_fwd
               + flops.linear / (H100_MATMUL_TFLOPS * 1e12 * scale)
               + elements * INFERENCE_OVERHEAD_S_PER_ELEMENT / scale)
    skipped = validation.num_inference_steps - full_steps
    decode = DECODE_S_PER_PIXEL * data.num_frames * height * width / scale
    return full_steps * forward + skipped * SKIPPED_STEP_S + decode


# Host memory (RAM), in bytes unless named otherwise. The process share is measured; a worker's is a rough guess.
HOST_PROCESS_GIB = 2.0        # python, torch, CUDA context and libraries of the training or prepare process: measured
                              # 1.1 GiB beside a 5B prepare's encoders, 1.5-1.7 beside 5B training (H100, 2026-12-07)
HOST_TRAINING_PROCESS_GIB = 3.2  # the same once steps run (compiled blocks, kernels): measured beside the pinned
                                 # buffers 1.9 GiB (1.5-5B), 3.1 (2B, not understood further) (H100, 2026-12-07)
OFFLOAD_BUFFERS_IN_FLIGHT = 5  # pinned input buffers torch's host allocator held beyond one per offloaded block:
                               # 34 for 29 blocks (2B), 46 for 41 (1.5-5B) (`torch.cuda.host_memory_stats`, H100)
HOST_WORKER_GIB = 0.5         # one DataLoader worker process reading the latent cache
T5_XXL_ENCODER_PARAMETERS = 4.76e9  # the published CogVideoX text encoder, when no text_encoder config is built in
VAE_PARAMETERS = 0.22e9


@dataclass(frozen=True)
class HostEstimate:
    """Peak host memory of prepare and of training (GiB), and what makes up training's."""

    prepare_gib: float
    training_gib: float
    parts_gib: dict


def _text_encoder_parameters(variant: Variant) -> float:
    """T5 encoder parameters from its config (embedding, attention and gated feed-forward per layer), else T5-XXL's."""
    t5 = variant.configs.text_encoder
    if not t5:
        return T5_XXL_ENCODER_PARAMETERS
    width, inner = t5["d_model"], t5["num_heads"] * t5["d_kv"]
    return t5["vocab_size"] * width + t5["num_layers"] * (4 * width * inner + 3 * width * t5["d_ff"])


def host_estimate(config: Config, variant: Variant) -> HostEstimate:
    """Host memory of the config as it will run (block settings already planned, e.g. by `as_trained`).

    prepare: the text encoder loaded on the host before it goes to the GPU, beside the VAE. Training: the
    transformer is read whole into host memory first (its loaded dtype), then the GPU takes all but the swapped
    blocks' frozen weights, which stay as pinned host copies; offloaded checkpoints keep each checkpointed block's
    input (tokens x width, 2 bytes) on the host until the backward, in buffers torch's pinned allocator rounds up
    to a power of two and holds a few more of than blocks; each DataLoader worker is a process of its own. The
    process itself grows once steps run, so the two phases count their own share.
    """
    total, _ = variant.transformer_layout
    layers = variant.configs.transformer["num_layers"]
    tcfg, train = variant.configs.transformer, config.train
    width, itemsize = tcfg["num_attention_heads"] * tcfg["attention_head_dim"], variant.dtype.itemsize
    prepare = HOST_PROCESS_GIB * GIB + (_text_encoder_parameters(variant) + VAE_PARAMETERS) * itemsize
    swapped = 0 if train.blocks_to_swap == "auto" else swapped_block_count(train.blocks_to_swap, layers)
    checkpointed = max(swapped, checkpointed_block_count(train.gradient_checkpointing, layers))
    elements = width * max(step_flops(variant, frames, *config.data.largest_size, samples).tokens * samples
                           for frames, samples in batch_shapes(config))  # the largest batch's, as on the GPU
    buffers = checkpointed + OFFLOAD_BUFFERS_IN_FLIGHT if train.offload_checkpoints and checkpointed else 0
    parts = {
        "process": HOST_PROCESS_GIB * GIB,
        "process_training": HOST_TRAINING_PROCESS_GIB * GIB,
        "data_workers": config.data.dataloader_workers * HOST_WORKER_GIB * GIB,
        "model_load": total * itemsize,  # read whole before the swapped blocks' weights are split off
        "swapped_weights": swapped * block_weight_bytes(config, variant) if train.mode == "lora" else 0,
        "offloaded_checkpoints": buffers * 2 ** math.ceil(math.log2(elements * 2)),
    }
    training = parts["data_workers"] + max(_loading(parts), _steady(parts))
    return HostEstimate(round(prepare / GIB, 2), round(training / GIB, 2),
                        {key: round(value / GIB, 2) for key, value in parts.items()})


def _loading(parts: dict) -> float:
    """The host peak while the model is read whole, before its blocks leave for the GPU or the swap buffers."""
    return parts["process"] + parts["model_load"]


def _steady(parts: dict) -> float:
    """The host peak while training steps run: swapped weights and offloaded inputs beside the grown process."""
    return parts["process_training"] + parts["swapped_weights"] + parts["offloaded_checkpoints"]


def host_advice(config: Config, variant: Variant, host: HostEstimate, available_gib: float) -> list[str]:
    """Settings that bring training's host peak under `available_gib`, largest saving first."""
    parts, over = host.parts_gib, host.training_gib - available_gib
    advice = []
    if parts["data_workers"] and over > 0:
        advice.append("data.dataloader_workers=0")
    if parts["offloaded_checkpoints"]:
        advice.append("train.offload_checkpoints=false (the inputs stay on the GPU: plan it with "
                      "train.memory_budget_gib)")
    if parts["swapped_weights"]:
        block = block_weight_bytes(config, variant) / GIB
        room = available_gib - parts["data_workers"] - parts["process_training"] - parts["offloaded_checkpoints"]
        fewer = max(0, int(room // block)) if block else 0
        advice.append(f"train.blocks_to_swap={fewer} (each swapped block keeps {block:.2f} GiB in host memory)")
    if _loading(parts) > available_gib:
        advice.append(f"a machine with more RAM: the {variant.name} transformer alone is read as "
                      f"{parts['model_load']:.1f} GiB before it goes to the GPU")
    return advice
