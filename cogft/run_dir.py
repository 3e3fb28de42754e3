"""Every name inside a run directory, finding its checkpoints, and resolving `--from RUN_OR_CHECKPOINT`.

    RUN/config.yaml                          the resolved config (each checkpoint keeps its own copy too)
    RUN/prepare_report.jsonl                 one row per listed clip
    RUN/metrics.jsonl                        one row per logged step (rows after a resume point are redone)
    RUN/clip_losses/                         each trained sample's loss, timestep and clip (training/clip_records.py)
    RUN/wandb_run_id                         the W&B run every resume continues
    RUN/samples/step-NNNNNN-II-prompt.mp4    validation videos
    RUN/samples/base/step-000000-II-prompt.mp4, motion.json   a LoRA run's base-model renders and their motion
    RUN/checkpoints/step-NNNNNN/             complete checkpoints (marked, renamed into place)
    RUN/lora/pytorch_lora_weights.safetensors   the LoRA export      RUN/transformer/   the SFT export
    RUN/export.json                          the step that export holds (staged and renamed into place)
    RUN/best.json                            the checkpoint with the lowest held-out eval loss (eval.holdout)
    RUN/recommended.json                     the recommended checkpoint and why (training/recommend.py)
    RUN/raw/lora/ or RUN/raw/transformer/    with train.ema_decay: the trained weights beside the averaged export
    RUN/report.html, RUN/curves.png          the end-of-run report: loss and learning-rate curves, validation videos
    RUN/tensorboard/                         TensorBoard event files (tracking.report_to=tensorboard)
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError
from .config_file import load_config
from .records import DamagedRecordError, damaged, has_fields, is_kind, read_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
REPORT_FILE = "prepare_report.jsonl"
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"  # the W&B run a resumed run continues
SAMPLES_DIR = "samples"
BASE_SAMPLES_DIR = f"{SAMPLES_DIR}/base"  # each validation prompt rendered with the adapter off (the motion guard)
MOTION_RECORD = "motion.json"  # in BASE_SAMPLES_DIR: each base render's settings key and motion
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "cogft_complete.json"
LOCK_FILE = ".cogft.lock"  # held by the trainer writing the run; the OS releases it when that process dies
LORA_DIR = "lora"
EXPORT_RECORD = "export.json"  # the step the final lora/ or transformer/ holds
BEST_RECORD = "best.json"  # the checkpoint with the lowest eval loss: its step, loss and folder
RECOMMENDED_RECORD = "recommended.json"  # the lowest eval loss within the quality limits: its step and the reason
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# LoHa / LoKr (`lora.type`), which the stock `load_lora_weights` cannot read: peft's own files, under peft's names
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
TRANSFORMER_DIR = "transformer"
RAW_EXPORT_DIR = "raw"  # with train.ema_decay: the trained weights without averaging, as raw/lora/ or raw/transformer/
HTML_REPORT = "report.html"  # written at the end of a run, finished or stopped
CURVES_IMAGE = "curves.png"  # the report's curves as an image
TENSORBOARD_DIR = "tensorboard"
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


def base_sample_path(run_dir: Path, index: int, prompt: str) -> Path:
    """Validation prompt `index` rendered with the adapter off: named as a step-0 sample, in samples/base/."""
    return run_dir / BASE_SAMPLES_DIR / sample_path(run_dir, 0, index, prompt).name


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


def best_record(run_dir: Path) -> dict | None:
    """RUN/best.json: the step, eval loss and checkpoint folder (relative to the run) of the best so far, or None.
    Raises DamagedRecordError for one that is not what `write_best` writes."""
    path = run_dir / BEST_RECORD
    if not path.exists():  # a folder in its place is named below
        return None
    fix = (f"choose a checkpoint yourself (metrics.jsonl's eval/loss rows say which step was best) and give it as "
           f"--from {run_dir / CHECKPOINTS}/step-NNNNNN without --best; or delete {path.name} (the next checkpoint "
           "that improves the eval loss writes it again)")
    record = read_json(path, fix, step=int, eval_loss=float, checkpoint=str)
    expected = str(step_dir(run_dir, record["step"]).relative_to(run_dir))
    if record["step"] < 0 or Path(record["checkpoint"]) != Path(expected):
        raise damaged(path, f"'checkpoint' is {record['checkpoint'][:80]!r}, not {expected!r} of its step "
                            f"{record['step']}", fix)
    return record


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint RUN/best.json names (kept through `train.checkpoints_keep` rotation), or None."""
    record = best_record(run_dir)
    return None if record is None else run_dir / record["checkpoint"]


