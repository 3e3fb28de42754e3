"""The best checkpoint by held-out eval loss, for `cogft export --best`.

Only a checkpoint can be best (its weights are what gets exported); every checkpoint is evaluated, so the choice
is among all of them. The record travels in the training progress saved with each checkpoint, so a resume
restores what held at its checkpoint (a "best" from the steps it redoes is forgotten), and in RUN/best.json,
replaced atomically once its checkpoint is complete; `save_checkpoint` spares the checkpoint best.json names.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..run_dir import BEST_RECORD, step_dir

logger = logging.getLogger(__name__)


def improves(best: dict | None, loss: float) -> bool:
    """Whether an eval loss beats the best so far (a non-finite one never does)."""
    return math.isfinite(loss) and (best is None or loss < best["eval_loss"])


def best_entry(step: int, loss: float, eval_set: str) -> dict:
    """What the progress keeps: the step, its eval loss and which held-out set and timesteps measured it."""
    return {"step": step, "eval_loss": loss, "eval_set": eval_set}


def write_best(run_dir: Path, best: dict | None) -> None:
    """RUN/best.json as `best` says (removed for None), replaced atomically: never half a record."""
    path = run_dir / BEST_RECORD
    if best is None:
        path.unlink(missing_ok=True)
        return
    checkpoint = step_dir(run_dir, best["step"]).relative_to(run_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"step": best["step"], "eval_loss": best["eval_loss"], "checkpoint": str(checkpoint)}))
    os.replace(tmp, path)


def restored_best(best: dict | None, eval_set: str | None) -> dict | None:
    """The best a resumed run continues from: the checkpoint's, unless it was measured on another held-out set or
    other timesteps (eval.holdout, eval.timesteps or train.seed changed), which makes the losses incomparable."""
    if best is not None and best.get("eval_set") != eval_set:
        logger.info("the best checkpoint so far (step %d, eval loss %.6g) was measured on another held-out set or "
                    "timesteps; it is forgotten and the best is chosen again from here", best["step"],
                    best["eval_loss"])
        return None
    return best
