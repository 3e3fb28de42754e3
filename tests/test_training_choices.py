"""Training choices beside AdamW: Prodigy, 8-bit AdamW's refusals, float8 base weights, a weight average (EMA)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cogft.config import ConfigError
from cogft.config_file import build_config
from cogft.optimizers import OPTIMIZERS, Launch
from cogft.training.loop import train

FAST = ["validation.prompts=[]", "train.checkpoint_every=100"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def lora(run: Path, folder: str = "lora") -> dict[str, torch.Tensor]:
    return load_file(run / folder / "pytorch_lora_weights.safetensors")


def straight_and_resumed(make_config, *overrides: str) -> tuple[Path, Path]:
    """5 steps in one go, and 2 steps, stop, resume to 5 (an epoch boundary and a mid-epoch skip included)."""
    straight = train(make_config(*overrides, *FAST, "train.max_steps=5", out="straight"))
    train(make_config(*overrides, *FAST, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*overrides, *FAST, "train.max_steps=5", out="resumed"))
    return straight, resumed


def test_prodigy_resumes_bit_exactly_with_its_own_learning_rate(make_config):
    pytest.importorskip("prodigyopt")
    straight, resumed = straight_and_resumed(make_config, "train.optimizer=prodigy", "train.learning_rate=1.0")
    assert yaml.safe_load((straight / "config.yaml").read_text())["train"]["optimizer"] == "prodigy"
    assert len(losses(straight)) == 5 and losses(straight) == losses(resumed)
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    minimal = {"model": {"path": "tiny://2b"}, "data": {"path": "data"}, "output_dir": "run"}
    assert build_config({**minimal, "train": {"optimizer": "prodigy"}}).train.learning_rate == 1.0  # its default
    assert build_config({**minimal, "train": {"optimizer": "prodigy", "learning_rate": 0.5}}).train.learning_rate == 0.5
    assert build_config(minimal).train.learning_rate == 1e-4


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="adamw8bit runs on CUDA GPUs, with bitsandbytes")
def test_adamw8bit_resumes_bit_exactly_on_a_gpu(make_config, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic kernels, so that two runs can agree
    torch.use_deterministic_algorithms(True)
    try:
        straight, resumed = straight_and_resumed(make_config, "train.optimizer=adamw8bit", "train.compile=false",
                                                "lora.rank=128", "lora.alpha=128")  # 4096-weight matrices: 8-bit state
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(losses(straight)) == 5 and losses(straight) == losses(resumed)
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(next(resumed.glob("checkpoints/*/optimizer.bin")), weights_only=False)["state"]

    def tensors(tree):
        return [leaf for value in tree.values() for leaf in (tensors(value) if isinstance(value, dict) else [value])
                if isinstance(leaf, torch.Tensor)]

    assert any(value.dtype == torch.uint8 for value in tensors(state))  # the moments really are 8-bit


def test_ema_resumes_bit_exactly_and_exports_the_average_beside_the_raw_weights(make_config):
    straight, resumed = straight_and_resumed(make_config, "train.ema_decay=0.5")
    assert losses(straight) == losses(resumed)
    averaged, raw = lora(straight), lora(straight, "raw/lora")
    assert all(torch.equal(averaged[k], lora(resumed)[k]) for k in averaged)  # the average survived the resume
    assert all(torch.equal(raw[k], lora(resumed, "raw/lora")[k]) for k in raw)
    assert averaged.keys() == raw.keys() and any(not torch.equal(averaged[k], raw[k]) for k in raw)
    plain = lora(train(make_config(*FAST, "train.max_steps=5", out="plain")))
    assert all(torch.equal(plain[k], raw[k]) for k in raw)  # averaging never touches the training itself


def test_ema_update_follows_the_formula_and_skips_non_finite_steps():
    from cogft.training.ema import WeightAverage

    weight = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([weight], decay=0.9, on_host=False)
    with torch.no_grad():
        weight.fill_(1.0)
    average.update(torch.tensor(True))
    torch.testing.assert_close(average.shadows[0], torch.full((3,), 0.1))
    average.update(torch.tensor(False))
    torch.testing.assert_close(average.shadows[0], torch.full((3,), 0.1))
    with average.applied():
        assert torch.equal(weight.detach(), torch.full((3,), 0.1))
    assert torch.equal(weight.detach(), torch.ones(3))


def test_fp8_base_stores_the_frozen_weights_in_float8_and_trains(make_config):
    from cogft.models.adapters import setup_trainable
    from cogft.models.loading import load_for_config, load_transformer

    config, variant = load_for_config(make_config("model.fp8_base=true", *FAST))
    transformer = load_transformer(config.model.path, variant, config.model.revision)
    torch.manual_seed(0)
    params = setup_trainable(transformer, config)
    plain = load_transformer(config.model.path, variant, config.model.revision)
    torch.manual_seed(0)
    plain_params = setup_trainable(plain, config.model_copy(update={"model": config.model.model_copy(
        update={"fp8_base": False})}))
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))  # the adapter starts as without float8
    block = transformer.transformer_blocks[0]
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.attn1.to_q.lora_A["default"].weight.dtype == torch.float32  # the adapter trains in fp32
    assert block.norm1.linear.weight.dtype == torch.float8_e4m3fn  # the modulation too: the scale keeps it precise
    assert transformer.patch_embed.text_proj.weight.dtype == torch.float16  # the input projections stay as they are
    assert "weight_scale" not in "".join(transformer.state_dict())  # the checkpoint layout is unchanged
    assert all(p.dtype == torch.float32 for p in params)
    run = train(make_config("model.fp8_base=true", "train.checkpoint_every=100", "train.max_steps=3",
                            "validation.prompts=[a red ball]", "validation.num_inference_steps=2",
                            "validation.check_export=true", out="fp8"))
    assert len(losses(run)) == 3 and all(abs(x) < 1e6 for x in losses(run))
    check = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "export_check/match" in row][0]  # the stock pipeline predicts with the base as training had it
    assert check["export_check/match"] == 1.0
    assert check["export_check/prediction_gap"] <= check["export_check/tolerance"] < 1e-3  # float8's rounding is 3 %
    assert lora(run).keys() == lora(train(make_config(*FAST, "train.max_steps=1", out="plain"))).keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_storage_keeps_every_layer_within_e4m3s_precision_whatever_its_weights_magnitude(dtype):
    """A plain float8 cast loses small weights to e4m3's subnormals (about 11 % error for a 12288-wide layer at
    PyTorch's default init); the per-row power-of-two scale keeps every layer near e4m3's 3-bit mantissa."""
    from cogft.models.fp8 import quantize, row_scales

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 512, generator=gen)
    for std in (1e-4, 5e-3, 0.02, 1.0):
        weight = (torch.randn(256, 512, generator=gen) * std).to(dtype)
        stored, scale = quantize(weight, dtype)
        assert stored.dtype == torch.float8_e4m3fn and scale.dtype == dtype
        assert torch.equal(torch.log2(scale.float()), torch.log2(scale.float()).round())  # powers of two: exact
        upcast = stored.to(dtype) * scale
        want = hidden @ weight.float().T
        assert ((hidden @ upcast.float().T - want).norm() / want.norm()).item() < 0.04, std
    assert torch.equal(row_scales(torch.zeros(2, 4), dtype), torch.full((2, 1), torch.finfo(dtype).tiny, dtype=dtype))


def test_fp8_layers_keep_no_upcast_copy_for_the_backward_and_give_the_same_gradient():
    """Autograd would keep each layer's upcast weight until the backward (without checkpointing, all of them: more
    than the bf16 weights float8 replaced); the float8 layer saves its float8 weight, already in memory."""
    from cogft.models.fp8 import store_in_fp8

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).to(torch.bfloat16)
    store_in_fp8(model, torch.bfloat16)
    upcast = [layer.weight.to(torch.bfloat16) * layer.weight_scale for layer in (model[0], model[2])]
    hidden = torch.randn(8, 64, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(hidden).square().sum().backward()
    assert not [t for t in saved if t.dtype == torch.bfloat16 and t.shape in ((48, 64), (32, 48))]
    assert [t.dtype for t in saved if t.shape in ((48, 64), (32, 48))] == [torch.float8_e4m3fn] * 2
    reference = hidden.detach().clone().requires_grad_(True)
    first = torch.nn.functional.linear(reference, upcast[0], model[0].bias)
    torch.nn.functional.linear(torch.nn.functional.gelu(first), upcast[1], model[2].bias).square().sum().backward()
    assert torch.equal(hidden.grad, reference.grad)


def test_fp8_base_lowers_the_estimate_and_is_refused_for_full_fine_tuning(make_config):
    from cogft.models.cost import estimate
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(make_config("model.path=random://5b", "data.num_frames=49", "data.height=480",
                                                  "data.width=720", *FAST), validates=False)
    base = estimate(config, variant, "H200", advise=False)
    fp8 = estimate(config.model_copy(update={"model": config.model.model_copy(update={"fp8_base": True})}), variant,
                   "H200", advise=False)
    assert 5.0 < base.peak_allocated_gib - fp8.peak_allocated_gib < 5.3  # 5.55 B weights at 1 byte instead of 2
    with pytest.raises(ConfigError, match="model.fp8_base .* train.mode=lora"):
        make_config("model.fp8_base=true", "train.mode=sft")


def test_optimizers_that_cannot_run_here_are_refused_before_prepare(make_config, monkeypatch, tmp_path):
    cpu = Launch(device="cpu", variant="cogvideox-2b", dtype=torch.float16)
    assert "runs on CUDA GPUs" in OPTIMIZERS["adamw8bit"].problem(cpu)
    assert "host memory" in OPTIMIZERS["prodigy"].problem(dataclasses.replace(cpu, device="cuda", offloaded=True))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "prodigyopt" else object())
    assert 'pip install "cogft[prodigy]"' in OPTIMIZERS["prodigy"].problem(cpu)
    with pytest.raises(ConfigError, match="train.optimizer=adamw8bit: .* CUDA GPUs"):
        train(make_config("train.optimizer=adamw8bit", out="refused"))
    assert not (tmp_path / "refused" / "prepare_report.jsonl").exists()  # refused before any clip was read
