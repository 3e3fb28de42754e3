"""Prepare throughput: one JSON line per figure, measured on a fresh cache so every clip is really encoded.

    python -m cogft.bench.prepare --config configs/tiny-lora.yaml [--repeat 3] [key=value ...]

Figures: clips/s over the whole prepare (VAE load and worker start included), clips/s once the
first clip is out (steady state), and the decode share: the time the encoder sat waiting for
decoded frames, over the whole prepare. A benchmark command, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ..config_file import load_config
from ..data.cache import prepare
from ..models.loading import load_for_config


def measure(config_path: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="cogft-bench-") as cache:
        config = load_config(config_path, [*overrides, f"data.cache_dir={cache}", "validation.prompts=[]"])
        config, variant = load_for_config(config, validates=False)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        summary = prepare(config, variant, device, show_progress=False).summary
        seconds = time.perf_counter() - started
    stages = summary["seconds_by_stage"]
    return {"clips": summary["encoded"], "seconds": seconds, "stages": stages, "device": str(device)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cogft.bench.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median run is reported")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    runs = sorted((measure(args.config, args.overrides) for _ in range(args.repeat)), key=lambda r: r["seconds"])
    run = runs[len(runs) // 2]
    stages, clips = run["stages"], run["clips"]
    common = {"config": args.config, "device": run["device"], "clips": clips, "runs": args.repeat,
              "cpu_threads": torch.get_num_threads()}
    steady = run["seconds"] - stages.get("load_vae", 0.0)
    figures = [
        ("prepare_clips_per_s", clips / run["seconds"], "clips/s", "whole prepare on a fresh cache"),
        ("prepare_clips_per_s_after_load", clips / steady, "clips/s", "without loading the VAE"),
        ("decode_wait_share", stages.get("decode_wait", 0.0) / run["seconds"], "fraction",
         "time the encoder waited for decoded frames (worker start included)"),
        ("decode_seconds_per_clip", stages.get("decode_in_workers", 0.0) / max(clips, 1), "s/clip",
         "probe + decode inside a worker"),
        ("vae_encode_seconds_per_clip", stages.get("vae_encode", 0.0) / max(clips, 1), "s/clip", "VAE encode + save"),
    ]
    for name, value, unit, what in figures:
        print(json.dumps({"figure": name, "value": round(value, 4), "unit": unit, "what": what, **common}))


if __name__ == "__main__":
    main()
