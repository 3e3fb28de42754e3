"""The run's last words: what was trained, how the loss went, where the results are, and the next command.

Read back from the run directory (metrics.jsonl, the export, samples/, checkpoints/), so it says what is on
disk, and the same after a resume as after one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import Config
from ..inference.check_export import describe
from ..records import DamagedRecordError
from ..run_dir import (
    HTML_REPORT,
    REPORT_FILE,
    SAMPLES_DIR,
    best_record,
    complete_checkpoints,
    exported_step,
    resolve_trained,
)
from .metric_rows import CHECK_KEY, EVAL_KEY, STEP_KEY, logged_rows, rows_with
from .motion import motion_lines
from .recommend import summary_line
from .trigger import trigger_lines

logger = logging.getLogger(__name__)

def loss_progress(steps: list[dict]) -> str:
    """The smoothed loss at the end and at its best, for the summary and the report."""
    best = min(steps, key=lambda row: row["loss_smoothed"])
    return (f"{steps[-1]['loss_smoothed']:.4f} at the end, best {best['loss_smoothed']:.4f} at step "
            f"{best['step']}")


def eval_lines(run_dir: Path, evals: list[dict]) -> list[str]:
    """The held-out eval loss, the best checkpoint, and for a LoRA whether it moved the eval loss at all."""
    last = evals[-1]
    first = evals[0]
    line = (f"  eval loss (held-out clips): {last['eval/loss']:.4f} at the end, {first['eval/loss']:.4f} at step "
            f"{first['step']}")
    try:
        best = best_record(run_dir)
    except DamagedRecordError as error:
        logger.warning("%s", error)
        best = None
    if best is not None:
        line += (f"; best {best['eval_loss']:.4f} at step {best['step']} "
                 f"(cogft export --from {run_dir} --out DIR --best)")
    lines = [line]
    if rows_with([last], "eval/loss_base", "eval/lora_gain"):
        base, gain = last["eval/loss_base"], last["eval/lora_gain"]
        said = f"  LoRA: eval loss {last['eval/loss']:.4f} with the adapter, {base:.4f} without: "
        if gain > 0:
            said += f"it lowers the held-out loss by {gain:.4g} ({100 * gain / base:.2f} %)"
        elif gain < 0:
            said += (f"it raises the held-out loss by {-gain:.4g} ({-100 * gain / base:.2f} %): it fits the training "
                     "clips, not the held-out ones (fewer steps or a lower train.learning_rate may help)")
        else:
            said += "it does not change the held-out loss at all (raise train.learning_rate or lora.alpha)"
        lines.append(said)
    return lines


def export_check_line(row: dict) -> str:
    """What the fresh-process render of the export says (cogft/inference/check_export.py)."""
    if not row.get("export_check/match"):
        return f"  export check: MISMATCH: {describe(row)}; the export does not reproduce the trained model"
    return f"  export check: {describe(row)}: a match"


def set_lines(config: Config, run_dir: Path, logged: list[dict]) -> list[str]:
    """With `data.sets`: each set's clips as prepare kept them, its kind and mix, and the prior set's last loss."""
    if not config.data.sets:
        return []
    try:
        kept = json.loads((run_dir / REPORT_FILE).read_text().splitlines()[-1])["summary"]["sets"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # no report (yet): the config's sets alone
        kept = {}
    parts = []
    for index, data_set in enumerate(config.data.sets):
        key = f"data.sets[{index}]"
        mixed = f"weight {data_set.weight:g}" if data_set.weight is not None else f"repeats {data_set.repeats or 1}"
        parts.append(f"{key}: {kept.get(key, {}).get('kept', '?')} clips ({data_set.kind}, {mixed})")
    lines = [f"  sets: {'; '.join(parts)}"]
    priors = rows_with(logged, "loss/prior")
    if priors:
        lines.append(f"  loss/prior (towards the base model; x{config.data.prior_weight:g} in the step): "
                     f"{priors[-1]['loss/prior']:.4g} at step {priors[-1]['step']}")
    return lines


def run_summary(config: Config, run_dir: Path, stopped: bool) -> str:
    """A few lines for the end of `cogft train` (and a stop by Ctrl-C or SIGTERM)."""
    logged = logged_rows(run_dir)
    rows = rows_with(logged, STEP_KEY)
    lines = [f"{'stopped' if stopped else 'finished'}: {config.model.path}, {config.train.mode}, "
             f"step {rows[-1]['step'] if rows else 0} of {config.train.max_steps}, in {run_dir}"]
    if rows:
        lines.append(f"  loss (smoothed): {loss_progress(rows)}")
    lines.extend(set_lines(config, run_dir, logged))
    evals = rows_with(logged, EVAL_KEY)
    if evals:
        lines.extend(eval_lines(run_dir, evals))
        lines.extend(line for line in [summary_line(run_dir)] if line)
    lines.extend(motion_lines(config, run_dir, logged))
    lines.extend(trigger_lines(config, logged))
    checks = rows_with(logged, CHECK_KEY, "export_check/prediction_gap", "export_check/tolerance")
    if checks and not stopped:
        lines.append(export_check_line(checks[-1]))
    try:
        step = exported_step(run_dir)
    except DamagedRecordError as error:
        logger.warning("%s", error)
        step = None
    if step is not None and not stopped:
        weights = resolve_trained(str(run_dir)).weights_dir
        lines.append(f"  weights: {weights} (step {step})")
    videos = sorted((run_dir / SAMPLES_DIR).glob("*.mp4"))
    if videos:
        lines.append(f"  validation videos: {len(videos)} in {run_dir / SAMPLES_DIR}, the latest {videos[-1].name}")
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        lines.append(f"  checkpoints: {', '.join(c.name for c in checkpoints)} in {checkpoints[-1].parent}")
    if (run_dir / HTML_REPORT).is_file():
        lines.append(f"  report: {run_dir / HTML_REPORT} (loss and learning-rate curves, validation videos; open it in "
                     "a browser)")
    if stopped:
        lines.append("  next: run the same command again; train.resume=latest continues from the last checkpoint")
    else:
        image = (" --image START.png" if config.validation.images else "") + (
            " --control CONTROL.mp4" if config.validation.controls else "")
        lines.append(f'  next: cogft sample --from {run_dir} --prompt "..."{image} --out sample.mp4'
                     f"   (or cogft export --from {run_dir} --out DIR)")
    return "\n".join(lines)
