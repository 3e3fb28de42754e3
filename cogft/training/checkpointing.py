"""Checkpoints that are complete or absent, and resume from the latest complete one.

accelerate's `save_state` writes the optimizer, lr scheduler, loss scaler, RNG states, data sampler
and our progress counter; the hooks below replace its model file with the diffusers-format weights
(LoRA file or transformer folder), so any checkpoint can be sampled or exported directly. A
checkpoint is written under a temporary name, marked complete, then renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..config_file import save_config
from ..disk import disk_full_error, folder_bytes, follow_umask, is_disk_full
from ..inference.model_card import write_model_card
from ..models.adapters import load_lora_state, load_transformer_state, release_lora, save_lora, save_transformer
from ..models.family import Variant
from ..models.lora_formats import extra_formats, write_key_formats
from ..records import DamagedRecordError, read_yaml
from ..run_dir import (
    CHECKPOINTS,
    COMPLETE_MARKER,
    CONFIG_FILE,
    EXPORT_RECORD,
    LORA_DIR,
    TRANSFORMER_DIR,
    best_checkpoint,
    checkpoint_damage,
    complete_checkpoints,
    is_checkpoint,
    step_dir,
)
from ..seeding import mixed_seed
from .backends import full_state_dict
from .best import write_best
from .recommend import recommended_checkpoint

logger = logging.getLogger(__name__)


class ResumeError(ConfigError):
    """`train.resume` points at something that cannot be resumed from."""


class TrainingProgress:
    """The counters that must survive a restart; saved by accelerate as a custom object."""

    def __init__(self) -> None:
        self.global_step = 0      # optimizer steps
        self.micro_batches = 0    # batches consumed: the data position (an epoch's last step may be short)
        self.skipped_steps = 0    # non-finite steps
        self.loss_smoothed: float | None = None  # the smoothed loss curve's state, so a resume continues it
        self.best: dict | None = None  # the best checkpoint so far by eval loss (training/best.py), as of this step
        self.evals: dict | None = None  # the held-out set and the step its eval losses start after (recommend.py)

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "micro_batches": self.micro_batches,
                "skipped_steps": self.skipped_steps, "loss_smoothed": self.loss_smoothed, "best": self.best,
                "evals": self.evals}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.micro_batches = int(state["micro_batches"])
        self.skipped_steps = int(state["skipped_steps"])
        self.loss_smoothed = state.get("loss_smoothed")  # absent in checkpoints of earlier versions
        self.best = state.get("best")
        self.evals = state.get("evals")


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`latest` → newest complete checkpoint (None on a fresh run); a path must be a complete checkpoint.

    Resuming from an older checkpoint while newer ones of the same run exist is refused: the new
    trajectory would mix with the old one, and `latest` would later pick the old one up.
    """
    found = complete_checkpoints(run_dir)
    if resume is None:
        if found:  # a fresh run here would interleave its checkpoints with the old run's
            raise ResumeError(
                f"train.resume=null but {run_dir} already holds checkpoints ({found[-1].name} the newest): use a "
                f"new output_dir, move {run_dir / CHECKPOINTS} away, or continue with train.resume=latest"
            )
        return None
    if resume == "latest":
        if found:
            _refuse_damaged(found[-1], found)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise ResumeError(f"train.resume={resume!r}: {'a file, not a folder' if path.exists() else 'no such folder'}; "
                          f"use 'latest', null, or a checkpoint folder like {step_dir(run_dir, 500)}")
    if not is_checkpoint(path):
        raise ResumeError(
            f"train.resume={resume!r}: not a complete cogft checkpoint (no {COMPLETE_MARKER}); "
            f"use 'latest', null, or a folder like {step_dir(run_dir, 500)}"
        )
    _refuse_damaged(path, found)
    newer = [p.name for p in found if p.name > path.name and p.resolve().parent == path.resolve().parent
             and checkpoint_damage(p) is None]  # a damaged newer checkpoint does not stand in the way
    if newer:
        raise ResumeError(
            f"train.resume={resume!r}: the run already has newer checkpoints ({', '.join(newer)}); move them out "
            f"of {path.resolve().parent} to branch from this one, or use train.resume=latest"
        )
    return path


