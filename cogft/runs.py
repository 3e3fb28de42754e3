"""Find the weights and config behind `--from RUN_DIR_OR_CHECKPOINT`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config
from .training.adapters import LORA_WEIGHTS, TRANSFORMER_DIR
from .training.checkpointing import CHECKPOINTS, CONFIG_FILE, complete_checkpoints, is_checkpoint

LORA_DIR = "lora"


@dataclass(frozen=True)
class TrainedWeights:
    run_dir: Path
    config: Config
    weights_dir: Path  # holds pytorch_lora_weights.safetensors (LoRA) or transformer/ (SFT)
    mode: str          # "lora" | "sft"


def _weights_in(folder: Path) -> str | None:
    if (folder / LORA_WEIGHTS).is_file():
        return "lora"
    if (folder / TRANSFORMER_DIR / "config.json").is_file():
        return "sft"
    return None


def resolve_trained(source: str | Path) -> TrainedWeights:
    """A run dir gives its final export (or, mid-run, its latest checkpoint); a checkpoint gives itself."""
    path = Path(source)
    if is_checkpoint(path):
        run_dir, candidates = path.parent.parent, [path]
    elif (path / CONFIG_FILE).is_file():
        run_dir = path
        candidates = [path / LORA_DIR, path, *reversed(complete_checkpoints(path))]
    else:
        raise FileNotFoundError(
            f"--from {source}: neither a run directory (with {CONFIG_FILE}) nor a complete checkpoint "
            f"(like RUN/{CHECKPOINTS}/step-000100)"
        )
    own = candidates[0] / CONFIG_FILE  # a checkpoint keeps the config it was trained under
    config_file = own if is_checkpoint(path) and own.is_file() else run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a checkpoint must sit in RUN/{CHECKPOINTS}/ of its run")
    for folder in candidates:
        mode = _weights_in(folder)
        if mode:
            return TrainedWeights(run_dir, load_config(config_file), folder, mode)
    raise FileNotFoundError(f"--from {source}: no trained weights yet (no {LORA_DIR}/, {TRANSFORMER_DIR}/ or checkpoint)")
