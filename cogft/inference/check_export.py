"""The export check: the run's exported weights, loaded into a stock diffusers pipeline in a fresh process, render
the first validation prompt as the in-training final validation did, and predict on the trained model's own probe
input (`training/export_probe.py`); the prediction must agree with the trained model's to kernel noise.

A fresh process shares nothing with training (no in-memory adapter, no attention or group-norm swaps, no compiled
blocks), so its video is what a user's `from_pretrained` + `load_lora_weights` gets; a lost alpha, a wrong scale or
missing keys move it off the trained model's. For a LoRA it also renders with the adapter off, which says how much
the LoRA changes the video at all. Renders are compared as 8-bit pixels, as a video stores them, and reported;
the verdict comes from the probe, because many denoising steps amplify kernel rounding into pixels (on GPUs, more
than a weak LoRA's effect) while one forward does not, and the probe's adapter-off prediction, made on both
sides, measures that rounding in place. A run with
`model.fp8_base` rendered its validation on the float8 base, so the stock pipeline's base is stored the same way
(`store_in_fp8`) once the LoRA is loaded; otherwise float8's rounding (about a level on the tiny model) would
hide what the check looks for.

    python -m cogft.inference.check_export RUN --embeds E.safetensors --negative N.safetensors --probe P.safetensors
        --out F.npz

is that process (E, N: the cached embeddings of the prompt and of "" that the validation rendered with; P: the
probe); the trainer runs it through `check_export` at the end of a finished run (`validation.check_export`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The export's prediction may differ from the trained model's by this many times the kernel noise measured in place
# (the adapter-off predictions of both sides), and never less than FLOOR of the prediction's norm: on CPUs both
# sides run the same kernels and the tiny models' predictions agree to the bit.
NOISE_MULTIPLE, FLOOR = 3.0, 1e-5
# Full fine-tuning has no adapter to switch off, so no noise to measure: a fixed share of the prediction. Measured on
# an H200 (tiny models, compiled blocks): correct SFT exports 0.08 % (2B, fp16) and 0.56 % (5B, bf16) away, and the
# in-place noise of LoRA runs 0.07 % and 0.51 %.
SFT_TOLERANCE = {"cpu": FLOOR, "cuda": 0.02}


def describe(metrics: dict) -> str:
    """The check's result in words, for the log and the run's summary."""
    gap, noise = metrics["export_check/prediction_gap"], metrics.get("export_check/prediction_noise")
    effect, pixel_effect = metrics.get("export_check/prediction_lora_effect"), metrics.get("export_check/lora_effect")
    said = (f"the export in a stock diffusers pipeline (a fresh process) predicts {gap:.3%} away from the trained "
            f"model (tolerance {metrics['export_check/tolerance']:.3%}"
            + ("" if noise is None else f": kernel rounding alone measured {noise:.3%}")
            + ("" if effect is None else f"; the LoRA's own effect {effect:.2%}")
            + ("" if "export_check/adapter_dtype_gap" not in metrics else
               f"; held to the trained model with its adapter in the model's dtype, as the pipeline holds it, "
               f"{metrics['export_check/adapter_dtype_gap']:.3%} from it in fp32")
            + f") and renders the first validation prompt {metrics['export_check/pixel_diff']:.2f} pixel levels (mean, "
              f"of 255) from the in-training video"
            + ("" if pixel_effect is None else f", the LoRA itself changing it by {pixel_effect:.2f}"))
    if effect is not None and effect < 2 * metrics["export_check/tolerance"]:
        said += ("; the LoRA changes the prediction by less than twice the tolerance, too little for the check to "
                 "tell a lost scale from noise")
    return said


def to_pixels(frames) -> np.ndarray:
    """Float frames in [0, 1] (the renderer's) as 8-bit pixels."""
    return (np.clip(np.asarray(frames, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def stock_render(run: str, embeds: str, negative: str, device_name: str, probe: str) -> dict[str, np.ndarray]:
    """The first validation prompt from the run's export through the variant's stock pipeline, with the seed, size,
    steps, guidance and precision of the in-training validation (transformer in the variant's dtype under its
    autocast, VAE in the compute dtype), and its prediction on the `probe` input: {"export": pixels,
    "export_prediction": ...}, and for a LoRA {"base": ..., "base_prediction": ...} with the adapter off."""
    import torch
    from safetensors.torch import load_file

    from ..data.control import read_control
    from ..data.images import conditioning_image
    from ..models.adapters import apply_lora
    from ..models.family import ModelInputs
    from ..models.fp8 import store_in_fp8
    from ..models.loading import load_scheduler, load_transformer, resolve_model_path
    from ..models.trained_modules import load_trained_whole
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
    elif variant.trained_with_adapter:  # a widened control model: its base transformer and scheduler, as the card says
        parts["transformer"] = load_transformer(base, variant, revision)
        parts["scheduler"] = load_scheduler(base, variant, revision)
    pipe = variant.spec.diffusers_class("pipeline").from_pretrained(base, revision=revision, dtype=variant.dtype,
                                                                    **parts)
    if trained.mode == "lora":
        apply_lora(pipe, trained.weights_dir)
        load_trained_whole(pipe.transformer, trained.weights_dir)
        if config.model.fp8_base:  # the base the adapter was trained and rendered against, not a float8 error
            store_in_fp8(pipe.transformer, compute_dtype=variant.dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    cfg, (height, width) = config.validation, config.validation_size(0)
    image = control = None
    if cfg.images:
        image = conditioning_image(cfg.images[0], height, width, config.data.resize, "validation.images[0]")
    if cfg.controls:
        control = read_control(cfg.controls[0], config.data.num_frames, height, width, config.data,
                               "validation.controls[0]", device)

    prompt_embeds = load_file(embeds)["prompt_embeds"][None].to(device)
    negative_embeds = load_file(negative)["prompt_embeds"][None].to(device)

    def video():
        return to_pixels(render(
            pipe, variant, device, num_frames=config.data.num_frames, height=height, width=width,
            steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=image, control=control,
            cache=cfg.cache))

    probe_input = load_file(probe)
    x_t, t = probe_input["x_t"].to(device), probe_input["t"].to(device)
    inputs = ModelInputs(x_t, torch.zeros_like(x_t), t, prompt_embeds, variant.neutral_conditions(x_t))

    def prediction():
        with torch.no_grad():
            return variant.predict(pipe.transformer, x_t, t, inputs).float().cpu().numpy()

    renders = {"export": video(), "export_prediction": prediction()}
    if trained.mode == "lora":
        pipe.disable_lora()
        renders["base"], renders["base_prediction"] = video(), prediction()
    return renders


def check_export(run_dir: Path, frames, embeds: str, negative: str, device: str,
                 probe: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Render and predict in a fresh process and `compare` with the in-training `frames` and `probe`
    (`export_probe`); None (and a warning) when the process failed."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        out, probe_file = Path(folder) / "renders.npz", Path(folder) / "probe.safetensors"
        save_file(probe, str(probe_file))
        command = [sys.executable, "-m", __name__, str(run_dir), "--embeds", embeds, "--negative", negative,
                   "--probe", str(probe_file), "--device", device, "--out", str(out), "--parent", str(os.getpid())]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            logger.warning("export check: the fresh process rendering the export failed (exit %d), so the export is "
                           "unchecked; check it with cogft sample --from %s. Its last words: %s", result.returncode,
                           run_dir, result.stderr[-2000:])
            return None
        with np.load(out) as renders:
            return compare(dict(renders), frames, probe, device)


def _pixel_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _relative(a, b, scale: float) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / scale)


def compare(renders: dict[str, np.ndarray], frames, probe: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    """The export's prediction against the trained model's (`prediction_gap`, a share of the prediction's norm) held
    to `tolerance`, decided in `match`; for a LoRA the kernel noise measured in place (`prediction_noise`) and the
    adapter's own effect on the prediction. Beside them, the mean and largest absolute pixel difference (0-255)
    between the renders, and for a LoRA the mean difference the adapter makes (its render off vs training's). A
    warning when the export does not match, or its render has another shape."""
    trained = probe["trained"].numpy()
    scale = float(np.linalg.norm(trained.astype(np.float64))) or 1.0
    # DoRA, LoHa, LoKr: the stock pipeline computes their rescale / factor products in its dtype, which training's
    # autocast leaves in fp32 (it casts matmul inputs only): held to the trained model with its adapter in that dtype
    reference = probe["released"].numpy() if "released" in probe else trained
    metrics = {"export_check/prediction_gap": _relative(renders["export_prediction"], reference, scale)}
    if "released" in probe:
        metrics["export_check/adapter_dtype_gap"] = _relative(reference, trained, scale)
    if "base" in probe:
        metrics["export_check/prediction_noise"] = _relative(renders["base_prediction"], probe["base"].numpy(), scale)
        metrics["export_check/prediction_lora_effect"] = _relative(trained, probe["base"].numpy(), scale)
        tolerance = max(NOISE_MULTIPLE * metrics["export_check/prediction_noise"], FLOOR)
    else:
        tolerance = SFT_TOLERANCE.get(device.split(":")[0], SFT_TOLERANCE["cuda"])
    metrics["export_check/tolerance"] = tolerance
    pixels = to_pixels(frames)
    shaped = renders["export"].shape == pixels.shape
    if shaped:
        difference = _pixel_difference(renders["export"], pixels)
        metrics["export_check/pixel_diff"] = float(difference.mean())
        metrics["export_check/pixel_diff_max"] = float(difference.max())
        if "base" in renders:
            metrics["export_check/lora_effect"] = float(_pixel_difference(renders["base"], pixels).mean())
    else:
        metrics["export_check/pixel_diff"] = metrics["export_check/pixel_diff_max"] = 255.0
    metrics["export_check/match"] = float(shaped and metrics["export_check/prediction_gap"] <= tolerance)
    said = describe(metrics)
    if not shaped:
        logger.warning("export check: the stock pipeline rendered frames of shape %s, training %s: the export does not "
                       "reproduce the trained model's video", renders["export"].shape, pixels.shape)
    elif not metrics["export_check/match"]:
        logger.warning("export check: %s. That is beyond the tolerance: the exported weights do not reproduce the "
                       "trained model (a lost alpha or scale, missing keys?)", said)
    else:
        logger.info("export check: %s", said)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cogft.inference.check_export", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the run directory, with its final export")
    parser.add_argument("--embeds", required=True, help="the first validation prompt's cached embedding")
    parser.add_argument("--negative", required=True, help='the cached embedding of "" (the negative prompt)')
    parser.add_argument("--probe", required=True, help="the trained model's probe input (export_probe)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="where to write the renders (.npz of 8-bit frames)")
    parser.add_argument("--parent", type=int, help="end with this process (the trainer): a killed run leaves no "
                                                   "render holding the GPU")
    args = parser.parse_args(argv)
    if args.parent is not None:
        from ..data.workers import die_with

        die_with(args.parent)
    np.savez(args.out, **stock_render(args.run, args.embeds, args.negative, args.device, args.probe))


if __name__ == "__main__":
    main()
