"""report.html: one page a user opens after a run (finished or stopped), offline, from any copy of the run folder.

The loss and learning-rate curves of metrics.jsonl (and the held-out eval loss, with `eval.holdout`, and the quality
measures with their limits) as inline SVG (and curves.png, drawn with Pillow, for a chat or an issue), the
recommended checkpoint and why (training/recommend.py), every validation video of samples/ by relative path in a
grid of prompt x step beside the base model's, and the run's short facts. No script, no stylesheet or font from
elsewhere: it opens from a laptop's disk, an archive or a cluster's file browser.
"""

from __future__ import annotations

import html
from pathlib import Path

from ..config import Config, ConfigError, QualityConfig
from ..records import DamagedRecordError
from ..run_dir import (
    CURVES_IMAGE,
    HTML_REPORT,
    METRICS_FILE,
    TRANSFORMER_DIR,
    checkpoint_step,
    complete_checkpoints,
    resolve_trained,
    step_dir,
)
from .charts import PALETTE, Chart, png, series, svg
from .clip_outliers import clips_section
from .grid import find_renders, grid, src, video_tag
from .metric_rows import EVAL_KEY, STEP_KEY, logged_rows, rows_with
from .motion import motion_html
from .recommend import BLEED, MOTION, TRIGGER_GAIN, limits, recommended_record
from .summary import loss_progress
from .trigger import trigger_facts

MEASURES = ((MOTION, "motion ratio (LoRA / base)"), (BLEED, "bleed"), (TRIGGER_GAIN, "trigger gain"))
STYLE = """\
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222 }
th { text-align: left; padding-right: 1rem; vertical-align: top }
svg { max-width: 100%; height: auto }
figure { display: inline-block; margin: 0 1rem 1rem 0; max-width: 22rem }
video { max-width: 100% }
.grid { overflow-x: auto }
.grid video { width: 12rem }
.grid th.prompt { max-width: 12rem; font-weight: normal }
.recommended { color: #2a8a3e }"""


def _charts(rows: list[dict], evals: list[dict]) -> list[Chart]:
    """Loss and learning rate; with `eval.holdout`, the held-out eval loss (and the base model's, for a LoRA) too."""
    charts = [Chart("loss", [("loss", "#9ab8d8", series(rows, "loss")),
                             ("loss_smoothed", "#1f4e9c", series(rows, "loss_smoothed")),
                             *([("loss/prior", "#b0489a", series(rows, "loss/prior"))]  # data.sets' prior batches
                               if any("loss/prior" in row for row in rows) else [])]),
              Chart("learning rate", [("lr", "#c05a1c", series(rows, "lr"))])]
    if evals:
        held_out = [("eval/loss", "#2a8a3e", series(evals, "eval/loss"))]
        if any("eval/loss_base" in row for row in evals):
            held_out.append(("eval/loss_base", "#999999", series(evals, "eval/loss_base")))
        charts.append(Chart("held-out eval loss", held_out))
    return charts


def measure_charts(runs: list[tuple[str | None, list[dict], QualityConfig]]) -> list[Chart]:
    """A chart per quality measure some run logged (motion ratio, bleed, trigger gain), a series per run (label, or
    None for the metric's name; rows; its limits), each limit a dashed line."""
    charts = []
    for key, title in MEASURES:
        drawn = [(label or key, PALETTE[i % len(PALETTE)], points) for i, (label, rows, _) in enumerate(runs)
                 if (points := series(rows, key))]
        bounds = {(rule.setting, rule.bound) for _, _, quality in runs for rule in limits(quality) if rule.key == key}
        if drawn:
            charts.append(Chart(title, drawn, [(f"{setting}={bound:g}", bound) for setting, bound in sorted(bounds)]))
    return charts


def recommendation_line(config: Config, run_dir: Path, page_dir: Path | None = None) -> str:
    """The recommended checkpoint and the reason, from RUN/recommended.json (HTML), linked from a page in `page_dir`
    (with the export command when it is the run's own page)."""
    try:
        record = recommended_record(run_dir)
    except DamagedRecordError as error:
        return f"No recommendation: {html.escape(str(error))}"
    if record is None:
        if config.eval.holdout:
            return "No checkpoint is recommended yet: none was evaluated"
        return ("No checkpoint is recommended: the choice needs a held-out eval loss (train with eval.holdout, e.g. "
                "eval.holdout=8)")
    if record["step"] is None:
        return f"No checkpoint is recommended: {html.escape(record['reason'])}"
    folder = step_dir(run_dir, record["step"])
    name = html.escape(folder.name)
    link = f'<a href="{src(folder, page_dir or run_dir)}/">{name}</a>' if folder.is_dir() else name
    export = (f" (<code>cogft export --from {html.escape(str(run_dir))} --out DIR --recommended</code>)"
              if page_dir is None else "")
    return f"Recommended: <strong>{link}</strong>, {html.escape(record['reason'])}{export}"


