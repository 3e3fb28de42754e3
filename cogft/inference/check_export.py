"""The export check: the run's exported weights, loaded into a stock diffusers pipeline in a fresh process, render
the first validation prompt as the in-training final validation did, and the two renders must agree to noise level.

A fresh process shares nothing with training (no in-memory adapter, no attention or group-norm swaps, no compiled
blocks), so its video is what a user's `from_pretrained` + `load_lora_weights` gets; a lost alpha, a wrong scale or
missing keys move it off the trained model's. For a LoRA it also renders with the adapter off, which says how much
the LoRA changes the video at all. Renders are compared as 8-bit pixels, as a video stores them. A run with
`model.fp8_base` rendered its validation on the float8 base, so the stock pipeline's base is stored the same way
(`store_in_fp8`) before the LoRA is loaded; otherwise float8's rounding (about a level on the tiny model) would
hide what the check looks for.

    python -m cogft.inference.check_export RUN --embeds E.safetensors --negative N.safetensors --out F.npz

is that process (E, N: the cached embeddings of the prompt and of "" that the validation rendered with); the
trainer runs it through `check_export` at the end of a finished run (`validation.check_export`).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# the mean absolute difference, in 8-bit pixel levels, still counted as rounding noise. On CPUs both renders run the
# same kernels: measured 0.00001 (one pixel off by one level), while the tiny test model's LoRA exported without its
# alpha renders 0.5 to 2.3 levels off. On GPUs training's compiled blocks and attention kernel differ from the stock
# pipeline's, so a level is allowed (not yet measured there).
NOISE = {"cpu": 0.05, "cuda": 1.0}


def tolerance(device: str) -> float:
    return NOISE.get(device.split(":")[0], NOISE["cuda"])


def describe(metrics: dict) -> str:
    """The check's result in words, for the log and the run's summary."""
    effect = metrics.get("export_check/lora_effect")
    return (f"the export in a stock diffusers pipeline (a fresh process) renders the first validation prompt "
            f"{metrics['export_check/pixel_diff']:.2f} pixel levels (mean, of 255) from the in-training video"
            + ("" if effect is None else f", the LoRA itself changing it by {effect:.2f}"))


def to_pixels(frames) -> np.ndarray:
    """Float frames in [0, 1] (the renderer's) as 8-bit pixels."""
    return (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def stock_render(run: str, embeds: str, negative: str, device_name: str) -> dict[str, np.ndarray]:
    """The first validation prompt from the run's export through the variant's stock pipeline, with the seed, size,
    steps, guidance and precision of the in-training validation (transformer in the variant's dtype under its
    autocast, VAE in the compute dtype): {"export": pixels}, and for a LoRA {"base": pixels} with it off."""
    import torch
    from safetensors.torch import load_file

    from ..data.images import conditioning_image
    from ..models.fp8 import store_in_fp8
    from ..models.loading import resolve_model_path
    from ..run_dir import TRANSFORMER_DIR, resolve_trained
    from .render import render
    from .sampling import trained_variant

    trained = resolve_trained(run)
    config, device = trained.config, torch.device(device_name)
    variant = trained_variant(trained)
    base, revision = resolve_model_path(config.model.path), config.model.revision
    parts = {"text_encoder": None, "tokenizer": None,
             "vae": variant.spec.diffusers_class("vae").from_pretrained(base, subfolder="vae", revision=revision,
                                                                       dtype=variant.compute_dtype(device))}
    if trained.mode == "sft":
        parts["transformer"] = variant.spec.diffusers_class("transformer").from_pretrained(
            str(trained.weights_dir / TRANSFORMER_DIR), dtype=variant.dtype)
    pipe = variant.spec.diffusers_class("pipeline").from_pretrained(base, revision=revision, dtype=variant.dtype,
                                                                    **parts)
    if trained.mode == "lora":
        if config.model.fp8_base:  # the base the adapter was trained and rendered against, not a float8 error
            store_in_fp8(pipe.transformer, compute_dtype=variant.dtype)
        pipe.load_lora_weights(str(trained.weights_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    cfg, (height, width) = config.validation, config.validation_size(0)
    image = None
    if cfg.images:
        image = conditioning_image(cfg.images[0], height, width, config.data.resize, "validation.images[0]")

    prompt_embeds = load_file(embeds)["prompt_embeds"][None].to(device)
    negative_embeds = load_file(negative)["prompt_embeds"][None].to(device)

    def video():
        return to_pixels(render(
            pipe, variant, device, num_frames=config.data.num_frames, height=height, width=width,
            steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=image, cache=cfg.cache))

    renders = {"export": video()}
    if trained.mode == "lora":
        pipe.disable_lora()
        renders["base"] = video()
    return renders


def check_export(run_dir: Path, frames, embeds: str, negative: str, device: str) -> dict[str, float] | None:
    """Render in a fresh process and `compare` with the in-training `frames`; None (and a warning) when the process
    failed."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "renders.npz"
        command = [sys.executable, "-m", __name__, str(run_dir), "--embeds", embeds, "--negative", negative,
                   "--device", device, "--out", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            logger.warning("export check: the fresh process rendering the export failed (exit %d), so the export is "
                           "unchecked; check it with cogft sample --from %s. Its last words: %s", result.returncode,
                           run_dir, result.stderr[-2000:])
            return None
        with np.load(out) as renders:
            return compare(renders["export"], renders["base"] if "base" in renders else None, frames, tolerance(device))


def _pixel_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def compare(export: np.ndarray, base: np.ndarray | None, frames, noise: float) -> dict[str, float]:
    """The mean and largest absolute pixel difference (0-255) between the export's render and the in-training
    `frames`, the `noise` it is held to, and for a LoRA the mean difference the adapter makes (its render off vs
    training's); a warning when the export's is beyond noise, or its render has another shape."""
    trained = to_pixels(frames)
    if export.shape != trained.shape:
        logger.warning("export check: the stock pipeline rendered frames of shape %s, training %s: the export does not "
                       "reproduce the trained model's video", export.shape, trained.shape)
        return {"export_check/pixel_diff": 255.0, "export_check/pixel_diff_max": 255.0, "export_check/tolerance": noise}
    difference = _pixel_difference(export, trained)
    metrics = {"export_check/pixel_diff": float(difference.mean()),
               "export_check/pixel_diff_max": float(difference.max()), "export_check/tolerance": noise}
    if base is not None:
        metrics["export_check/lora_effect"] = float(_pixel_difference(base, trained).mean())
    said = describe(metrics)
    if metrics["export_check/pixel_diff"] > noise:
        logger.warning("export check: %s. That is beyond rounding noise (%.2f): the exported weights do not reproduce "
                       "the trained model (a lost alpha or scale, missing keys?)", said, noise)
    else:
        logger.info("export check: %s (rounding noise: up to %.2f)", said, noise)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cogft.inference.check_export", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the run directory, with its final export")
    parser.add_argument("--embeds", required=True, help="the first validation prompt's cached embedding")
    parser.add_argument("--negative", required=True, help='the cached embedding of "" (the negative prompt)')
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="where to write the renders (.npz of 8-bit frames)")
    args = parser.parse_args(argv)
    np.savez(args.out, **stock_render(args.run, args.embeds, args.negative, args.device))


if __name__ == "__main__":
    main()
