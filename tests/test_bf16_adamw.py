"""train.optimizer=adamw_bf16: bf16 weights updated inside backward with stochastic rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.training.bf16_adamw import BackwardAdamW, stochastic_round_to_bf16
from cogft.training.loop import train

QUIET = ["validation.prompts=[]", "train.checkpoint_every=100", "model.path=tiny://5b"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stochastic_rounding_keeps_updates_far_below_bf16_resolution():
    generator = torch.Generator().manual_seed(0)
    weights = torch.full((200_000,), 1.0)
    update = 1e-6  # bf16's step at 1.0 is 2**-7 = 0.0078: round-to-nearest drops it every time
    assert torch.equal((weights - update).to(torch.bfloat16), weights.to(torch.bfloat16))
    rounded = stochastic_round_to_bf16(weights - update, generator).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 - 2**-8}  # the two neighbours below and at 1.0
    assert abs((1.0 - rounded.mean().item()) - update) < 0.2 * update  # unbiased: the mean moved by the update
    exact = torch.tensor([0.5, -3.0, 1.5])
    assert torch.equal(stochastic_round_to_bf16(exact, generator).float(), exact)  # representable stays put


def test_matches_fp32_adamw_on_a_small_model_and_skips_non_finite_gradients():
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 64)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    settings = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)  # 0.999: v moves 0.1 %/step
    fp32 = torch.optim.AdamW(reference.parameters(), **settings)
    ours = BackwardAdamW(model.parameters(), seed=1, **settings)
    data = torch.randn(32, 64)
    for _ in range(20):
        ours.begin(sync=True)
        model(data.to(torch.bfloat16)).float().square().mean().backward()
        assert model.weight.grad is None  # applied and freed inside backward
        ours.step()
        reference(data).square().mean().backward()
        fp32.step()
        fp32.zero_grad()
    drift = (model.weight.float() - reference.weight).abs().max()
    moved = (reference.weight - torch.nn.Linear(64, 64).weight).abs().max()  # scale of the weights themselves
    assert drift < 0.02 * max(moved.item(), 1.0), drift
    norm, finite = ours.grad_norm_and_finite()
    assert finite and norm > 0

    before = model.weight.detach().clone()
    ours.begin(sync=True)
    (model(data.to(torch.bfloat16)).float().sum() * float("nan")).backward()
    ours.step()
    assert torch.equal(model.weight, before) and not ours.grad_norm_and_finite()[1]


def test_sft_trains_and_resumes_bit_exactly(make_config):
    common = [*QUIET, "train.mode=sft", "train.optimizer=adamw_bf16", "train.learning_rate=1e-3",
              "train.gradient_accumulation_steps=2"]
    straight = train(make_config(*common, "train.max_steps=4", out="straight"))
    train(make_config(*common, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*common, "train.max_steps=4", out="resumed"))
    assert losses(resumed) == losses(straight)
    a = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from cogft.models.build import tiny_dir

    base = load_file(tiny_dir("5b") / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sum(not torch.equal(base[k].to(a[k].dtype), a[k]) for k in a) > len(a) // 2  # the weights trained


def test_refused_for_the_fp16_family(make_config):
    from cogft.training.backends import BackendError

    with pytest.raises(BackendError, match="adamw_bf16 trains bf16 weights.*model.dtype=bf16"):
        train(make_config("validation.prompts=[]", "train.mode=sft", "train.optimizer=adamw_bf16", "train.max_steps=1"))


def test_second_moment_keeps_moving_at_beta2_0999():
    """At beta2 = 0.999, v changes by ~0.3 % a step here, under bf16's resolution: it must not freeze."""
    weight = torch.nn.Parameter(torch.zeros(10_000, dtype=torch.bfloat16))
    optimizer = BackwardAdamW([weight], lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0)
    optimizer.state[weight].update(exp_avg=torch.zeros_like(weight), exp_avg_sq=torch.ones_like(weight))
    for _ in range(200):
        optimizer.begin(sync=True)
        (weight.float() * 2.0).sum().backward()  # gradient 2: v heads from 1 towards 4
        optimizer.step()
    expected = 4 - 3 * 0.999**200  # 1.544 in exact arithmetic; round-to-nearest would stay at 1.0
    assert abs(optimizer.state[weight]["exp_avg_sq"].float().mean().item() - expected) < 0.02