def _headings(run_dir: Path, steps: list[int], logged: list[dict], recommended: int | None) -> dict[int, str]:
    """Each grid column's heading: its step, whether a checkpoint of that step is kept (and recommended), and the
    eval loss and measures logged at that step."""
    checkpoints = {checkpoint_step(path) for path in complete_checkpoints(run_dir)}
    at_step: dict[int, list[dict]] = {step: [] for step in steps}
    for row in logged:
        at_step.get(row["step"], []).append(row)
    headings = {}
    for step in steps:
        lines = [f"step {step}"]
        if step in checkpoints:
            lines.append(f'<a href="{src(step_dir(run_dir, step), run_dir)}/">checkpoint</a>'
                         + (' <strong class="recommended">recommended</strong>' if step == recommended else ""))
        for key, title in ((EVAL_KEY, "eval loss"), *MEASURES):
            if values := series(at_step[step], key):
                lines.append(f"{title.split(' (')[0]} {values[-1][1]:.4g}")
        headings[step] = "<br>".join(lines)
    return headings


def _videos(config: Config, run_dir: Path, logged: list[dict]) -> str:
    """The validation videos as a grid, prompt x step, and any other video in samples/."""
    renders = find_renders(run_dir)
    if not renders.by_step and not renders.other:
        return "<p>No validation videos (validation.prompts is empty, or no validation ran yet).</p>"
    try:
        record = recommended_record(run_dir)
    except DamagedRecordError:
        record = None
    parts = []
    if renders.by_step:
        headings = _headings(run_dir, sorted(renders.by_step), logged, record and record["step"])
        parts.append(grid(config, run_dir, renders, headings))
    unrendered = [path.name for path in complete_checkpoints(run_dir) if checkpoint_step(path) not in renders.by_step]
    if renders.by_step and unrendered:
        parts.append(f"<p>Checkpoints with no videos of their own step: {html.escape(', '.join(unrendered))} (a "
                     "validation.every that divides train.checkpoint_every renders every checkpoint).</p>")
    parts += [f"<figure>{video_tag(video, run_dir)}<figcaption>{html.escape(video.name)}</figcaption></figure>"
              for video in renders.other]
    return "\n".join(parts)


def _facts(config: Config, run_dir: Path, rows: list[dict], stopped: bool) -> list[tuple[str, str]]:
    """(label, HTML) rows: what was trained, how far, the losses, and where the weights are."""
    mode = (f"LoRA (rank {config.lora.rank}, alpha {config.lora.alpha:g})" if config.train.mode == "lora"
            else "full fine-tune (SFT)")
    facts = [("model", html.escape(config.model.path)), ("mode", mode),
             ("steps", f"{rows[-1]['step'] if rows else 0} of {config.train.max_steps}"
                       f"{' (stopped early)' if stopped else ''}")]
    if rows:
        facts.append(("loss (smoothed)", loss_progress(rows)))
    try:
        trained = resolve_trained(run_dir)
        folder = trained.weights_dir / TRANSFORMER_DIR if trained.mode == "sft" else trained.weights_dir
        weights = html.escape(folder.relative_to(run_dir).as_posix())
        facts.append(("weights", f'<a href="{weights}/">{weights}/</a> (what <code>cogft sample --from '
                                 f"{html.escape(str(run_dir))}</code> loads)"))
    except (FileNotFoundError, ConfigError):
        facts.append(("weights", "none written yet"))
    checkpoints = complete_checkpoints(run_dir)
    if checkpoints:
        facts.append(("checkpoints", ", ".join(html.escape(c.name) for c in checkpoints)))
    facts.append(("metrics",
                  f'<a href="{METRICS_FILE}">{METRICS_FILE}</a>, <a href="{CURVES_IMAGE}">{CURVES_IMAGE}</a>'))
    return facts


def html_page(title: str, body: str, style: str = "") -> str:
    """A page that opens offline: the shared STYLE (then `style`), the escaped `title` as its title and heading, then
    `body` (report.html, compare.html)."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
{STYLE}
{style}</style>
</head>
<body>
<h1>{title}</h1>
{body}</body>
</html>
"""


def write_run_report(config: Config, run_dir: Path, stopped: bool) -> Path:
    """RUN/report.html and RUN/curves.png, from what the run directory holds now (so a resumed run's report covers
    the whole run)."""
    logged = logged_rows(run_dir)
    rows = rows_with(logged, STEP_KEY)
    charts = _charts(rows, rows_with(logged, EVAL_KEY))
    measures = measure_charts([(None, logged, config.quality)])
    png(charts + measures, run_dir / CURVES_IMAGE)
    facts = "\n".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in
                      [*_facts(config, run_dir, rows, stopped), *trigger_facts(config, logged)])
    title = html.escape(f"cogft run {run_dir.name}")
    held_out = "".join(f"<h3>Held-out eval loss</h3>\n{svg(chart)}\n" for chart in charts[2:])
    held_out += "".join(f"<h3>{html.escape(chart.title)}</h3>\n{svg(chart)}\n" for chart in measures)
    page = html_page(title, f"""<table>
{facts}
</table>
<h2>Loss</h2>
{svg(charts[0])}
<h2>Learning rate</h2>
{svg(charts[1])}
<h2>Choosing a checkpoint</h2>
<p>{recommendation_line(config, run_dir)}</p>
{held_out}{motion_html(config, run_dir, logged)}<h3>Validation videos</h3>
{_videos(config, run_dir, logged)}
{clips_section(run_dir)}
""")
    (run_dir / HTML_REPORT).write_text(page, encoding="utf-8")
    return run_dir / HTML_REPORT