def run_of(source: str | Path, flag: str) -> Path:
    """The run directory `--from` names for `flag`, which picks one of its checkpoints (--best, --recommended)."""
    run_dir = Path(source)
    _must_exist(run_dir)
    if is_checkpoint(run_dir):
        raise ConfigError(f"{flag} picks a checkpoint of a run: give --from the run directory "
                          f"({run_dir.parent.parent}), not the checkpoint {run_dir.name}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--from {source}: not a run directory (no {CONFIG_FILE})")
    return run_dir


def best_of_run(source: str | Path) -> Path:
    """`--best`: the run's checkpoint with the lowest held-out eval loss, as its best.json names it."""
    run_dir = run_of(source, "--best")
    best = best_checkpoint(run_dir)
    if best is None:
        raise ConfigError(f"--best: {run_dir} has no best checkpoint (no {BEST_RECORD}); one is recorded when a run "
                          "measures a held-out eval loss: train with eval.holdout set (e.g. eval.holdout=8), or leave "
                          "out --best for the newest weights")
    if not is_checkpoint(best):
        raise FileNotFoundError(f"--best: {run_dir / BEST_RECORD} names {best}, which is not a complete checkpoint "
                                "(moved or deleted); leave out --best, or give --from one of the run's checkpoints")
    return best


def checkpoint_damage(path: Path, only: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a complete checkpoint's files against the sizes its marker recorded (a file deleted
    or truncated since), or None. Markers of earlier versions record no sizes and pass. `only`: the top-level
    files and folders to check (sampling reads the weights, not the optimizer states)."""
    marker = path / COMPLETE_MARKER
    try:
        recorded = has_fields(read_json(marker, ""), marker, "").get("files", {})
    except DamagedRecordError as error:
        return str(error)
    if not isinstance(recorded, dict) or not all(is_kind(size, int) for size in recorded.values()):
        return f"{marker} is damaged (its 'files' is not a map of file names to sizes)"
    for name, size in sorted(recorded.items()):
        if only and Path(name).parts[0] not in only:
            continue
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
    """The step of the run's final export, or None (no export, or one written before the step was recorded).
    Raises DamagedRecordError for a record that is not what `save_export` writes."""
    path = run_dir / EXPORT_RECORD
    if not path.exists():
        return None
    fix = (f"it says which step {LORA_DIR}/ or {TRANSFORMER_DIR}/ holds: give --from one of the run's checkpoints "
           f"instead, or delete {path.name} (the export is then taken as the run's newest weights)")
    step = read_json(path, fix, step=int)["step"]
    if step < 0:
        raise damaged(path, f"'step' is {step}", fix)
    return step


def adapter_file(folder: Path) -> Path | None:
    """The adapter weights in `folder`: the diffusers LoRA file (LoRA, DoRA) or peft's (LoHa, LoKr)."""
    return next((folder / name for name in (LORA_WEIGHTS, PEFT_WEIGHTS) if (folder / name).is_file()), None)


def _weights_in(folder: Path) -> str | None:
    if adapter_file(folder) is not None:
        return "lora"
    if (folder / TRANSFORMER_DIR / "config.json").is_file():
        return "sft"
    return None


def safetensors_length(header: bytes) -> int:
    """How long a safetensors file with this JSON header is: the 8-byte length, the header, and its tensors up to
    where the last one ends. Raises (ValueError, KeyError, ...) for a header that is not one."""
    ends = [entry["data_offsets"][1] for key, entry in json.loads(header).items() if key != "__metadata__"]
    return 8 + len(header) + max(ends, default=0)