def _refuse_damaged(checkpoint: Path, found: list[Path]) -> None:
    """Name the damaged file of the checkpoint a resume would load, and the intact checkpoint to take instead."""
    damage = checkpoint_damage(checkpoint)
    if damage is None:
        return
    intact = [p for p in found if p.name < checkpoint.name and checkpoint_damage(p) is None]
    fix = (f"resume from the previous intact one with train.resume={intact[-1]}" if intact
           else "no earlier intact checkpoint: move this one away and start again")
    raise ResumeError(f"checkpoint {checkpoint} is damaged: {damage}; {fix}")


# Keys whose change makes a checkpoint meaningless (other weights, shapes or data); the rest may change.
UNSAFE_ON_RESUME = (
    "model.path", "model.revision", "model.dtype", "train.mode", "train.optimizer", "lora.rank", "lora.alpha",
    "lora.target_modules", "data.num_frames", "data.height", "data.width", "data.fps", "data.resize", "data.buckets",
    "data.image_batch_size", "train.ema_decay",
    "lora.type", "lora.rslora", "lora.plus_ratio",  # other weights, their scale, the optimizer's param groups
)


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted keys whose values differ between two config dicts: {key: (old, new)}."""
    changes = {}
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    changes[f"{section}.{key}"] = (a.get(key), b.get(key))
        elif a != b:
            changes[section] = (a, b)
    return changes


def check_resume_config(config: Config, checkpoint: Path) -> dict[str, tuple]:
    """Refuse a resume whose config changed an unsafe key; return the safe changes to log."""
    saved = checkpoint / CONFIG_FILE
    old = read_yaml(saved, "resume from another checkpoint with train.resume=PATH, or restore the file from "
                           f"{checkpoint.parent.parent / CONFIG_FILE} if the config did not change since") \
        if saved.is_file() else {}
    changes = config_changes(old, config.model_dump(mode="json"))
    unsafe = {k: v for k, v in changes.items() if k in UNSAFE_ON_RESUME}
    if unsafe:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise ResumeError(
            f"cannot resume from {checkpoint}: {listed} changed since the checkpoint was written. Put it back, "
            "or train with this setting under a new output_dir"
        )
    return changes


def save_weights(accelerator, model, config: Config, lora_dir: Path, transformer_parent: Path, lora_format,
                 dtype: torch.dtype | None = None) -> Path | None:
    """The trained weights in diffusers format: the LoRA into `lora_dir` (in `Variant.lora_format`), or
    `transformer_parent/transformer`; with `dtype` (an export), cast to it (the LoRA as `lora.export_dtype` says,
    with its release metadata). Sharded weights (ZeRO-3, FSDP) are gathered first, a collective: every rank calls
    this; the main process writes and gets the path, the others None."""
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    module = accelerator.unwrap_model(model)
    if config.train.mode == "lora":
        written = save_lora(module, config, lora_dir, lora_format, model_state=state)
        written = written if dtype is None else release_lora(written, config, dtype)
    else:
        written = save_transformer(module, transformer_parent, dtype=dtype, model_state=state)
    follow_umask(Path(written))  # safetensors writes 0600
    return written


def save_release(accelerator, model, config: Config, lora_dir: Path, transformer_parent: Path,
                 variant: Variant) -> Path | None:
    """The trained weights as released: `save_weights` in the variant's dtype and, for a LoRA, each
    `lora.export_format` file beside it. A collective; the main process gets the path."""
    written = save_weights(accelerator, model, config, lora_dir, transformer_parent, variant.lora_format,
                           dtype=variant.dtype)
    if written is not None and config.train.mode == "lora":
        write_key_formats(lora_dir, config, variant)
    return written


def save_export(accelerator, model, config: Config, run_dir: Path, step: int, variant: Variant) -> Path | None:
    """The final lora/ or transformer/, written like a checkpoint: staged whole, then renamed into place (a kill
    leaves the previous export or none, never half a file), with its step in RUN/export.json so `--from RUN`
    can tell it from a newer checkpoint. A collective, like `save_weights`; the main process gets the path.
    A failed write (a full disk) removes the staged files and leaves the previous export as it was. The export
    is in the variant's dtype, with a model card (README.md) and the first validation prompt's latest video."""
    staging = run_dir / ".export.partial"
    name = LORA_DIR if config.train.mode == "lora" else TRANSFORMER_DIR
    record = run_dir / f".{EXPORT_RECORD}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        written = save_release(accelerator, model, config, staging / LORA_DIR, staging, variant)
        if accelerator.is_main_process:
            write_model_card(staging / name, config, variant, step, run_dir)
            record.write_text(json.dumps({"step": step, "what": name}))  # the last write, before anything moves
    except BaseException as error:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            record.unlink(missing_ok=True)
        if is_disk_full(error):
            needed = _weights_bytes(accelerator.unwrap_model(model), config, variant.dtype)
            raise disk_full_error(f"the final export {run_dir / name}", run_dir, needed,
                                  _export_advice(run_dir, name, step)) from error
        raise
    final = None
    if accelerator.is_main_process:
        final = run_dir / written.relative_to(staging)
        target, old = run_dir / name, run_dir / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        (staging / name).rename(target)
        record.replace(run_dir / EXPORT_RECORD)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _weights_bytes(module: torch.nn.Module, config: Config, dtype: torch.dtype) -> int:
    """Roughly what an export writes: the LoRA's weights in float32, once more for each `lora.export_format` file
    beside it, or the whole transformer in `dtype`."""
    if config.train.mode == "lora":
        copies = 1 + len(extra_formats(config.lora.export_format))
        return copies * sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def _export_advice(run_dir: Path, name: str, step: int) -> str:
    """What is left after a failed export, and the two ways to get the weights out."""
    kept = f"the previous {name}/ is intact" if (run_dir / name).exists() else f"no {name}/ was written"
    advice = (f"The partial export was removed and {kept}. Free space there, then rerun the same command with "
              f"train.resume=latest: it resumes at step {step} and exports")
    checkpoint = step_dir(run_dir, step)
    if is_checkpoint(checkpoint):
        advice += f"; or write the weights to another disk with `cogft export --from {checkpoint} --out DIR`"
    return advice


def register_weight_hooks(accelerator, config: Config, lora_format) -> None:
    """Make accelerate save/load the diffusers-format weights instead of its own model file.

    Under DeepSpeed/FSDP accelerate also writes the backend's own (sharded) model and optimizer states,
    which are what a resume loads; the diffusers-format copy is for sampling and export.
    """

    def save_hook(models, weights, output_dir):
        for model in models:
            save_weights(accelerator, model, config, Path(output_dir), Path(output_dir), lora_format)
            if weights:
                weights.pop()

    def load_hook(models, input_dir):  # DeepSpeed and FSDP restore their own (sharded) weights: no models here
        while models:
            model = models.pop()
            if config.train.mode == "lora":
                load_lora_state(model, input_dir, lora_format)
            else:
                load_transformer_state(model, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, config: Config, best: dict | None = None) -> Path:
    """Write checkpoints/step-N (with the config it was trained under) atomically; with `best` (this checkpoint is
    the new best by eval loss) RUN/best.json names it once it is complete; prune beyond `keep`, sparing the one
    RUN/best.json names."""
    started = time.perf_counter()
    final = step_dir(run_dir, step)
    staging = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    with _partial_removed_on_failure(accelerator, run_dir, final, staging):
        accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _partial_removed_on_failure(accelerator, run_dir, final, staging):
            save_config(config, staging / CONFIG_FILE)
            follow_umask(staging)  # whatever each writer (accelerate, a backend, safetensors) made of the modes
            files = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
            (staging / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time(), "files": files}))
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        staging.rename(final)
        if best is not None:
            write_best(run_dir, best)
        prune_checkpoints(run_dir, keep)
        logger.info("checkpoint %s written in %.2f s", final, time.perf_counter() - started)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints, sparing the ones RUN/best.json and RUN/recommended.json
    name (the best by eval loss and the recommended one outlive the rotation)."""
    try:
        spared = {best_checkpoint(run_dir), recommended_checkpoint(run_dir)}
    except DamagedRecordError as error:  # which checkpoint is best is unknown: losing it cannot be undone
        logger.warning("no checkpoint pruned: %s", error)
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        if old not in spared:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _partial_removed_on_failure(accelerator, run_dir: Path, final: Path, staging: Path) -> Iterator[None]:
    """Whatever stops a checkpoint's writing, remove the partial one; a full disk or another OSError is named with
    the fix. The training state in memory is untouched, so the run stops with the previous checkpoint resumable."""
    try:
        yield
    except BaseException as error:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        found = complete_checkpoints(run_dir)
        kept = (f"the previous checkpoint is intact ({found[-1].name})" if found
                else "there was no earlier checkpoint to keep (a rerun starts from step 0)")
        if is_disk_full(error):
            raise disk_full_error(
                f"checkpoint {final}", final.parent, _checkpoint_bytes(accelerator, found),
                f"The partial checkpoint was removed and {kept}. Free space there (older checkpoints can go; a lower "
                f"train.checkpoints_keep keeps fewer), or move {run_dir} to a disk with room and set output_dir to it; "
                "then rerun with train.resume=latest",
            ) from error
        if isinstance(error, OSError):
            raise OSError(f"writing checkpoint {final} failed ({error}); {kept}. Fix the cause, then rerun with "
                          "train.resume=latest") from error
        raise


