"""Two real gloo ranks on the CPU through torchrun: same training as one rank with the batch of both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

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
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def test_two_ranks_match_one_rank_with_the_whole_batch_and_resume_exactly(make_config, tmp_path):
    cache = tmp_path / "cache"  # fresh: prepare's split over the ranks is visible in the report
    two = tmp_path / "two"
    result = torchrun(two, cache, "train.max_steps=4", "train.batch_size=1")
    assert "world_size=2 process=0" in result.stderr and "world_size=2 process=1" in result.stderr
    report = [json.loads(line) for line in (two / "prepare_report.jsonl").read_text().splitlines()]
    clips = [row for row in report if "clip" in row]
    assert len(clips) == 6 and all(row["status"] == "encoded" for row in clips)  # each clip once, by one rank

    one = train(make_config(*COMMON, "train.max_steps=4", "train.batch_size=2", f"data.cache_dir={cache}", out="one"))
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-4, atol=1e-5)
    a, b = lora(two), lora(one)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)  # AdamW magnifies fp16 noise on tiny grads

    resumed = tmp_path / "resumed"
    torchrun(resumed, cache, "train.max_steps=2", "train.batch_size=1")
    torchrun(resumed, cache, "train.max_steps=4", "train.batch_size=1")
    assert losses(resumed) == losses(two)
    assert all(torch.equal(lora(resumed)[k], lora(two)[k]) for k in a)
