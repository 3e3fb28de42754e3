"""Two real gloo ranks on the CPU through torchrun: same training as one rank with the batch of both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cogft.training.clip_records import read_samples
from cogft.training.loop import train

REPO = Path(__file__).resolve().parent.parent
COMMON = ["validation.prompts=[]", "tracking.report_to=none", "train.checkpoint_every=2"]


def torchrun(out: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
            "--config", "configs/tiny-lora.yaml", f"output_dir={out}", f"data.cache_dir={cache}", *COMMON, *overrides]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def test_two_ranks_match_one_rank_with_the_whole_batch_and_resume_exactly(make_config, tmp_path):
    """Also: the validation prompts are spread over the ranks (prompt i on rank i % 2), every video landing in the
    run's samples/, so a validation takes the time of its share while the other rank waits; validation changes no
    training draw, so the losses still match the one-rank run without it."""
    cache = tmp_path / "cache"  # fresh: prepare's split over the ranks is visible in the report
    two = tmp_path / "two"
    result = torchrun(two, cache, "train.max_steps=4", "train.batch_size=1", "validation.every=4",
                      "validation.num_inference_steps=2", "validation.prompts=[a red square,fractals,cells]")
    assert "world_size=2 process=0" in result.stderr and "world_size=2 process=1" in result.stderr
    assert "process 0 wrote 2 videos (prompts [0, 2])" in result.stderr
    assert "process 1 wrote 1 videos (prompts [1])" in result.stderr
    assert sorted(p.name[:14] for p in (two / "samples").glob("*.mp4")) == [
        "step-000004-00", "step-000004-01", "step-000004-02"]
    assert sorted(p.name[:14] for p in (two / "samples" / "base").glob("*.mp4")) == [  # the motion guard's, shared
        "step-000000-00", "step-000000-01", "step-000000-02"]                            # as the videos are
    [motion] = [row for row in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "quality/motion"
                in row]  # summed over the ranks: every prompt's ratio
    assert {f"quality/motion_ratio/{i:02d}" for i in range(3)} <= motion.keys() and motion["step"] == 4
    report = [json.loads(line) for line in (two / "prepare_report.jsonl").read_text().splitlines()]
    clips = [row for row in report if "clip" in row]
    assert len(clips) == 6 and all(row["status"] == "encoded" for row in clips)  # each clip once, by one rank

    one = train(make_config(*COMMON, "train.max_steps=4", "train.batch_size=2", f"data.cache_dir={cache}", out="one"))
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-4, atol=1e-5)
    a, b = lora(two), lora(one)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)  # AdamW magnifies fp16 noise on tiny grads
    ranks, whole = read_samples(two), read_samples(one)  # each rank's clip losses, merged: the one rank's
    assert sorted(p.name for p in (two / "clip_losses").glob("rank-*")) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert [(s.step, s.clip, s.t) for s in ranks] == [(s.step, s.clip, s.t) for s in whole] and len(whole) == 8
    torch.testing.assert_close(torch.tensor([s.loss for s in ranks]), torch.tensor([s.loss for s in whole]),
                               rtol=1e-4, atol=1e-5)

    resumed = tmp_path / "resumed"  # a run left with only the step-2 checkpoint, as after a crash
    shutil.copytree(two / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    torchrun(resumed, cache, "train.max_steps=4", "train.batch_size=1")
    assert losses(resumed) == losses(two)[2:]  # steps 3 and 4, bit for bit
    assert read_samples(resumed) == [s for s in read_samples(two) if s.step > 2]
    assert all(torch.equal(lora(resumed)[k], lora(two)[k]) for k in a)


def test_the_process_group_waits_as_long_as_the_validation_videos_take(monkeypatch, make_config):
    """Ranks wait for validation in collectives: the group's timeout covers every video three times over on this
    GPU (by the cost model), never below torch's default."""
    from cogft.models.cost import estimate
    from cogft.models.loading import load_for_config
    from cogft.training import timeout

    config = make_config("model.path=tiny://1.5-5b", "validation.prompts=[a,b,c,d]")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert timeout.process_group_timeout(config) == timeout.DEFAULT_TIMEOUT  # CPU ranks: gloo, seconds per video
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    real = make_config("model.path=THUDM/CogVideoX1.5-5B", "validation.prompts=[a,b,c,d]", "data.num_frames=81",
                       "data.height=768", "data.width=1360", "validation.num_inference_steps=50")
    resolved, variant = load_for_config(real, validates=False)
    per_video = estimate(resolved, variant, "H200", advise=False).sample_seconds
    got = timeout.process_group_timeout(real)
    assert got.total_seconds() == pytest.approx(3 * 4 * per_video + 600, abs=1) and got > timeout.DEFAULT_TIMEOUT
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert timeout.process_group_timeout(real) == timeout.DEFAULT_TIMEOUT


def test_a_tiny_models_configs_are_read_before_the_process_group_without_building_it(monkeypatch, tmp_path):
    """Every rank asks before the group exists; building there would race. The configs are the spec's own."""
    from cogft.models.loading import load_variant
    from cogft.models.registry import spec_named

    monkeypatch.setenv("COGFT_HOME", str(tmp_path))
    assert load_variant("tiny://1.5-5b-i2v", build=False).configs == spec_named("1.5-5b-i2v", "tiny://").tiny
    assert not any(tmp_path.iterdir())