def _checkpoint_bytes(accelerator, found: list[Path]) -> int:
    """Roughly what a checkpoint takes: the last one's size, or, before the first, the trainable weights and the
    optimizer's state in memory."""
    if found:
        return folder_bytes(found[-1])
    total = 0
    for optimizer in accelerator._optimizers:  # the prepared ones, as save_state walks them
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = [v for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v)]
                total += sum(t.numel() * t.element_size() for t in (param, *state))
    return total


def load_checkpoint(accelerator, path: Path) -> None:
    """Load a checkpoint's states; one whose files do not load (bytes changed in place, which the recorded sizes
    cannot see) is named with the intact one before it, never a traceback."""
    import pickle

    from safetensors import SafetensorError

    started = time.perf_counter()
    try:
        states = path / f"random_states_{accelerator.process_index}.pkl"
        if states.is_file():  # accelerate goes on without them, logging "Could not load random states" at info
            torch.load(states, weights_only=False)
        accelerator.load_state(str(path))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError, OSError,
            pickle.UnpicklingError, SafetensorError) as error:
        found = complete_checkpoints(path.parent.parent)
        intact = [p for p in found if p.name < path.name and checkpoint_damage(p) is None]
        fix = (f"move it out of {path.parent} and rerun: train.resume=latest then takes {intact[-1].name}" if intact
               else "no earlier intact checkpoint: move it away and start again")
        raise ResumeError(f"checkpoint {path} is damaged: its states do not load ({type(error).__name__}: "
                          f"{str(error)[:300]}); {fix}") from error
    logger.info("resumed from %s in %.2f s", path, time.perf_counter() - started)


def sample_generators(seed: int, step: int, micro_step: int, first_position: int, count: int,
                      device: torch.device) -> list[torch.Generator]:
    """One RNG per sample, seeded by (seed, step, micro-step, place in the global batch): a resumed run
    draws the same noise as an uninterrupted one, however the batch is split over processes."""
    generators = []
    for position in range(first_position, first_position + count):
        generators.append(torch.Generator(device=device).manual_seed(mixed_seed(seed, step, micro_step, position)))
    return generators
