"""The recommended checkpoint: the lowest held-out eval loss among the checkpoints whose quality measures keep to
`quality.min_motion_ratio` and `quality.max_bleed` (docs/quality.md, "Choosing a checkpoint").

`recommend` decides from metrics.jsonl's rows alone (a pure function, so a written metrics file shows the rule):
- a candidate is a checkpoint with an `eval/loss` at its own step (the loss of exactly its weights; a Ctrl-C's
  checkpoint has none) measured on the run's current held-out set;
- its measures are those logged at its step, else the latest logged before it (a measure logged later describes
  later weights); a measure never logged by then, or logged as NaN, does not exclude it;
- it is acceptable when its motion ratio >= `quality.min_motion_ratio` and its bleed <= `quality.max_bleed`;
- the acceptable one with the lowest eval loss is recommended, the earlier on a tie; when none is acceptable none is
  recommended (the record says why; `cogft export --best` still takes the lowest eval loss).

The trainer rewrites RUN/recommended.json (atomically) after each checkpoint and validation, so it always says what
the rule says of the run so far; the rotation of `train.checkpoints_keep` spares the checkpoint it names (and the one
it named before the newest checkpoint, until the next one). A resume recomputes it from metrics.jsonl as cut back
to the checkpoint, so it matches the uninterrupted run's; eval losses of another held-out set (eval.holdout,
eval.timesteps or train.seed changed on resume) are not compared with the new ones (`comparable_evals`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, QualityConfig
from ..records import DamagedRecordError, damaged, is_kind, read_json
from ..run_dir import (
    BEST_RECORD,
    RECOMMENDED_RECORD,
    checkpoint_step,
    complete_checkpoints,
    is_checkpoint,
    run_of,
    step_dir,
)
from .metric_rows import EVAL_KEY, logged_rows

logger = logging.getLogger(__name__)

MOTION, BLEED, TRIGGER_GAIN = "quality/motion_ratio", "quality/bleed", "eval/trigger_gain"


@dataclass(frozen=True)
class Limit:
    key: str      # the metric
    label: str    # in sentences
    setting: str  # the config key that sets it
    bound: float
    at_least: bool  # True: the value must be >= bound; False: <= bound

    def broken_by(self, value: float) -> bool:
        return value < self.bound if self.at_least else value > self.bound

    def describe(self) -> str:
        return f"{self.label} {'>=' if self.at_least else '<='} {self.bound:g}"


def limits(quality: QualityConfig) -> list[Limit]:
    return [Limit(MOTION, "motion ratio", "quality.min_motion_ratio", quality.min_motion_ratio, True),
            Limit(BLEED, "bleed", "quality.max_bleed", quality.max_bleed, False)]


def _logged(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of each row logging `key` as a number that is not NaN, in file order."""
    return [(row["step"], float(row[key])) for row in rows
            if isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool) and not math.isnan(row[key])]


def measure_at(logged: list[tuple[int, float]], step: int) -> tuple[float, int] | None:
    """(value, step measured) of the measurement that belongs to a checkpoint at `step`: the one at its step, else the
    latest before it; None when none was taken by then."""
    earlier = [(at, index) for index, (at, _) in enumerate(logged) if at <= step]
    if not earlier:
        return None
    at, index = max(earlier)  # the latest step; of two rows at one step, the later written
    return logged[index][1], at


def recommend(rows: list[dict], checkpoint_steps: list[int], quality: QualityConfig, evals_after: int = 0) -> dict:
    """The recommendation (what RUN/recommended.json holds) among the checkpoints at `checkpoint_steps`, from the
    metrics rows `rows`; eval losses at steps <= `evals_after` are of another held-out set and not compared."""
    losses = {step: loss for step, loss in _logged(rows, EVAL_KEY) if step > evals_after and math.isfinite(loss)}
    rules = limits(quality)
    logged = {key: _logged(rows, key) for key in (MOTION, BLEED, TRIGGER_GAIN)}
    record = {"step": None, "checkpoint": None, "eval_loss": None, "measures": {},
              "limits": {rule.setting: rule.bound for rule in rules}, "evaluated": 0, "excluded": [], "reason": ""}
    evaluated = sorted(step for step in set(checkpoint_steps) if step in losses)
    record["evaluated"] = len(evaluated)
    if not evaluated:
        record["reason"] = "no checkpoint has a held-out eval loss yet (each is evaluated when it is written)"
        return record
    for step in evaluated:
        breaks = []
        for rule in rules:
            found = measure_at(logged[rule.key], step)
            if found is not None and rule.broken_by(found[0]):
                breaks.append(f"{rule.label} {found[0]:.3g} (step {found[1]}) {'below' if rule.at_least else 'above'} "
                              f"{rule.setting}={rule.bound:g}")
        if breaks:
            record["excluded"].append({"step": step, "eval_loss": losses[step], "why": "; ".join(breaks)})
    excluded = {entry["step"] for entry in record["excluded"]}
    acceptable = [step for step in evaluated if step not in excluded]
    unmeasured = [rule.label for rule in rules if not logged[rule.key]]
    bounds = ", ".join(rule.describe() for rule in rules)
    if unmeasured:
        bounds += f"; {' and '.join(unmeasured)} {'was' if len(unmeasured) == 1 else 'were'} not measured"
    bounds = f"({bounds})"
    if not acceptable:
        lowest = min(evaluated, key=lambda s: (losses[s], s))
        record["reason"] = (f"none of the {len(evaluated)} evaluated checkpoints is within the limits {bounds}: "
                            + "; ".join(f"step {e['step']}: {e['why']}" for e in record["excluded"])
                            + f". The lowest eval loss regardless of the measures is step {lowest}'s (cogft export "
                              "--best)")
        return record
    chosen = min(acceptable, key=lambda s: (losses[s], s))
    record.update(step=chosen, checkpoint=str(step_dir(Path(), chosen)), eval_loss=losses[chosen],
                  measures={key: {"value": found[0], "step": found[1]} for key in logged
                            if (found := measure_at(logged[key], chosen)) is not None})
    of = (f"all {len(evaluated)} evaluated checkpoints, each within the limits" if not excluded else
          f"the {len(acceptable)} of {len(evaluated)} evaluated checkpoints within the limits")
    reason = f"the lowest held-out eval loss ({losses[chosen]:.6g}) of {of} {bounds}"
    lower = [entry for entry in record["excluded"] if (entry["eval_loss"], entry["step"]) < (losses[chosen], chosen)]
    if lower:
        reason += "; lower eval losses are outside them: " + "; ".join(
            f"step {e['step']} ({e['eval_loss']:.6g}): {e['why']}" for e in lower)
    record["reason"] = reason
    return record


