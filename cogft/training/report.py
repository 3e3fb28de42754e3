"""report.html: one page a user opens after a run (finished or stopped), offline, from any copy of the run folder.

The loss and learning-rate curves of metrics.jsonl (and the held-out eval loss, with `eval.holdout`) as inline SVG
(and curves.png, drawn with Pillow, for a chat or an issue), every validation video of samples/ by relative path,
and the run's short facts. No script, no stylesheet or font from elsewhere: it opens from a laptop's disk, an
archive or a cluster's file browser.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError
from ..data.captions import validation_texts
from ..run_dir import (
    CURVES_IMAGE,
    HTML_REPORT,
    METRICS_FILE,
    SAMPLES_DIR,
    TRANSFORMER_DIR,
    complete_checkpoints,
    resolve_trained,
    sample_path,
)
from .summary import EVAL_KEY, STEP_KEY, logged_rows, loss_progress, rows_with
from .trigger import trigger_facts

_WIDTH, _HEIGHT = 720, 260  # one chart; curves.png stacks the two
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 16, 30, 34
_SAMPLE = re.compile(r"^step-(\d{6,})-(\d{2,})-")


@dataclass(frozen=True)
class _Chart:
    title: str
    series: list[tuple[str, str, list[tuple[float, float]]]]  # (name, colour, [(step, value)]), finite values only

    def ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        points = [p for _, _, pts in self.series for p in pts]
        steps, values = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
        return (min(steps), max(steps)), (min(values), max(values))

    def plotted(self) -> list[tuple[str, str, list[tuple[float, float]]]]:
        """Each series in pixels of a _WIDTH x _HEIGHT chart (y grows downwards); a flat range sits mid-height."""
        (s0, s1), (v0, v1) = self.ranges()
        x0, x1, y0, y1 = _LEFT, _WIDTH - _RIGHT, _TOP, _HEIGHT - _BOTTOM

        def at(step: float, value: float) -> tuple[float, float]:
            x = x0 + (step - s0) / (s1 - s0) * (x1 - x0) if s1 > s0 else (x0 + x1) / 2
            y = y1 - (value - v0) / (v1 - v0) * (y1 - y0) if v1 > v0 else (y0 + y1) / 2
            return x, y

        return [(name, colour, [at(*p) for p in pts]) for name, colour, pts in self.series]

    def labels(self) -> list[tuple[float, float, str, str, str]]:
        """(x, y, anchor, text, colour): the title, each series' name in its colour, the value and step ranges."""
        (s0, s1), (v0, v1) = self.ranges()
        bottom = _HEIGHT - _BOTTOM
        legend = [(_LEFT + 140 * (i + 1), 18, "start", name, colour) for i, (name, colour, _) in enumerate(self.series)]
        return [(_LEFT, 18, "start", self.title, "black"), *legend,
                (_LEFT - 6, _TOP + 4, "end", f"{v1:.3g}", "black"), (_LEFT - 6, bottom, "end", f"{v0:.3g}", "black"),
                (_LEFT, bottom + 20, "start", f"step {s0:g}", "black"),
                (_WIDTH - _RIGHT, bottom + 20, "end", f"step {s1:g}", "black")]


def _charts(rows: list[dict], evals: list[dict]) -> list[_Chart]:
    """Loss and learning rate; with `eval.holdout`, the held-out eval loss (and the base model's, for a LoRA) too."""
    def series(key: str, source: list[dict]) -> list[tuple[float, float]]:
        return [(row["step"], float(row[key])) for row in source
                if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]

    charts = [_Chart("loss", [("loss", "#9ab8d8", series("loss", rows)),
                              ("loss_smoothed", "#1f4e9c", series("loss_smoothed", rows)),
                              *([("loss/prior", "#b0489a", series("loss/prior", rows))]  # data.sets' prior batches
                                if any("loss/prior" in row for row in rows) else [])]),
              _Chart("learning rate", [("lr", "#c05a1c", series("lr", rows))])]
    if evals:
        held_out = [("eval/loss", "#2a8a3e", series("eval/loss", evals))]
        if any("eval/loss_base" in row for row in evals):
            held_out.append(("eval/loss_base", "#999999", series("eval/loss_base", evals)))
        charts.append(_Chart("held-out eval loss", held_out))
    return charts


