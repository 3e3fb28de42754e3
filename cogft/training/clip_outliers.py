"""Clips that hurt: each clip's recorded training loss per third of the schedule, and the clips far from the rest.

The loss depends strongly on the timestep, so clips are compared within each third (evaluation.py's ranges), and
inside a third each sample's loss is taken relative to the median loss of the samples near its timestep (the third
cut into up to 8 bins) on a log scale. A clip's score in a third is the mean of its samples' relative log losses;
clips are judged by the modified z-score of that score (its distance from the clips' median in robust spreads,
1.4826 · the median absolute deviation). Beyond +3.5 a clip fits worse than the rest can explain by chance at
its timesteps: often a caption that does not describe it, or a scene cut inside it. Below −3.5 it fits better: a
duplicate (trained more often than the rest), a memorised clip, or one with next to nothing in it (a still, flat
colour). Each outlier names its row in prepare_report.jsonl.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..run_dir import REPORT_FILE
from .clip_records import CLIP_LOSSES_DIR, Sample, read_clips, read_samples
from .evaluation import timestep_ranges

THRESHOLD = 3.5  # the modified z-score beyond which a clip is an outlier (Iglewicz and Hoaglin's cut)
MIN_CLIPS = 5    # a third is judged when at least this many clips have samples in it
MIN_COUNT = 2    # a clip is judged in a third where it has at least this many samples
MAX_BINS, PER_BIN = 8, 30  # a third's timestep bins for the relative loss: one per 30 samples, at most 8
REASONS = {"high": "caption or scene cut", "low": "duplicate or memorised"}


def _label(low: int, high: int) -> str:
    return f"t{low:03d}_{high:03d}"


def _relative(samples: list[Sample], low: int, high: int) -> dict[str, list[float]]:
    """{clip: its samples' log(loss / the median loss near that timestep)} for the samples in [low, high)."""
    inside = [s for s in samples if low <= s.t < high and s.loss > 0]
    bins = max(1, min(MAX_BINS, len(inside) // PER_BIN))
    by_bin: dict[int, list[Sample]] = defaultdict(list)
    for sample in inside:
        by_bin[min(int((sample.t - low) * bins / (high - low)), bins - 1)].append(sample)
    scores: dict[str, list[float]] = defaultdict(list)
    for members in by_bin.values():
        typical = statistics.median(s.loss for s in members)
        for sample in members:
            scores[sample.clip].append(math.log(sample.loss / typical))
    return scores


def _judge(scores: dict[str, float]) -> tuple[dict[str, float], str | None]:
    """Each clip's modified z-score, or ({}, why not) for a third that cannot be judged."""
    if len(scores) < MIN_CLIPS:
        return {}, f"clips with samples here: {len(scores)}, of the {MIN_CLIPS} needed to judge"
    center = statistics.median(scores.values())
    spread = 1.4826 * statistics.median(abs(v - center) for v in scores.values())
    if spread <= 1e-9:
        return {}, "the clips' losses do not spread"
    return {clip: (value - center) / spread for clip, value in scores.items()}, None


def _report_rows(run_dir: Path) -> list[dict]:
    path = run_dir / REPORT_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        rows.append(value if isinstance(value, dict) else {})
    return rows


def _report_row(rows: list[dict], clip: dict) -> int | None:
    """The 1-based line of the clip's row in prepare_report.jsonl (its list line, its video, its set)."""
    matches = [number for number, row in enumerate(rows, 1)
               if row.get("listed_at") == clip.get("listed_at") and row.get("clip") == clip.get("video")]
    in_set = [n for n in matches if rows[n - 1].get("set", "data.sets[0]") == f"data.sets[{clip.get('set', 0)}]"]
    found = in_set or matches
    return found[0] if found else None


def clip_losses(run_dir: str | Path) -> dict:
    """The per-clip table and its outliers for RUN (see the module's docstring); a message where nothing is recorded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        from ..config import ConfigError

        raise ConfigError(f"--losses {run_dir}: no such run folder; give the output_dir of a run")
    schedule, clips = read_clips(run_dir)
    samples = read_samples(run_dir)
    if not samples or schedule is None:
        return {"run": str(run_dir), "samples": 0, "clips": 0, "outliers": [],
                "message": f"{run_dir} has no per-clip loss records yet ({CLIP_LOSSES_DIR}/ fills as training runs, "
                           "from its first steps; a run trained before cogft recorded them has none)"}
    rows = _report_rows(run_dir)
    described = {key: {"clip": key, "video": info.get("video"), "caption": info.get("caption"),
                       "listed_at": info.get("listed_at"), "report_row": _report_row(rows, info)}
                 for key, info in clips.items()}
    table: dict[str, dict] = {key: {**described.get(key, {"clip": key, "video": None}), "thirds": {}}
                              for key in sorted({s.clip for s in samples})}
    unjudged = {}
    for low, high in timestep_ranges(schedule):
        label = _label(low, high)
        relative = _relative(samples, low, high)
        z_scores, why = _judge({clip: statistics.fmean(values) for clip, values in relative.items()})
        if why:
            unjudged[label] = why
        losses: dict[str, list[float]] = defaultdict(list)
        for sample in samples:
            if low <= sample.t < high:
                losses[sample.clip].append(sample.loss)
        for clip, values in losses.items():
            z = z_scores.get(clip)
            table[clip]["thirds"][label] = {"mean_loss": statistics.fmean(values), "count": len(values),
                                            "z": None if z is None else round(z, 3)}
    return {"run": str(run_dir), "samples": len(samples), "clips": len(table),
            "steps": [samples[0].step, samples[-1].step], "ranges": [_label(*r) for r in timestep_ranges(schedule)],
            "threshold": THRESHOLD, "unjudged": unjudged, "outliers": _outliers(table.values()),
            "per_clip": list(table.values())}


def _outliers(clips) -> list[dict]:
    """Each clip far above or below the rest in some third, with the thirds where it is, farthest first."""
    found = []
    for clip in clips:
        for direction, sign in (("high", 1), ("low", -1)):
            thirds = [{"range": label, **third} for label, third in clip["thirds"].items()
                      if third["z"] is not None and third["count"] >= MIN_COUNT and sign * third["z"] > THRESHOLD]
            if thirds:
                info = {k: v for k, v in clip.items() if k != "thirds"}
                found.append({**info, "direction": direction, "reason": REASONS[direction], "thirds": thirds})
    return sorted(found, key=lambda o: -max(abs(t["z"]) for t in o["thirds"]))


def _where(outlier: dict) -> str:
    row = outlier.get("report_row")
    listed = outlier.get("listed_at")
    return ", ".join(part for part in (listed, f"{REPORT_FILE} row {row}" if row else None) if part) or "unlisted"


def format_clip_losses(report: dict) -> str:
    """The doctor's text: the outliers, each with its reason, thirds, caption and prepare_report row."""
    if not report["samples"]:
        return report["message"]
    lines = [f"clips that hurt in {report['run']}: {report['samples']} samples of {report['clips']} clips, steps "
             f"{report['steps'][0]}-{report['steps'][1]}; judged within each third of the schedule "
             f"({', '.join(report['ranges'])}), outliers beyond {report['threshold']:g} robust deviations"]
    for label, why in report["unjudged"].items():
        lines.append(f"  {label} not judged: {why}")
    if not report["outliers"]:
        lines.append("no clip stands out")
    for outlier in report["outliers"]:
        lines.append(f"{outlier['direction'].upper():5} {outlier['video']} ({_where(outlier)}): likely "
                     f"{outlier['reason']}")
        for third in outlier["thirds"]:
            lines.append(f"      {third['range']}: mean loss {third['mean_loss']:.4g} over {third['count']} samples, "
                         f"{third['z']:+.1f} deviations")
        if outlier.get("caption") is not None:
            lines.append(f"      caption: {outlier['caption']!r}")
    return "\n".join(lines)


def clips_section(run_dir: Path) -> str:
    """report.html's "Clips that hurt": the outliers as a table, or why there are none."""
    from ..config import ConfigError

    try:
        report = clip_losses(run_dir)
    except ConfigError as error:  # a damaged record is named; the rest of the report is still written
        return f"<h2>Clips that hurt</h2>\n<p>Not read: {html.escape(str(error))}</p>\n"
    if not report["samples"]:
        return f"<h2>Clips that hurt</h2>\n<p>{html.escape(report['message'])}</p>\n"
    intro = (f"<p>{report['samples']} samples of {report['clips']} clips, judged within each third of the schedule; "
             f"a clip beyond {report['threshold']:g} robust deviations from the rest is listed "
             f"(<code>cogft doctor --losses RUN</code> prints the same).</p>")
    if not report["outliers"]:
        return f"<h2>Clips that hurt</h2>\n{intro}\n<p>No clip stands out.</p>\n"
    cells = []
    for o in report["outliers"]:
        thirds = "<br>".join(f"{t['range']}: {t['mean_loss']:.4g} ({t['count']}), {t['z']:+.1f}" for t in o["thirds"])
        row = (f'<a href="{REPORT_FILE}">row {o["report_row"]}</a> ({html.escape(o["listed_at"] or "")})'
               if o.get("report_row") else html.escape(o.get("listed_at") or "unlisted"))
        cells.append(f"<tr><td>{html.escape(str(o['video']))}<br><small>{html.escape(o.get('caption') or '')}"
                     f"</small></td><td>{html.escape(o['reason'])}</td><td>{thirds}</td><td>{row}</td></tr>")
    head = ("<tr><th>clip</th><th>likely reason</th><th>third: mean loss (samples), deviations</th>"
            f"<th>{REPORT_FILE}</th></tr>")
    return f"<h2>Clips that hurt</h2>\n{intro}\n<table>\n{head}\n" + "\n".join(cells) + "\n</table>\n"
