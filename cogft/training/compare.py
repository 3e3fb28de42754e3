"""`cogft compare RUN_A RUN_B [...] --out compare.html`: runs side by side on one offline page.

The settings that differ (each run's resolved config.yaml, flattened to dotted keys), the smoothed loss and held-out
eval loss of every run overlaid, each run's eval and quality figures and recommended checkpoint, the quality
measures overlaid with their limits, and the validation renders of the same prompts side by side. Built from the run
folders alone, with report.html's charts and grid; videos by relative path, so the page moves with the runs.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError
from ..config_file import load_config
from ..run_dir import CONFIG_FILE
from .charts import PALETTE, Chart, series, svg
from .grid import Renders, find_renders, prompt_keys, video_tag
from .metric_rows import EVAL_KEY, STEP_KEY, logged_rows, rows_with
from .recommend import BLEED, MOTION, TRIGGER_GAIN, recommended_record
from .report import MEASURES, html_page, measure_charts, recommendation_line

# settings that change the held-out clips, their latents or prompts, or the timesteps scored: eval losses of runs
# that differ in one of them are not measured on the same thing
EVAL_SET_KEYS = ("model.path", "model.revision", "data.path", "data.caption_prefix", "data.num_frames", "data.height",
                 "data.width", "data.fps", "data.resize", "data.buckets", "eval.holdout", "eval.timesteps",
                 "train.seed")


@dataclass
class _Run:
    path: Path
    label: str
    colour: str
    config: Config
    logged: list[dict]
    renders: Renders


def flatten(value, prefix: str = "") -> dict[str, str]:
    """A config dump as {dotted key: compact JSON of the value}; lists stay whole (one setting)."""
    if isinstance(value, dict) and value:
        flat = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: json.dumps(value, ensure_ascii=False)}


def differing(configs: list[Config]) -> list[tuple[str, list[str | None]]]:
    """(key, each run's value or None where it has no such key) of every setting not the same in all runs; the run
    folder (output_dir) is what tells them apart and is left out."""
    flat = [flatten(config.model_dump(mode="json")) for config in configs]
    keys = sorted(set().union(*flat) - {"output_dir"})
    return [(key, [f.get(key) for f in flat]) for key in keys if len({f.get(key) for f in flat}) > 1]


def _load(paths: list[Path]) -> list[_Run]:
    if len(paths) < 2:
        raise ConfigError("cogft compare needs two runs or more: cogft compare RUN_A RUN_B [...] --out compare.html")
    resolved = [path.resolve() for path in paths]
    if len(set(resolved)) < len(resolved):
        raise ConfigError("cogft compare: a run is given twice; give each run once")
    runs = []
    names = [path.name for path in resolved]
    for index, path in enumerate(paths):
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"cogft compare: {path} is not a run directory (no {CONFIG_FILE}); give the "
                                    "output_dir of each run")
        label = path.name if names.count(path.name) == 1 else str(path)
        runs.append(_Run(path, label, PALETTE[index % len(PALETTE)], load_config(path / CONFIG_FILE),
                         logged_rows(path), find_renders(path)))
    return runs


def _settings(runs: list[_Run]) -> str:
    rows = differing([run.config for run in runs])
    if not rows:
        return "<p>The runs' settings are the same.</p>"
    head = "".join(f"<th>{html.escape(run.label)}</th>" for run in runs)
    body = "\n".join(f"<tr><th><code>{html.escape(key)}</code></th>"
                     + "".join(f"<td>{'-' if value is None else html.escape(value)}</td>" for value in values)
                     + "</tr>" for key, values in rows)
    apart = [key for key, _ in rows if key in EVAL_SET_KEYS]
    note = (f"<p>Held-out eval losses compare only between runs scored on the same clips at the same timesteps; these "
            f"runs differ in {html.escape(', '.join(apart))}, so their eval losses are not measured on the same "
            "thing.</p>" if apart else "")
    return f"<table>\n<tr><th>setting</th>{head}</tr>\n{body}\n</table>\n{note}"


def _last(rows: list[dict], key: str) -> str:
    values = series(rows, key)
    return f"{values[-1][1]:.4g} (step {values[-1][0]:g})" if values else "-"


def _figures(runs: list[_Run], page_dir: Path) -> str:
    """Per run: the steps trained, its eval losses (last and lowest), LoRA gain, the measures' last values and its
    recommended checkpoint with the reason."""
    head = ("<tr><th>run</th><th>steps</th><th>loss (smoothed)</th><th>eval loss</th><th>lowest eval loss</th>"
            "<th>LoRA gain</th>" + "".join(f"<th>{html.escape(title)}</th>" for _, title in MEASURES) + "</tr>")
    body = []
    for run in runs:
        steps = rows_with(run.logged, STEP_KEY)
        evals = series(run.logged, EVAL_KEY)
        lowest = min(evals, key=lambda point: point[1]) if evals else None
        cells = [f'<th style="color: {run.colour}">{html.escape(run.label)}</th>',
                 f"{steps[-1]['step'] if steps else 0} of {run.config.train.max_steps}",
                 _last(steps, STEP_KEY), _last(run.logged, EVAL_KEY),
                 f"{lowest[1]:.4g} (step {lowest[0]:g})" if lowest else "-", _last(run.logged, "eval/lora_gain"),
                 *(_last(run.logged, key) for key in (MOTION, BLEED, TRIGGER_GAIN))]
        body.append("<tr>" + cells[0] + "".join(f"<td>{cell}</td>" for cell in cells[1:]) + "</tr>")
    recommended = "\n".join(f"<li><strong>{html.escape(run.label)}</strong>: "
                            f"{recommendation_line(run.config, run.path, page_dir)}</li>" for run in runs)
    return f"<table>\n{head}\n" + "\n".join(body) + f"\n</table>\n<ul>\n{recommended}\n</ul>"


def _shown_step(run: _Run, key: str) -> tuple[int, str] | None:
    """The step of `run`'s render of a prompt to show: its recommended checkpoint's, else its latest."""
    try:
        record = recommended_record(run.path)
    except ConfigError:
        record = None
    step = record and record["step"]
    if step is not None and key in run.renders.by_step.get(step, {}):
        return step, "recommended"
    rendered = [at for at, videos in run.renders.by_step.items() if key in videos]
    return (max(rendered), "latest") if rendered else None


def _renders(runs: list[_Run], page_dir: Path) -> str:
    """The validation prompts (as listed, so a run's data.caption_prefix does not split a row), each run's render
    side by side."""
    prompts: dict[str, dict[str, str]] = {}  # listed prompt -> run label -> its key
    for run in runs:
        for key, listed, _ in prompt_keys(run.config, run.path):
            prompts.setdefault(listed, {})[run.label] = key
    if not any(run.renders.by_step for run in runs):
        return "<p>No validation videos in these runs.</p>"
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(run.label)}</th>" for run in runs) + "</tr>"
    body = []
    for listed, keys in prompts.items():
        cells = []
        for run in runs:
            shown = _shown_step(run, keys[run.label]) if run.label in keys else None
            if shown is None:
                cells.append(f"<td>{video_tag(None, page_dir)}</td>")
                continue
            step, why = shown
            cells.append(f"<td>{video_tag(run.renders.by_step[step][keys[run.label]], page_dir)}<br>step {step} "
                         f"({why})</td>")
        body.append(f'<tr><th class="prompt">{html.escape(listed)}</th>{"".join(cells)}</tr>')
    return f'<div class="grid"><table>\n{head}\n' + "\n".join(body) + "\n</table></div>"


def write_comparison(sources: list[str], out: str) -> Path:
    """compare.html of the runs in `sources` at `out` (its folder made if missing); returns its path."""
    target = Path(out)
    if target.is_dir():
        raise FileExistsError(f"--out {target} is a folder; give the page's file name, e.g. {target / 'compare.html'}")
    runs = _load([Path(source) for source in sources])
    target.parent.mkdir(parents=True, exist_ok=True)
    page_dir = target.parent.resolve()

    def legend(run: _Run) -> str:
        return run.label if len(run.label) <= 20 else run.label[:19] + "…"

    losses = Chart("loss (smoothed)", [(legend(run), run.colour, series(run.logged, STEP_KEY)) for run in runs])
    evals = Chart("held-out eval loss", [(legend(run), run.colour, series(run.logged, EVAL_KEY)) for run in runs
                                         if series(run.logged, EVAL_KEY)])
    measures = measure_charts([(legend(run), run.logged, run.config.quality) for run in runs])
    charts = "".join(f"<h3>{html.escape(chart.title)}</h3>\n{svg(chart)}\n" for chart in measures)
    title = html.escape("cogft compare: " + ", ".join(run.label for run in runs))
    listing = "\n".join(f'<tr><th style="color: {run.colour}">{html.escape(run.label)}</th>'
                        f"<td>{html.escape(str(run.path))}</td><td>{html.escape(run.config.model.path)}, "
                        f"{run.config.train.mode}</td></tr>" for run in runs)
    page = html_page(title, f"""<table>
{listing}
</table>
<h2>Settings that differ</h2>
{_settings(runs)}
<h2>Loss</h2>
{svg(losses)}
{f"<h2>Held-out eval loss</h2>{chr(10)}{svg(evals)}" if evals.series else ""}
<h2>Eval and quality measures</h2>
{_figures(runs, page_dir)}
{charts}<h2>Validation renders</h2>
{_renders(runs, page_dir)}
""", style="td, th { padding: 0.2rem 0.5rem }\n")
    target.write_text(page, encoding="utf-8")
    return target

