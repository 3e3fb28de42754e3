"""`cogft bench` on the tiny model: the same figures the GPU run prints, beside the plain recipe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cogft.bench.training import bench
from cogft.models.flops import step_flops
from cogft.models.loading import load_variant
from cogft.models.registry import reference_for

REPO = Path(__file__).resolve().parent.parent


def test_bench_prints_one_json_line_per_figure(make_config):
    printed = []
    rows = bench(make_config("train.batch_size=1"), baseline=True, warmup=1, steps=2, emit=printed.append)
    assert [r.get("variant", r.get("figure")) for r in rows] == ["plain", "cogft", "speedup_vs_plain"]
    cogft = rows[1]
    assert cogft["s_per_step"] > 0 and cogft["s_per_step_back_to_back"] > 0 and cogft["host_peak_gib"] > 0.1
    assert cogft["tokens"] == 3 * 4 * 6 + 16  # latent frames x patches + text
    assert rows[2]["ratio"] > 0
    assert rows[0]["attention"] == cogft["attention"] == "sdpa"  # model.attention=auto on a CPU
    assert printed == rows


def test_flops_of_the_real_2b_step():
    """~58 % attention at 17,776 tokens, 120 TFLOP forward for CogVideoX-2B."""
    flops = step_flops(load_variant("THUDM/CogVideoX-2b"), 49, 480, 720, 1)
    assert flops.tokens == 17_776
    forward = flops.linear + flops.attention
    assert 0.55 < flops.attention / forward < 0.65
    assert 115e12 < forward < 125e12
    assert flops.training("sft") == 3 * forward


def test_reference_configs_only_for_hub_ids():
    assert reference_for("THUDM/CogVideoX-5b").transformer["num_layers"] == 42
    assert reference_for("zai-org/cogvideox-2b").vae["scaling_factor"] == 1.15258426
    assert reference_for("/home/me/cogvideox-2b") is None


def test_bench_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cogft.cli", "bench", "--config", "configs/tiny-lora.yaml", "--warmup", "0",
         "--steps", "1", "train.batch_size=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["variant"] == "cogft"


def test_bench_checkpoint_roundtrip_and_sample(make_config):
    from cogft.bench.sampling import bench_sample

    rows = bench(make_config("train.batch_size=1"), warmup=0, steps=1, checkpoint=True, emit=lambda row: None)
    assert rows[0]["checkpoint_save_s"] >= 0 and rows[0]["checkpoint_mib"] > 0.01  # the LoRA + optimizer state
    rows = bench_sample(make_config("validation.cache=pab", "validation.num_inference_steps=2"), baseline=True,
                        emit=lambda row: None)
    assert [(r.get("variant"), r["cache"]) for r in rows] == [
        ("plain", "none"), ("cogft", "none"), ("cogft", "pab"),  # exact and cached beside the stock pipeline
        (None, "none"), (None, "pab")]
    assert all(r["figure"] == "sample_speedup_vs_plain" and r["ratio"] > 0 for r in rows[3:])
    assert {r["attention"] for r in rows[:3]} == {"sdpa"}


def test_bench_buckets_times_each_size_per_token_against_the_single_size(make_config):
    from cogft.bench.training import bench_buckets

    rows = bench_buckets(make_config("model.path=tiny://5b", "train.batch_size=1", "data.buckets=[64x96, 80x80]"),
                         warmup=0, steps=1, emit=lambda row: None)
    assert [(r.get("variant"), r.get("height"), r.get("width")) for r in rows[:3]] == [
        ("single_size", 64, 96), ("bucket", 64, 96), ("bucket", 80, 80)]
    assert rows[0]["tokens"] == rows[1]["tokens"] != rows[2]["tokens"] and rows[1]["compile"] is False  # a CPU
    assert [r["size"] for r in rows[3:]] == ["64x96", "80x80"]
    assert all(r["figure"] == "bucket_cost_per_token_vs_single_size" and r["ratio"] > 0 for r in rows[3:])


def test_bench_eval_times_the_held_out_eval_against_the_step(make_config):
    from cogft.bench.training import bench_eval

    row = bench_eval(make_config("train.batch_size=1"), clips=3, warmup=0, steps=1, every=100, emit=lambda row: None)
    assert row["figure"] == "held_out_eval" and row["clips"] == 3
    assert row["eval_s"] > 0 and row["eval_s_first"] >= row["eval_s"] * 0.5 and row["s_per_step_after_eval"] > 0
    assert 0 < row["eval_share"] < 1


@pytest.mark.parametrize("model", ["tiny://5b", "tiny://1.5-5b"])  # 1.5: latent frames padded to pairs, as trained
def test_bench_fp8_error_compares_the_prediction_before_and_after_float8_storage(make_config, model):
    from cogft.bench.fp8 import bench_fp8_error

    row = bench_fp8_error(make_config(f"model.path={model}", "train.batch_size=1"), emit=lambda row: None)
    assert row["figure"] == "fp8_error" and 0 < row["fp8_parameters"] < row["parameters"]
    assert len(row["relative_error"]) == len(row["cosine"]) == len(row["timesteps"]) == 3
    assert all(0 < error < 0.1 for error in row["relative_error"]) and all(c > 0.99 for c in row["cosine"])
