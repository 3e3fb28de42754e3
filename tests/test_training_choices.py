"""Training choices beside AdamW: Prodigy, 8-bit AdamW's refusals, float8 base weights, a weight average (EMA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cogft.config import ConfigError, build_config
from cogft.training.loop import train
from cogft.training.backends import optimizer_problem

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
    from cogft.models.loading import load_for_config, load_transformer
    from cogft.training.adapters import setup_trainable

    config, variant = load_for_config(make_config("model.fp8_base=true", *FAST))
    transformer = load_transformer(config.model.path, variant, config.model.revision)
    params = setup_trainable(transformer, config)
    block = transformer.transformer_blocks[0]
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.attn1.to_q.lora_A["default"].weight.dtype == torch.float32  # the adapter trains in fp32
    assert block.norm1.linear.weight.dtype != torch.float8_e4m3fn  # norms and their modulation stay as they are
    assert all(p.dtype == torch.float32 for p in params)
    run = train(make_config("model.fp8_base=true", *FAST, "train.max_steps=3", out="fp8"))
    assert len(losses(run)) == 3 and all(abs(x) < 1e6 for x in losses(run))
    assert lora(run).keys() == lora(train(make_config(*FAST, "train.max_steps=1", out="plain"))).keys()


def test_fp8_base_lowers_the_estimate_and_is_refused_for_full_fine_tuning(make_config):
    from cogft.models.cost import estimate
    from cogft.models.loading import load_for_config

    config, variant = load_for_config(make_config("model.path=random://5b", "data.num_frames=49", "data.height=480",
                                                  "data.width=720", *FAST), validates=False)
    base = estimate(config, variant, "H200", advise=False)
    fp8 = estimate(config.model_copy(update={"model": config.model.model_copy(update={"fp8_base": True})}), variant,
                   "H200", advise=False)
    assert 4.0 < base.peak_allocated_gib - fp8.peak_allocated_gib < 5.0  # 4.76 B weights at 1 byte instead of 2
    with pytest.raises(ConfigError, match="model.fp8_base .* train.mode=lora"):
        make_config("model.fp8_base=true", "train.mode=sft")


def test_optimizers_that_cannot_run_here_are_refused_before_prepare(make_config, monkeypatch, tmp_path):
    config = make_config("train.optimizer=adamw8bit")
    assert "runs on CUDA GPUs" in optimizer_problem(config, torch.device("cpu"), offloaded=False)
    assert "host memory" in optimizer_problem(make_config("train.optimizer=prodigy"), torch.device("cuda"), True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "prodigyopt" else object())
    assert 'pip install "cogft[prodigy]"' in optimizer_problem(make_config("train.optimizer=prodigy"),
                                                              torch.device("cpu"), offloaded=False)
    with pytest.raises(ConfigError, match="train.optimizer=adamw8bit: .* CUDA GPUs"):
        train(make_config("train.optimizer=adamw8bit", out="refused"))
    assert not (tmp_path / "refused" / "prepare_report.jsonl").exists()  # refused before any clip was read
