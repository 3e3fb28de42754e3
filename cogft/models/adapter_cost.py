"""What each `lora.type` adds to a training step, for the cost model (`cost.py`): trained parameters, bytes kept
for the backward, and seconds, from the targeted linear layers' shapes and how peft computes each type.

- `lora`: r·(in+out) weights per targeted layer; its small matmuls and glue are inside the per-element overhead
  `cost.py` calibrated on LoRA runs, so it adds nothing here.
- `dora`: + one magnitude per output row. Each forward (and each recompute of a checkpointed block) builds
  W + scale·B·A and its row norms (one r-deep matmul and `DORA_WEIGHT_BYTES` of memory traffic per weight
  element; peft detaches the norm, so nothing of it is kept), then rescales the layer's base and LoRA outputs, which
  it keeps (half precision) for the magnitude's gradient (`DORA_KEPT_BYTES` per output element), and costs
  `DORA_GLUE_BYTES` of elementwise traffic per output element in the forward and again in the backward.
- `loha` / `lokr`: each forward builds the whole delta weight (a Hadamard product of two low-rank products, a
  Kronecker product of two factors) and runs the input through it: one more linear of the layer's size in the
  forward and two in the backward, `DELTA_WEIGHT_BYTES` of traffic per weight element to build it and take its
  gradient apart, and the delta kept in half precision for the backward.

The constants are calibrated on one H100 (2026-12-06, 5B LoRA r128 at 49x480x720, torch SDPA, per-block compile;
docs/performance.md): DoRA's step was 1.028x LoRA's at half the blocks checkpointed and kept 12.8 GiB more (once
its layers traced without graph breaks, `adapters._trace_dora_without_breaks`; 1.39x before), LoKr's 1.30x at a
quarter checkpointed with 12.5 GiB more. The shapes alone predicted far less LoKr time: peft's LoKr layer runs as
many small operations, which the delta matmul's efficiency stands for.
"""

from __future__ import annotations

from dataclasses import dataclass

DORA_WEIGHT_BYTES = 14.0   # per weight element and forward: read W, write and read W + scale·B·A (fp32), the norm
DORA_KEPT_BYTES = 3.0      # per output element: the base and LoRA outputs the magnitude's gradient needs (measured)
DORA_GLUE_BYTES = 8.0      # per output element and pass: the rescale's elementwise traffic, fused (measured)
DELTA_WEIGHT_BYTES = 12.0  # per weight element: build the delta (fp32, then half), then its gradient's reduction
DELTA_KEPT_BYTES = 2.0     # per output element: the delta linear's output, kept for the backward (measured)
DELTA_MATMUL_EFFICIENCY = 0.45  # the delta weight's matmuls against dense ones (measured)


@dataclass(frozen=True)
class AdapterCost:
    """Beside LoRA's cost, per block: what a block not checkpointed keeps for its backward, and the extra work of
    one forward (each recompute repeats it) and one backward."""

    parameters: int                  # trained weights, all blocks
    kept_bytes: float = 0            # weight-sized tensors kept
    kept_bytes_per_token: float = 0
    forward_flops: float = 0         # independent of the tokens (DoRA's B·A)
    forward_flops_per_token: float = 0
    backward_flops_per_token: float = 0
    forward_bytes: float = 0         # weight-sized memory traffic
    forward_bytes_per_token: float = 0
    backward_bytes_per_token: float = 0


def _lokr_parameters(features_in: int, features_out: int, rank: int) -> int:
    """peft's LoKr layer with its defaults (decompose_factor -1, w1 whole): w1 (l×m), and w2 (k×n) whole unless
    the rank is under half its larger side, then w2_a (k×r) and w2_b (r×n)."""
    from peft.tuners.lokr.layer import factorization

    in_m, in_n = factorization(features_in, -1)
    out_l, out_k = factorization(features_out, -1)
    w2 = out_k * in_n if rank >= max(out_k, in_n) / 2 else rank * (out_k + in_n)
    return out_l * in_m + w2


def adapter_cost(kind: str, rank: int, targeted: list[tuple[int, int]], layers: int) -> AdapterCost:
    """The cost of adapter `kind` of `rank` on the `targeted` linear layers (in, out features) of all `layers`
    blocks; the per-block figures are their share of one block."""
    weights = sum(i * o for i, o in targeted) / layers
    outputs = sum(o for _, o in targeted) / layers
    low_rank = sum(rank * (i + o) for i, o in targeted)
    if kind == "lora":
        return AdapterCost(low_rank)
    if kind == "dora":
        return AdapterCost(low_rank + round(outputs * layers), kept_bytes_per_token=DORA_KEPT_BYTES * outputs,
                           forward_flops=2 * rank * weights, forward_bytes=DORA_WEIGHT_BYTES * weights,
                           forward_bytes_per_token=DORA_GLUE_BYTES * outputs,
                           backward_bytes_per_token=DORA_GLUE_BYTES * outputs)
    parameters = 2 * low_rank if kind == "loha" else sum(_lokr_parameters(i, o, rank) for i, o in targeted)
    return AdapterCost(parameters, kept_bytes=2 * weights, kept_bytes_per_token=DELTA_KEPT_BYTES * outputs,
                       forward_flops_per_token=2 * weights / DELTA_MATMUL_EFFICIENCY,
                       backward_flops_per_token=4 * weights / DELTA_MATMUL_EFFICIENCY,
                       forward_bytes=DELTA_WEIGHT_BYTES * weights)
