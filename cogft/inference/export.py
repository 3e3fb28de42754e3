"""`cogft export`: the diffusers-format weights of a run or checkpoint, optionally merged into a pipeline."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ..config import ConfigError
from ..disk import follow_umask
from ..models.adapters import adapter_files, release_lora
from ..models.lora_formats import check_export_formats, extra_formats, write_key_formats
from ..models.trained_modules import TRAINED_MODULES
from ..run_dir import (
    TRANSFORMER_DIR,
    best_of_run,
    checkpoint_step,
    exported_step,
    is_checkpoint,
    resolve_trained,
)
from ..training.recommend import recommended_of_run
from .model_card import write_model_card
from .sampling import pipeline_with_weights, trained_variant

logger = logging.getLogger(__name__)


def trained_step(trained) -> int:
    """The step the weights are from: a checkpoint's own, else the run's export record (its max_steps before it
    kept one)."""
    if is_checkpoint(trained.weights_dir):
        return checkpoint_step(trained.weights_dir)
    return exported_step(trained.run_dir) or trained.config.train.max_steps


def export(source: str, out: str, merge: bool = False, best: bool = False, recommended: bool = False,
           formats: list[str] | None = None) -> Path:
    """Copy the LoRA file / transformer folder to `out`; with `merge`, write a whole pipeline instead; with `best`,
    of the run's checkpoint with the lowest held-out eval loss (RUN/best.json); with `recommended`, of the one
    RUN/recommended.json names (the lowest held-out eval loss within the quality limits). A LoRA is also written in
    the key formats of `formats` (`--format`; default the run's `lora.export_format`), beside the diffusers file.

    A merged LoRA is fused at its trained scale and the adapter layers removed, so the variant's stock
    pipeline `from_pretrained(out)` samples like base + LoRA with no peft at load time.
    """
    if best and recommended:
        raise ConfigError("--best and --recommended each choose a checkpoint; give one of them")
    trained = resolve_trained(best_of_run(source) if best else recommended_of_run(source) if recommended else source)
    if formats is not None:
        if merge and extra_formats(formats):
            raise ConfigError(f"--format {','.join(formats)} writes LoRA files, --merge a whole diffusers pipeline: "
                              "leave out one of them")
        check_export_formats(formats, trained.config, trained_variant(trained), key="--format")
    target = Path(out)
    if target.is_file():
        raise FileExistsError(f"--out {target} is a file; give a folder to write")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"--out {target} exists and is not empty; choose a new folder")
    target.mkdir(parents=True, exist_ok=True)
    if merge:
        pipe = pipeline_with_weights(trained, trained_variant(trained), torch.device("cpu"), release_dtype=True)
        if trained.mode == "lora":
            pipe.fuse_lora(lora_scale=1.0)
            pipe.unload_lora_weights()
        pipe.save_pretrained(target)
    else:
        variant = trained_variant(trained)
        if trained.mode == "lora":
            for file in adapter_files(trained.weights_dir):
                shutil.copy2(file, target / file.name)
            if (trained.weights_dir / TRAINED_MODULES).is_file():  # a control model's widened input
                shutil.copy2(trained.weights_dir / TRAINED_MODULES, target / TRAINED_MODULES)
            release_lora(target / adapter_files(trained.weights_dir)[0].name, trained.config, variant.dtype)
            write_key_formats(target, trained.config, variant, formats)
            card_folder = target
        else:
            shutil.copytree(trained.weights_dir / TRANSFORMER_DIR, target / TRANSFORMER_DIR)
            card_folder = target / TRANSFORMER_DIR
        write_model_card(card_folder, trained.config, variant, trained_step(trained), trained.run_dir, formats)
    follow_umask(target)  # safetensors writes 0600, and a copy keeps the mode of a run written before this fix
    logger.info("exported %s weights of %s to %s%s", trained.mode, trained.weights_dir, target,
                " (merged)" if merge else "")
    return target