def _safetensors_damage(file: Path) -> str | None:
    """A safetensors file cut short or overwritten: its header says where its last tensor ends. The final export
    records no sizes, so this is what finds a partial copy of it."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = handle.read(header_size) if 8 + header_size <= size else b""
    try:
        expected = safetensors_length(header)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{file} is not a whole safetensors file (its header is cut or unreadable)"
    return None if size == expected else f"{file} is truncated or changed ({size} of {expected} bytes)"


def _weights_damage(folder: Path) -> str | None:
    """What is wrong with the weights `sample` and `export` would load from `folder` (a checkpoint, RUN/lora or, for
    SFT, RUN), or None: the checkpoint's recorded sizes (the check a resume makes), the JSON files beside the
    weights (an SFT transformer's config and shard index), then each safetensors file."""
    if is_checkpoint(folder) and (damage := checkpoint_damage(folder, only=(LORA_WEIGHTS, PEFT_WEIGHTS,
                                                                              PEFT_CONFIG, TRANSFORMER_DIR,
                                                                              CONFIG_FILE))):
        return damage
    for record in sorted((folder / TRANSFORMER_DIR).glob("*.json")):
        try:
            has_fields(read_json(record, ""), record, "")
        except DamagedRecordError as error:
            return str(error)
    files = [adapter] if (adapter := adapter_file(folder)) is not None else []
    for file in [*files, *sorted((folder / TRANSFORMER_DIR).glob("*.safetensors"))]:
        if damage := _safetensors_damage(file):
            return damage
    return None


def _newest_intact(run_dir: Path) -> tuple[tuple[Path, str] | None, list[str]]:
    """The run's newest weights that are whole (folder, mode), or None, and what is wrong with each newer one.
    Newest by step: a checkpoint newer than the export (a run stopped before its end, or extended since) comes
    first; the export wins a tie (the same weights, in the dtype a release ships) and comes first when its step
    was not recorded (exports of earlier versions)."""
    newest_first = list(reversed(complete_checkpoints(run_dir)))
    export_step = exported_step(run_dir)
    newer = [p for p in newest_first if export_step is not None and checkpoint_step(p) > export_step]
    damaged = []
    for folder in [*newer, run_dir / LORA_DIR, run_dir, *newest_first[len(newer):]]:
        mode = _weights_in(folder)
        if mode is None:
            continue
        damage = _weights_damage(folder)
        if damage is None:
            return (folder, mode), damaged
        damaged.append(damage)
    return None, damaged


def resolve_trained(source: str | Path) -> TrainedWeights:
    """`--from`: a run directory gives its newest intact weights (see `_newest_intact`), with a warning naming each
    damaged newer one: the folder names the run, not a step, so its best whole weights are what was asked for. A
    checkpoint gives itself, and a damaged one is refused with the run's newest intact weights offered: it names
    exact weights, so no others are taken in silence. Damaged weights are never loaded."""
    path = Path(source)
    _must_exist(path)
    if is_checkpoint(path):
        run_dir = path.parent.parent
        config_file = path / CONFIG_FILE if (path / CONFIG_FILE).is_file() else run_dir / CONFIG_FILE
    elif (path / CONFIG_FILE).is_file():
        run_dir, config_file = path, path / CONFIG_FILE
    else:
        raise FileNotFoundError(
            f"--from {source}: neither a run directory (with {CONFIG_FILE}) nor a complete checkpoint "
            f"(like RUN/{CHECKPOINTS}/step-000100)"
        )
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a checkpoint must sit in RUN/{CHECKPOINTS}/ of its run")
    if is_checkpoint(path):
        mode = _weights_in(path)
        if mode is None:
            raise FileNotFoundError(f"--from {source}: no trained weights in this checkpoint "
                                    f"(no {LORA_WEIGHTS} or {TRANSFORMER_DIR}/)")
        if damage := _weights_damage(path):
            intact, _ = _newest_intact(run_dir)
            fix = f"{run_dir} holds no intact weights"
            if intact is not None:  # --from RUN gives its export; a checkpoint is given as itself
                offer = intact[0] if is_checkpoint(intact[0]) else run_dir
                fix = f"use the newest intact weights of its run with --from {offer}"
            raise ConfigError(f"--from {source}: the checkpoint is damaged: {damage}; {fix}")
        return TrainedWeights(run_dir, _run_config(config_file), path, mode)
    intact, damaged = _newest_intact(path)
    if intact is None and damaged:
        raise ConfigError(f"--from {source}: all of the run's trained weights are damaged: {'; '.join(damaged)}")
    if intact is None:
        raise FileNotFoundError(
            f"--from {source}: no trained weights yet (no {LORA_DIR}/, {TRANSFORMER_DIR}/ or checkpoint)")
    for damage in damaged:
        logger.warning("--from %s: skipping damaged weights: %s; using %s", source, damage, intact[0])
    return TrainedWeights(path, _run_config(config_file), *intact)


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"--from {path}: no such folder; give a run directory (output_dir of a run) or one "
                                f"of its checkpoints (RUN/{CHECKPOINTS}/step-NNNNNN)")
    if not path.is_dir():
        raise FileNotFoundError(f"--from {path}: a file, not a folder; give a run directory (output_dir of a run) or "
                                f"one of its checkpoints (RUN/{CHECKPOINTS}/step-NNNNNN)")


def _run_config(path: Path) -> Config:
    """The config a run or checkpoint was trained under, as cogft saved it; a damaged copy is named as such."""
    fix = ("it is the config the weights were trained under: restore it from a copy (each checkpoint and the run "
           "directory hold one), or write it again from the YAML you trained with")
    try:
        path.read_bytes().decode("utf-8")
        return load_config(path)
    except UnicodeDecodeError as error:
        raise damaged(path, f"not UTF-8 text: byte {error.start}", fix) from None
    except ConfigError as error:
        raise DamagedRecordError(f"the run's saved config does not load: {error}; {fix}") from None

