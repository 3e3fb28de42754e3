"""The rows of a run's metrics.jsonl, read back for the summary, the report, the recommended checkpoint and the
quality measures' words: one reader, and the keys that mark each kind of row."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..records import is_kind
from ..run_dir import METRICS_FILE

logger = logging.getLogger(__name__)

STEP_KEY, EVAL_KEY, CHECK_KEY = "loss_smoothed", "eval/loss", "export_check/pixel_diff"  # what marks each kind of row


def logged_rows(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl that parses as a row (an object with a whole-number step), in order (read once;
    `rows_with` picks a kind); the others (a damaged file) are counted in a warning."""
    rows, damaged = [], 0
    path = run_dir / METRICS_FILE
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and is_kind(row.get("step"), int):
            rows.append(row)
        else:
            damaged += 1
    if damaged:
        logger.warning("%s: %d damaged rows (not a JSON object with a step) left out", path, damaged)
    return rows


def rows_with(rows: list[dict], *keys: str) -> list[dict]:
    """The rows that report each of `keys` as a number."""
    return [row for row in rows if all(isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool)
                                       for key in keys)]


def logged_steps(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl that report a training step (loss, loss_smoothed, lr, ...), in order."""
    return rows_with(logged_rows(run_dir), STEP_KEY)
