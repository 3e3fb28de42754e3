"""Every name inside a run directory, finding its checkpoints, and resolving `--from RUN_OR_CHECKPOINT`.

    RUN/config.yaml                          the resolved config (each checkpoint keeps its own copy too)
    RUN/prepare_report.jsonl                 one row per listed clip
    RUN/metrics.jsonl                        one row per logged step (rows after a resume point are redone)
    RUN/wandb_run_id                         the W&B run every resume continues
    RUN/samples/step-NNNNNN-II-prompt.mp4    validation videos
    RUN/checkpoints/step-NNNNNN/             complete checkpoints (marked, renamed into place)
    RUN/lora/pytorch_lora_weights.safetensors   the LoRA export      RUN/transformer/   the SFT export
    RUN/export.json                          the step that export holds (staged and renamed into place)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, load_config

CONFIG_FILE = "config.yaml"
REPORT_FILE = "prepare_report.jsonl"
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"  # the W&B run a resumed run continues
SAMPLES_DIR = "samples"
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "cogft_complete.json"
LOCK_FILE = ".cogft.lock"  # held by the trainer writing the run; the OS releases it when that process dies
LORA_DIR = "lora"
EXPORT_RECORD = "export.json"  # the step the final lora/ or transformer/ holds
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def hold(run_dir: Path):
    """An exclusive hold on `run_dir` for one trainer: a second one is refused by name while the first lives. The
    hold is an OS file lock, so a killed trainer leaves nothing that blocks the resume."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"output_dir {run_dir} is in use by another running cogft train; wait for it to end, or "
                          "choose another output_dir") from None
    return lock


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint folder `step-NNNNNN` was written at."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step-NNNNNN)")
    return int(match.group(1))


def sample_path(run_dir: Path, step: int, index: int, prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
    return run_dir / SAMPLES_DIR / f"step-{step:06d}-{index:02d}-{slug}.mp4"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first; half-written ones never have the marker."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the sizes its marker recorded (a file deleted
    or truncated since), or None. Markers of earlier versions record no sizes and pass."""
    recorded = json.loads((path / COMPLETE_MARKER).read_text()).get("files", {})
    for name, size in sorted(recorded.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is truncated or changed ({file.stat().st_size} of {size} bytes)"
    return None


@dataclass(frozen=True)
class TrainedWeights:
    run_dir: Path
    config: Config
    weights_dir: Path  # holds pytorch_lora_weights.safetensors (LoRA) or transformer/ (SFT)
    mode: str          # "lora" | "sft"


def exported_step(run_dir: Path) -> int | None:
    """The step of the run's final export, or None (no export, or one written before the step was recorded)."""
    record = run_dir / EXPORT_RECORD
    return json.loads(record.read_text())["step"] if record.is_file() else None


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
        newest_first = list(reversed(complete_checkpoints(path)))
        export_step = exported_step(path)
        if newest_first and export_step is not None and checkpoint_step(newest_first[0]) > export_step:
            candidates = [*newest_first, path / LORA_DIR, path]  # a finished run extended since its export
        else:
            candidates = [path / LORA_DIR, path, *newest_first]
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
    raise FileNotFoundError(
        f"--from {source}: no trained weights yet (no {LORA_DIR}/, {TRANSFORMER_DIR}/ or checkpoint)")
