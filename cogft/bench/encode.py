"""GPU side of prepare at full size: VAE encode and T5 embedding throughput, one JSON line per figure.

    python -m cogft.bench.encode [--model THUDM/CogVideoX-2b] [--frames 49 --height 480 --width 720]

Builds the real VAE and text encoder shapes with random weights (no download) and times the same
`Variant.encode_sample` call prepare makes, on random frames, so it isolates what the GPU bounds; decoding
runs in parallel CPU workers (measured by `cogft.bench.prepare`). Clips/s per GPU = 1 / (VAE s/clip + T5
s/prompt), one caption per clip; with the encoder as it is and compiled (what `data.compile_vae` does).
For image-to-video models that call includes the `--image-draws` noisy encodings of the clip's first frame; with
`--control` (a text-to-video model widened by `model.control`) the control video's encoding, and for `canny` its
extraction from the frames (`data.control: canny`) too; `given` times a control video decoded beside the clip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ..config_file import build_config
from ..data.control import extract_control
from ..models.build import random_init, text_encoder_from_config
from ..models.group_norm import spread_group_norms
from ..models.loading import load_variant
from .timing import time_steps


def _timed(fn, repeat: int) -> float:
    """Median seconds of `fn` after one warm-up call (cuDNN autotuning, allocator), on the GPU."""
    return statistics.median(time_steps(lambda _: fn(), torch.device("cuda"), 1, repeat))


def _time_vae(variant, config, frames: np.ndarray, dtype: torch.dtype, device: torch.device, repeat: int,
              compile_vae: bool, control: str):
    """(s/clip, peak GiB, compile seconds) of the call prepare makes (`Variant.encode_sample`: for image-to-video
    models the image's encodings too), the encoder compiled as prepare does."""
    with random_init(device, dtype):
        vae = variant.spec.diffusers_class("vae").from_config(variant.configs.vae).eval()
    spread_group_norms(vae)  # as `load_vae` gives it to prepare

    def encode(vae):
        conditions = {}
        if control != "none":
            conditions["control"] = extract_control(frames, config.data, device) if control == "canny" else frames
        return variant.encode_sample(vae, frames, conditions, 0, config, device, dtype)

    compile_seconds = None
    if compile_vae:
        vae.encoder = torch.compile(vae.encoder)
        started = time.perf_counter()
        encode(vae)
        torch.cuda.synchronize()
        compile_seconds = round(time.perf_counter() - started, 1)
    torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(lambda: encode(vae), repeat)
    return seconds, round(torch.cuda.max_memory_allocated(device) / 2**30, 2), compile_seconds, vae


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cogft.bench.encode", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="THUDM/CogVideoX-2b")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--image-draws", type=int, default=4, help="image-to-video: data.image_noise_draws")
    parser.add_argument("--control", choices=["none", "given", "canny"], default="none",
                        help="widen the model to take a control video (model.control) and encode one per clip: given "
                             "(decoded beside the clip) or made by canny (data.control) on the GPU")
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    variant = load_variant(args.model, control=args.control != "none")
    data = {"image_noise_draws": args.image_draws, **({"control": "canny"} if args.control == "canny" else {})}
    config = build_config({"model": {"path": args.model, "control": args.control != "none"},
                           "data": {"path": ".", **data}, "output_dir": "unused"})  # no clips are read
    common = {"model": args.model, "frames": args.frames, "height": args.height, "width": args.width,
              "control": args.control, "device": torch.cuda.get_device_name(device)}
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)

    vae_seconds = {}
    dtype = variant.compute_dtype(device)
    for compile_vae in (False, True):
        seconds, peak, compile_seconds, vae = _time_vae(variant, config, frames, dtype, device, args.repeat,
                                                        compile_vae, args.control)
        vae_seconds[compile_vae] = seconds
        print(json.dumps({"figure": "vae_encode_s_per_clip", "value": round(seconds, 4), "dtype": str(dtype),
                          "compiled": compile_vae, "compile_s": compile_seconds, "peak_allocated_gib": peak,
                          "conditions": list(variant.conditions), **common}), flush=True)
        del vae  # freed before the next one is built
        torch.cuda.empty_cache()

    text_config = variant.spec.reference.text_encoder
    with random_init(device, variant.dtype):
        t5 = text_encoder_from_config(variant.spec, text_config).eval()
    ids = torch.randint(0, text_config["vocab_size"], (16, variant.max_text_seq_length), device=device)
    with torch.no_grad():
        t5_seconds = _timed(lambda: t5(ids)[0], args.repeat) / 16
    print(json.dumps({"figure": "t5_prompts_per_s", "value": round(1 / t5_seconds, 1), "batch": 16, **common}))
    for compile_vae, seconds in vae_seconds.items():
        print(json.dumps({"figure": "prepare_gpu_clips_per_s", "value": round(1 / (seconds + t5_seconds), 3),
                          "compiled": compile_vae,
                          "what": "1 / (VAE s/clip + T5 s/prompt); decode overlaps in CPU workers", **common}))


if __name__ == "__main__":
    main()
