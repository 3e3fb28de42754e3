"""The run's last words: what was trained, how the loss went, where the results are, and the next command.

Read back from the run directory (metrics.jsonl, the export, samples/, checkpoints/), so it says what is on
disk, and the same after a resume as after one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config
from ..run_dir import METRICS_FILE, SAMPLES_DIR, complete_checkpoints, exported_step, resolve_trained


def _losses(run_dir: Path) -> list[dict]:
    rows = []
    path = run_dir / METRICS_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss_smoothed" in row:
            rows.append(row)
    return rows


def run_summary(config: Config, run_dir: Path, stopped: bool) -> str:
    """A few lines for the end of `cogft train` (and a stop by Ctrl-C or SIGTERM)."""
    rows = _losses(run_dir)
    lines = [f"{'stopped' if stopped else 'finished'}: {config.model.path}, {config.train.mode}, "
             f"step {rows[-1]['step'] if rows else 0} of {config.train.max_steps}, in {run_dir}"]
    if rows:
        best = min(rows, key=lambda row: row["loss_smoothed"])
        lines.append(f"  loss (smoothed): {rows[-1]['loss_smoothed']:.4f} at the end, best {best['loss_smoothed']:.4f} "
                     f"at step {best['step']}")
    step = exported_step(run_dir)
    if step is not None and not stopped:
        weights = resolve_trained(str(run_dir)).weights_dir
        lines.append(f"  weights: {weights} (step {step})")
    videos = sorted((run_dir / SAMPLES_DIR).glob("*.mp4"))
    if videos:
        lines.append(f"  validation videos: {len(videos)} in {run_dir / SAMPLES_DIR}, the latest {videos[-1].name}")
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        lines.append(f"  checkpoints: {', '.join(c.name for c in checkpoints)} in {checkpoints[-1].parent}")
    if stopped:
        lines.append("  next: run the same command again; train.resume=latest continues from the last checkpoint")
    else:
        image = " --image START.png" if config.validation.images else ""
        lines.append(f'  next: cogft sample --from {run_dir} --prompt "..."{image} --out sample.mp4'
                     f"   (or cogft export --from {run_dir} --out DIR)")
    return "\n".join(lines)
