"""RUN/clip_losses/: every trained sample's loss with its timestep and clip, one row per optimizer step and rank.

    clip_losses/rank-0.jsonl   {"step": 12, "clip": ["3f0a9c1e77b2", ...], "t": [517, ...], "loss": [0.1234, ...]}
    clip_losses/clips.json     {"schedule": 1000, "clips": {"3f0a9c1e77b2": {"video", "caption", "listed_at", "set"}}}

Rows per step rather than sums per clip: a sample costs some 30 bytes (a 10 000-step run at batch 8 writes a few
MB), a resume needs no state in the checkpoint (the rows after its step go and are redone, as metrics.jsonl's are),
and a clip's loss over the run stays readable. Each rank writes its own file (no collective in the step); readers
merge them. Nothing here imports torch: `cogft doctor --losses` reads these files alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CLIP_LOSSES_DIR = "clip_losses"
CLIPS_FILE = "clips.json"
FIX = "delete the run's clip_losses/ folder to drop the per-clip records (training records them again)"


@dataclass(frozen=True)
class Sample:
    """One trained sample's loss: the step, its clip's id (`clips.json`), its timestep."""

    step: int
    clip: str
    t: float
    loss: float


def rank_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / CLIP_LOSSES_DIR / f"rank-{rank}.jsonl"


def row(step: int, samples: list[tuple[str, float, float]]) -> str:
    """One step's JSON line of (clip id, timestep, loss): whole timesteps as integers, losses to 9 significant digits
    (an fp32 value read back exactly); non-finite losses (a skipped update) left out."""
    kept = [(clip, t, loss) for clip, t, loss in samples if math.isfinite(loss)]
    if not kept:
        return ""
    return json.dumps({"step": step, "clip": [c for c, _, _ in kept],
                       "t": [int(t) if float(t).is_integer() else float(f"{t:.6g}") for _, t, _ in kept],
                       "loss": [float(f"{loss:.9g}") for _, _, loss in kept]}, separators=(",", ":")) + "\n"


def append(path: Path, text: str) -> None:
    """Add whole lines to `path` (opened per step: a killed run leaves at most a part line, which readers drop)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(text)


def write_clips(run_dir: Path, schedule: int, clips: dict[str, dict]) -> None:
    """clips.json: each recorded id's clip (earlier ids kept, so a resume with other data still reads its rows)."""
    path = Path(run_dir) / CLIP_LOSSES_DIR / CLIPS_FILE
    known = read_clips(run_dir)[1] if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"schedule": schedule, "clips": {**known, **clips}}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def continue_records(run_dir: Path, resumed_step: int | None) -> None:
    """Make the records read as one run: a resume drops the rows after its checkpoint (the steps are redone and
    write them again, the same); a fresh start drops them all."""
    folder = Path(run_dir) / CLIP_LOSSES_DIR
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("rank-*.jsonl")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= (resumed_step or 0)]
        if len(kept) < len(lines):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
    if resumed_step is None and (folder / CLIPS_FILE).is_file():
        (folder / CLIPS_FILE).unlink()


def _step_of(line: str) -> float:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return math.inf
    return step if isinstance(step, int) and not isinstance(step, bool) else math.inf


def read_clips(run_dir: Path) -> tuple[int | None, dict[str, dict]]:
    """(the schedule's length, {clip id: its clip}) from clips.json; (None, {}) where there is none."""
    from ..records import read_json

    path = Path(run_dir) / CLIP_LOSSES_DIR / CLIPS_FILE
    if not path.is_file():
        return None, {}
    value = read_json(path, FIX, schedule=int, clips=dict)
    return value["schedule"], value["clips"]


def read_samples(run_dir: Path) -> list[Sample]:
    """Every rank's recorded samples, by step then rank; a part line at a file's end (a killed run) is left out, any
    other line that is not a row is named."""
    from ..records import damaged

    samples = []
    for path in sorted((Path(run_dir) / CLIP_LOSSES_DIR).glob("rank-*.jsonl"), key=_rank_of):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        for number, line in enumerate(lines, 1):
            try:
                value = json.loads(line)
                step, clips, ts, losses = value["step"], value["clip"], value["t"], value["loss"]
                if not (isinstance(step, int) and len(clips) == len(ts) == len(losses)):
                    raise ValueError
                samples += [Sample(step, str(c), float(t), float(loss)) for c, t, loss in zip(clips, ts, losses)]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise damaged(path, f"line {number} is not a row of step, clip, t and loss", FIX) from None
    return sorted(samples, key=lambda s: s.step)


def _rank_of(path: Path) -> int:
    digits = path.stem.removeprefix("rank-")
    return int(digits) if digits.isdigit() else 1 << 30
