"""AdamW for full fine-tuning in bf16 weights, applied during the backward pass (`train.optimizer: adamw_bf16`).

Why: the standard SFT keeps fp32 master weights, fp32 gradients and fp32 AdamW state, 16+ bytes per
parameter, which puts 5B (5.6 B parameters) beyond one 80 GB GPU. Here the weights stay in bf16 and
AdamW's moments are kept in bf16 (6 bytes per parameter in all), and each parameter is updated as
soon as its gradient is complete, then its gradient is freed, so the gradients of the whole model
never exist at once.

A learning-rate-sized update is far below bf16's resolution (8 bits of mantissa) and would round
away; the update is computed in fp32 and rounded stochastically to bf16, so it survives in
expectation (the rounding noise is drawn from a generator seeded by (seed, step), so a resumed run
rounds exactly as an uninterrupted one). A non-finite gradient leaves its parameter and moments
untouched. Gradient clipping is not possible: the global norm is known only after the updates; the
norm is still computed and logged.
"""

from __future__ import annotations

import torch

from ..seeding import mixed_seed


def stochastic_round_to_bf16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 → bf16, rounding up with probability equal to the discarded fraction (unbiased)."""
    bits = values.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise) & -65536  # add below the kept 16 bits, then truncate them
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class BackwardAdamW(torch.optim.Optimizer):
    """AdamW whose step happens inside backward (per-parameter hooks); `step()` only closes the step.

    The trainer calls `begin(sync)` before each backward: on a micro-batch that does not end an
    optimizer step (gradient accumulation) the gradients accumulate as usual; on the last one each
    parameter is updated the moment its accumulated gradient is ready.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, seed: int):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        params = [p for group in self.param_groups for p in group["params"]]  # a list of weights, or param groups
        if any(p.dtype != torch.bfloat16 for p in params):
            raise ValueError("train.optimizer=adamw_bf16 trains bf16 weights; use model.dtype=bf16 (the 5B variant's)")
        self.seed = seed
        self.steps_done = 0
        self._applying = False
        self._generator: torch.Generator | None = None
        self._norm_sq: torch.Tensor | None = None
        self._finite: torch.Tensor | None = None
        self._group_index = {id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    def begin(self, sync: bool) -> None:
        """Before a backward pass; `sync`: this micro-batch ends the optimizer step."""
        self._applying = sync
        if sync:
            device = self.param_groups[0]["params"][0].device
            self._generator = torch.Generator(device=device).manual_seed(mixed_seed(self.seed, self.steps_done))
            self._norm_sq = torch.zeros((), device=device)
            self._finite = torch.ones((), dtype=torch.bool, device=device)

    @torch.no_grad()
    def _update(self, param: torch.Tensor) -> None:
        if not self._applying or param.grad is None:
            return
        group = self.param_groups[self._group_index[id(param)]]
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        step = self.steps_done + 1
        grad = param.grad.float()
        finite = torch.isfinite(grad).all()
        self._norm_sq += torch.where(finite, grad.square().sum(), 0.0)
        self._finite &= finite
        exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
        weights = param.float()
        updated = weights.mul(1 - group["lr"] * group["weight_decay"])
        updated.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))
        param.copy_(torch.where(finite, stochastic_round_to_bf16(updated, self._generator), param))
        # the moments are rounded stochastically too: with beta2 = 0.999 the second moment changes by 0.1 % a
        # step, below bf16's 0.4 % resolution, and would freeze under round-to-nearest
        for name, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            state[name].copy_(torch.where(finite, stochastic_round_to_bf16(value, self._generator), state[name]))
        param.grad = None

    def step(self, closure=None):
        """The updates already happened in backward; count the step."""
        if self._applying:
            self.steps_done += 1
            self._applying = False

    def grad_norm_and_finite(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's global gradient norm (finite gradients only) and whether all were finite, on the device."""
        return self._norm_sq.sqrt(), self._finite

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["steps_done"] = self.steps_done
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.steps_done = int(state_dict.pop("steps_done", 0))
        super().load_state_dict(state_dict)
