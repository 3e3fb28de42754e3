"""`train.blocks_to_swap`: frozen block weights in host memory, copied in per block, change no number."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cogft.training.loop import train
from test_train import FAST, losses

REPO = Path(__file__).resolve().parent.parent


def _lora(run):
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def test_swapped_blocks_keep_the_numbers_bit_for_bit(make_config):
    """One block and every block swapped: the same losses and LoRA tensors as none, bit for bit."""
    plain = train(make_config(*FAST, "train.max_steps=2", out="plain"))
    for setting in ("1", "all"):
        swapped = train(make_config(*FAST, "train.max_steps=2", f"train.blocks_to_swap={setting}",
                                    out=f"swap-{setting}"))
        assert losses(swapped) == losses(plain)
        a, b = _lora(plain), _lora(swapped)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swapped_blocks_resume_bit_for_bit_with_checkpointing_and_offload(make_config):
    """Every block swapped with offloaded checkpoints, stopped at step 2 and resumed to 4 == 4 plain steps."""
    plain = train(make_config(*FAST, "train.max_steps=4", out="plain"))
    swapped = ["train.blocks_to_swap=all", "train.gradient_checkpointing=true", "train.offload_checkpoints=true"]
    train(make_config(*FAST, *swapped, "train.max_steps=2", out="resumed"))
    resumed = train(make_config(*FAST, *swapped, "train.max_steps=4", out="resumed"))
    assert losses(resumed) == losses(plain)
    a, b = _lora(plain), _lora(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_swapped_float8_blocks_train_and_validate_as_unswapped(make_config):
    """float8 storage swapped (the host master in float8), validation's no-grad denoising included."""
    common = ["model.fp8_base=true", "train.max_steps=2", "train.checkpoint_every=100",
              "validation.prompts=[a red ball]", "validation.num_inference_steps=2", "validation.every=2"]
    plain = train(make_config(*common, out="fp8"))
    swapped = train(make_config(*common, "train.blocks_to_swap=1", out="fp8-swap"))
    assert losses(swapped) == losses(plain)
    assert all(torch.equal(_lora(plain)[k], _lora(swapped)[k]) for k in _lora(plain))
    assert len(list(swapped.glob("samples/*.mp4"))) == 1


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.trained = torch.nn.Parameter(torch.ones(4))

    def forward(self, hidden, encoder, temb, image_rotary_emb=None, attention_kwargs=None):
        return self.frozen(hidden) * self.trained, encoder


def test_block_swap_holds_placeholders_outside_a_block_and_two_blocks_at_most():
    from cogft.models.blocks import apply_block_options

    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList(_Block() for _ in range(4))
    expected = [block.frozen.weight.clone() for block in model.transformer_blocks]
    swap = apply_block_options(model, False, False, blocks_to_swap=3, device=torch.device("cpu"))
    swap.install()
    assert all(torch.isnan(block.frozen.weight).all() for block in model.transformer_blocks[:3])
    assert not torch.isnan(model.transformer_blocks[3].frozen.weight).any()  # not swapped
    seen = []
    for index, block in enumerate(model.transformer_blocks[:3]):
        original = block.frozen.forward
        block.frozen.forward = lambda x, index=index, original=original: (
            seen.append((index, torch.equal(model.transformer_blocks[index].frozen.weight, expected[index]),
                         len(swap.pending))) or original(x))
    hidden, encoder = torch.ones(2, 4, requires_grad=True), torch.zeros(2, 4)
    for block in model.transformer_blocks:
        hidden, encoder = block(hidden, encoder, torch.zeros(2))
    hidden.sum().backward()
    # forward 0, 1, 2, then the backward's recompute 2, 1, 0: each block's own weights, at most one more pending
    assert [(i, ok) for i, ok, _ in seen] == [(0, True), (1, True), (2, True), (2, True), (1, True), (0, True)]
    assert max(pending for *_, pending in seen) <= 1, seen
    assert all(torch.isnan(block.frozen.weight).all() for block in model.transformer_blocks[:3])
    assert all(block.trained.grad is not None for block in model.transformer_blocks)


def test_blocks_to_swap_refusals_name_the_key(make_config):
    from cogft.config import ConfigError
    from cogft.models.loading import load_for_config
    from cogft.training.budget import block_settings

    with pytest.raises(ConfigError, match="train.blocks_to_swap.*train.mode=sft.*train.mode=lora"):
        make_config("train.blocks_to_swap=2", base="tiny-sft.yaml")
    config, variant = load_for_config(make_config("train.blocks_to_swap=99"))
    with pytest.raises(ConfigError, match="train.blocks_to_swap=99: .* has 2 transformer blocks; use at most 2"):
        block_settings(config, variant, torch.device("cpu"))


