"""The DeepSpeed and FSDP launch configs as shipped, run by `accelerate launch` with one CPU process.

accelerate takes DeepSpeed up on CPUs with one process (two CPU processes each see a world of one, see
DESIGN's traps) and FSDP only on GPUs, so sharding over several ranks is measured on GPUs, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
QUIET = ["validation.prompts=[]", "tracking.report_to=none", "train.checkpoint_every=2"]


def launch(config_file: str, out: Path, cache: Path, *overrides: str, base: str = "tiny-lora.yaml"):
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config_file}",
            "--num_processes", "1", "train.py", "--config", f"configs/{base}", "model.path=tiny://5b",
            f"output_dir={out}", f"data.cache_dir={cache}", *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_zero2_trains_like_plain_and_resumes_bit_exactly(make_config, shared_cache, tmp_path):
    straight = tmp_path / "straight"
    result = ok(launch("deepspeed_zero2.yaml", straight, shared_cache, *QUIET, "train.max_steps=4"))
    assert "backend=deepspeed-zero2 mode=lora" in result.stderr
    assert "shm_comm" not in result.stdout  # one CPU process: DeepSpeed's shared-memory op is not compiled (40 s)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_steps"] == 0 and 0 < r["grad_norm"] < 10 for r in rows)  # the engine's norm, read back
    checkpoint = straight / "checkpoints" / "step-000004"
    assert (checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's own states
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()  # and the diffusers-format LoRA

    resumed = tmp_path / "resumed"  # a run left with only the step-2 checkpoint, as after a crash
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    result = ok(launch("deepspeed_zero2.yaml", resumed, shared_cache, *QUIET, "train.max_steps=4"))
    assert "resumed from" in result.stderr
    assert losses(resumed) == losses(straight)[2:]  # steps 3 and 4, bit for bit
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # DeepSpeed holds the model in bf16 with fp32 master weights in its optimizer; without it, cogft keeps
    # fp32 LoRA weights under bf16 autocast. The same training, to bf16 precision:
    plain = train(make_config(*QUIET, "model.path=tiny://5b", "train.max_steps=4", out="plain"))
    torch.testing.assert_close(torch.tensor(losses(straight)), torch.tensor(losses(plain)), rtol=2e-2, atol=1e-3)
    reference = load_file(plain / "lora" / "pytorch_lora_weights.safetensors")
    moved = [(a[k].float() - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-8) for k in a
             if "lora_B" in k]
    assert max(moved) < 0.05, moved


def test_zero3_sft_checkpoints_shards_exports_gathered_weights_and_validates(shared_cache, tmp_path):
    out = tmp_path / "z3"
    result = ok(launch("deepspeed_zero3.yaml", out, shared_cache, "tracking.report_to=none", "train.max_steps=2",
                       "train.checkpoint_every=2", "validation.every=2", "validation.num_inference_steps=2",
                       "validation.prompts=[a red square]", base="tiny-sft.yaml"))
    assert "backend=deepspeed-zero3 mode=sft" in result.stderr
    checkpoint = out / "checkpoints" / "step-000002"
    assert list((checkpoint / "pytorch_model").glob("zero_pp_rank_0_*_model_states.pt"))  # the rank's shard
    exported = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    in_checkpoint = load_file(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.numel() > 0 for v in exported.values())  # gathered, not the empty local views of ZeRO-3
    assert all(torch.equal(exported[k].float(), in_checkpoint[k].float()) for k in exported)
    assert len(list((out / "samples").glob("step-000002-*.mp4"))) == 1

    sample = subprocess.run([sys.executable, "-m", "cogft.cli", "sample", "--from", str(out),
                             "--prompt", "a red square", "--out", str(tmp_path / "x.mp4"), "--steps", "2"],
                            cwd=REPO, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr[-2000:]


def test_zero2_offload_steps_the_optimizer_in_host_memory(shared_cache, tmp_path):
    out = tmp_path / "offload"
    result = ok(launch("deepspeed_zero2_offload.yaml", out, shared_cache, *QUIET, "train.max_steps=2",
                       "train.cpu_adam=torch", "train.learning_rate=1e-2", base="tiny-sft.yaml"))
    assert "backend=deepspeed-zero2-offload mode=sft" in result.stderr
    from cogft.models.build import tiny_dir

    before = load_file(tiny_dir("5b") / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k].to(after[k].dtype), after[k]) for k in after)


def test_fsdp_on_a_cpu_machine_is_refused_by_name(shared_cache, tmp_path):
    result = launch("fsdp.yaml", tmp_path / "fsdp", shared_cache, *QUIET)
    assert result.returncode != 0
    assert "cogft train: error: the FSDP launch config needs GPUs" in result.stderr
    assert "deepspeed_zero3.yaml" in result.stderr


def test_a_deepspeed_launch_without_deepspeed_is_refused_by_name(monkeypatch):
    """deepspeed is installed by default on Linux only: elsewhere a DeepSpeed launch config names the fix."""
    import importlib.util

    from cogft.training.backends import BackendError, accelerator_on_cpu

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(BackendError, match=r"deepspeed is not installed: `pip install \"cogft\[deepspeed\]\"`"):
        accelerator_on_cpu()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert accelerator_on_cpu() in (True, False)  # without a DeepSpeed launch nothing is asked of it


def _deepspeed_accelerator(ds_config: dict):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2, device=torch.device("cuda"),
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_config_follows_the_cogft_config(make_config):
    from cogft.models.loading import load_variant
    from cogft.training.backends import BackendError, configure_backend

    config = make_config("train.gradient_accumulation_steps=3", "train.max_grad_norm=0.5", "train.batch_size=2")
    ds = {"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}
    configure_backend(_deepspeed_accelerator(ds), config, load_variant("tiny://2b"))
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]  # dynamic scaling
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (3, 0.5)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (2, 2 * 3 * 2)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]

    bf16 = make_config("train.mode=sft", "train.optimizer=adamw_bf16")
    with pytest.raises(BackendError, match="one GPU; with several use train.optimizer=adamw"):
        configure_backend(_deepspeed_accelerator({}), bf16, load_variant("tiny://5b"))  # 2 processes

    with pytest.raises(BackendError, match="sets 'optimizer'.*remove 'optimizer'"):
        configure_backend(_deepspeed_accelerator({"optimizer": {"type": "Adam"}}), config, load_variant("tiny://5b"))