def comparable_evals(carried: dict | None, identity: str | None, step: int) -> dict:
    """What the training progress carries: the held-out set's identity and the step after which its eval losses were
    measured. A resume on the same set keeps it; on another (or the first with eval.holdout) the losses up to the
    resumed step are of another set and are not compared with the new ones."""
    if carried is None:  # a fresh run, or a checkpoint written before this was carried
        return {"eval_set": identity, "after": 0}
    if carried.get("eval_set") == identity:
        return carried
    if carried.get("eval_set") is not None and identity is not None:
        logger.info("the held-out set changed on resume; the recommended checkpoint is chosen among the checkpoints "
                    "evaluated from step %d on", step + 1)
    return {"eval_set": identity, "after": step}


def update_recommended(run_dir: Path, quality: QualityConfig, evals: dict) -> dict | None:
    """RUN/recommended.json as the rule says now of the run's complete checkpoints (main process); removed without a
    held-out eval (`evals["eval_set"]` None). Returns the record written."""
    if evals["eval_set"] is None:
        write_recommended(run_dir, None)
        return None
    steps = [checkpoint_step(path) for path in complete_checkpoints(run_dir)]
    record = recommend(logged_rows(run_dir), steps, quality, evals["after"])
    write_recommended(run_dir, record)
    return record


def write_recommended(run_dir: Path, record: dict | None) -> None:
    """RUN/recommended.json as `record` says (removed for None), replaced atomically: never half a record."""
    path = run_dir / RECOMMENDED_RECORD
    if record is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def recommended_record(run_dir: Path) -> dict | None:
    """RUN/recommended.json, or None when the run has none (no eval.holdout). Raises DamagedRecordError for one that
    is not what `write_recommended` writes."""
    path = run_dir / RECOMMENDED_RECORD
    if not path.exists():
        return None
    fix = (f"it is rewritten at the run's next checkpoint or validation; or delete it and choose a checkpoint by "
           f"hand (metrics.jsonl's eval/loss and quality/* rows), giving --from {step_dir(run_dir, 0).parent}/"
           "step-NNNNNN")
    record = read_json(path, fix, reason=str, limits=dict)
    step = record.get("step")
    if step is not None and not (is_kind(step, int) and step >= 0):
        raise damaged(path, f"'step' is {str(step)[:40]!r}, not a step or null", fix)
    if step is not None and record.get("checkpoint") != str(step_dir(Path(), step)):
        raise damaged(path, f"'checkpoint' is {str(record.get('checkpoint'))[:80]!r}, not "
                            f"{str(step_dir(Path(), step))!r} of its step {step}", fix)
    return record


def recommended_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint RUN/recommended.json names (kept through `train.checkpoints_keep` rotation), or None."""
    record = recommended_record(run_dir)
    return None if record is None or record["step"] is None else step_dir(run_dir, record["step"])


def summary_line(run_dir: Path) -> str | None:
    """The end-of-run summary's line: the recommended checkpoint and why, or why none is; None without a record."""
    try:
        record = recommended_record(run_dir)
    except DamagedRecordError as error:
        logger.warning("%s", error)
        return None
    if record is None:
        return None
    if record["step"] is None:
        return f"  recommended checkpoint: none: {record['reason']}"
    return (f"  recommended checkpoint: step {record['step']}, {record['reason']} (cogft export --from {run_dir} "
            "--out DIR --recommended)")


def recommended_of_run(source: str | Path) -> Path:
    """`--recommended`: the run's recommended checkpoint, as its recommended.json names it."""
    run_dir = run_of(source, "--recommended")
    record = recommended_record(run_dir)
    if record is None:
        raise ConfigError(f"--recommended: {run_dir} has no recommended checkpoint (no {RECOMMENDED_RECORD}); it is "
                          "chosen by the held-out eval loss, which needs eval.holdout: train with it set (e.g. "
                          "eval.holdout=8), or leave out --recommended for the newest weights")
    if record["step"] is None:
        also = f" ({BEST_RECORD})" if (run_dir / BEST_RECORD).is_file() else ""
        raise ConfigError(f"--recommended: no checkpoint of {run_dir} is recommended: {record['reason']}; --best"
                          f"{also} exports the lowest held-out eval loss regardless of the measures, or give --from "
                          "one of its checkpoints")
    checkpoint = step_dir(run_dir, record["step"])
    if not is_checkpoint(checkpoint):
        raise FileNotFoundError(f"--recommended: {run_dir / RECOMMENDED_RECORD} names {checkpoint}, which is not a "
                                "complete checkpoint (moved or deleted); give --from one of the run's checkpoints")
    return checkpoint