def test_a_run_above_the_hosts_memory_is_refused_before_any_work(make_config, monkeypatch, tmp_path):
    import psutil

    from cogft.config import ConfigError

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=0))
    config = make_config(*FAST, "data.dataloader_workers=2", f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=r"host memory: .* data_workers 1\.0.* try data\.dataloader_workers=0"):
        train(config)
    assert not (tmp_path / "cache").exists()  # nothing was encoded


def test_estimate_plans_for_a_card_by_its_memory_and_the_hosts_ram(tmp_path):
    """`cogft estimate --gpu-memory 16 --host-ram GIB`: a plan that fits both; with too little RAM, the advice."""
    from cogft.bench.estimate import run_estimate
    from cogft.config_file import load_config

    config = load_config(REPO / "configs" / "cogvideox-5b-lora.yaml", ["train.memory_budget_gib=auto"])
    roomy = json.loads(run_estimate(config, "4080", True, gpu_memory=16, host_ram=64))
    assert roomy["fits"] and roomy["peak_allocated_gib"] <= 0.9 * 16 and roomy["gpu"].endswith("16 GiB usable")
    assert roomy["host"]["training_gib"] <= 64 and not roomy["host_advice"]
    tight = json.loads(run_estimate(config, "4080", True, gpu_memory=16, host_ram=12))
    assert tight["host"]["training_gib"] > 12 and any("more RAM" in line for line in tight["host_advice"])
    text = run_estimate(config, "4080", False, gpu_memory=16, host_ram=12)
    assert "host peak, training" in text and "does NOT fit 12 GiB" in text


def _out_of_memory_at(monkeypatch, call: int) -> None:
    """The training step's forward/backward raises a CUDA out-of-memory on its `call`-th call (once)."""
    from cogft.training.step import TrainingStep

    original, calls = TrainingStep.forward_backward, []

    def forward_backward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainingStep, "forward_backward", forward_backward)


def test_an_out_of_memory_ends_with_exit_2_naming_the_step_and_what_fits(make_config, monkeypatch, capsys, tmp_path):
    from cogft.cli import main

    _out_of_memory_at(monkeypatch, 2)
    config = make_config(*FAST, "train.max_steps=3")
    code = main(["train", "--config", str(REPO / "configs" / "tiny-lora.yaml"), f"data.path={REPO / 'data'}",
                 f"data.cache_dir={config.data.cache_dir}", f"output_dir={tmp_path / 'oom'}",
                 "tracking.report_to=none", *FAST, "train.max_steps=3"])
    said = capsys.readouterr().err
    assert code == 2 and "Traceback" not in said
    assert "out of GPU memory in training step 2 (9x" in said and "batch 2)" in said
    assert "the estimate says train.gradient_checkpointing=" in said and "train.memory_budget_gib=auto" in said


def test_under_a_budget_an_out_of_memory_replans_and_equals_a_run_started_with_that_plan(make_config, monkeypatch):
    """Out of memory in step 3 of 4 (checkpoints every 2): the run re-plans, goes on from step 2, and ends with the
    losses and LoRA of a run that had that plan from the start."""
    from cogft.config_file import load_config

    _out_of_memory_at(monkeypatch, 3)
    common = [*FAST, "train.max_steps=4", "train.checkpoint_every=100"]
    replanned = train(make_config(*common, "train.memory_budget_gib=1", out="replanned"))
    chosen = load_config(replanned / "config.yaml").train
    assert chosen.memory_budget_gib is None and chosen.gradient_checkpointing is True  # the next saving
    monkeypatch.undo()
    planned = train(make_config(*common, f"train.gradient_checkpointing={str(chosen.gradient_checkpointing).lower()}",
                                f"train.offload_checkpoints={str(chosen.offload_checkpoints).lower()}",
                                f"train.blocks_to_swap={chosen.blocks_to_swap}", out="planned"))
    assert len(losses(replanned)) == 4 and losses(replanned) == losses(planned)
    assert all(torch.equal(_lora(planned)[k], _lora(replanned)[k]) for k in _lora(planned))


def test_bench_reports_the_swapped_blocks_and_its_memory_cap(make_config, monkeypatch):
    from cogft.bench.training import bench
    from cogft.training.budget import card_memory_gib

    rows = bench(make_config("train.blocks_to_swap=all"), warmup=0, steps=1, gpu_memory_gib=4, emit=lambda row: None)
    assert rows[0]["blocks_to_swap"] == 2 and rows[0]["gpu_memory_cap_gib"] is None  # a CPU has no cap to hold
    # the cap ends with the bench: what runs next in the process plans for the whole card
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    assert card_memory_gib(torch.device("cuda")) == 80


def test_fp8_base_auto_is_resolved_and_saved_before_training(make_config):
    from cogft.config_file import load_config

    run = train(make_config(*FAST, "train.max_steps=1", "model.fp8_base=auto", out="fp8-auto"))
    assert load_config(run / "config.yaml").model.fp8_base is False  # no memory plan on a CPU: no float8