def _svg(chart: _Chart) -> str:
    bottom, right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
             f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{html.escape(chart.title)}">',
             f'<path d="M{_LEFT} {_TOP} V{bottom} H{right}" fill="none" stroke="#888"/>']
    for name, colour, points in chart.plotted():
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points * (2 if len(points) == 1 else 1))  # 1 step: a dot
        parts.append(f'<polyline data-series="{name}" fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'stroke-linecap="round" points="{coords}"><title>{name}</title></polyline>')
    for x, y, anchor, text, colour in chart.labels():
        parts.append(f'<text x="{x}" y="{y}" text-anchor="{anchor}" fill="{colour}" font-size="12">'
                     f"{html.escape(text)}</text>")
    return "\n".join([*parts, "</svg>"])


def _png(charts: list[_Chart], path: Path) -> None:
    """The same charts, stacked, as a PNG drawn with Pillow (already installed for imageio)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (_WIDTH, _HEIGHT * len(charts)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for index, chart in enumerate(charts):
        top = index * _HEIGHT
        draw.line([(_LEFT, top + _TOP), (_LEFT, top + _HEIGHT - _BOTTOM), (_WIDTH - _RIGHT, top + _HEIGHT - _BOTTOM)],
                  fill="#888888")
        for _, colour, points in chart.plotted():
            shifted = [(x, top + y) for x, y in points]
            if len(shifted) == 1:  # one logged step: a dot, not an empty chart
                x, y = shifted[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            elif shifted:
                draw.line(shifted, fill=colour, width=2)
        for x, y, anchor, text, colour in chart.labels():  # placed by hand: Pillow's bitmap font takes no anchor
            left = x - draw.textlength(text, font=font) if anchor == "end" else x
            draw.text((left, top + y - 10), text, fill=colour, font=font)
    image.save(path)


def _videos(config: Config, run_dir: Path) -> str:
    """Every validation video, by step, newest first, captioned with its prompt where the config still has it."""
    texts = validation_texts(config)
    by_step: dict[int, list[str]] = {}
    for video in sorted((run_dir / SAMPLES_DIR).glob("*.mp4")):
        match = _SAMPLE.match(video.name)
        step, index = (int(match.group(1)), int(match.group(2))) if match else (-1, -1)
        text = texts[index] if 0 <= index < len(texts) else None
        named = text is not None and sample_path(run_dir, step, index, text).name == video.name
        caption = text if named else video.name
        by_step.setdefault(step, []).append(
            f'<figure><video controls preload="metadata" src="{html.escape(f"{SAMPLES_DIR}/{video.name}")}"></video>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if not by_step:
        return "<p>No validation videos (validation.prompts is empty, or no validation ran yet).</p>"
    return "\n".join(f"<h3>{f'step {step}' if step >= 0 else 'other'}</h3>\n" + "\n".join(figures)
                     for step, figures in sorted(by_step.items(), reverse=True))


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


def write_run_report(config: Config, run_dir: Path, stopped: bool) -> Path:
    """RUN/report.html and RUN/curves.png, from what the run directory holds now (so a resumed run's report covers
    the whole run)."""
    logged = logged_rows(run_dir)
    rows = rows_with(logged, STEP_KEY)
    charts = _charts(rows, rows_with(logged, EVAL_KEY))
    _png(charts, run_dir / CURVES_IMAGE)
    facts = "\n".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in
                      [*_facts(config, run_dir, rows, stopped), *trigger_facts(config, logged)])
    title = html.escape(f"cogft run {run_dir.name}")
    held_out = "".join(f"<h2>Held-out eval loss</h2>\n{_svg(chart)}\n" for chart in charts[2:])
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222 }}
th {{ text-align: left; padding-right: 1rem; vertical-align: top }}
svg {{ max-width: 100%; height: auto }}
figure {{ display: inline-block; margin: 0 1rem 1rem 0; max-width: 22rem }}
video {{ max-width: 100% }}
</style>
</head>
<body>
<h1>{title}</h1>
<table>
{facts}
</table>
<h2>Loss</h2>
{_svg(charts[0])}
<h2>Learning rate</h2>
{_svg(charts[1])}
{held_out}<h2>Validation videos</h2>
{_videos(config, run_dir)}
</body>
</html>
"""
    (run_dir / HTML_REPORT).write_text(page, encoding="utf-8")
    return run_dir / HTML_REPORT
