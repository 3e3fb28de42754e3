"""The validation videos of a run as a grid, prompt x step (report.html), and found by prompt (compare.html).

A video's name is `step-NNNNNN-II-slug.mp4` (`sample_path`); past its step, `II-slug.mp4` names the prompt, which
keeps its seed from step to step, so a row of the grid shows what training did to one render. The base model's
renders (adapter off, same seeds), where the run made them, are `samples/base/` under a step-0 sample's name.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..data.captions import validation_texts
from ..run_dir import BASE_SAMPLES_DIR, SAMPLES_DIR, sample_path

_SAMPLE = re.compile(r"^step-(\d{6,})-(\d{2,}-.*\.mp4)$")


def prompt_key(name: str) -> str | None:
    """What names the prompt in a sample's file name (`II-slug.mp4`), or None for a name that is not a sample's."""
    match = _SAMPLE.match(name)
    return match.group(2) if match else None


@dataclass
class Renders:
    """A run's validation videos: by step and prompt key, the base model's by prompt key, and any other .mp4."""

    by_step: dict[int, dict[str, Path]] = field(default_factory=dict)
    base: dict[str, Path] = field(default_factory=dict)
    other: list[Path] = field(default_factory=list)


def find_renders(run_dir: Path) -> Renders:
    found = Renders()
    for video in sorted((run_dir / SAMPLES_DIR).glob("*.mp4")):
        key = prompt_key(video.name)
        if key is None:
            found.other.append(video)
        else:
            found.by_step.setdefault(int(video.name[5:video.name.index("-", 5)]), {})[key] = video
    for video in sorted((run_dir / BASE_SAMPLES_DIR).glob("*.mp4")):
        if (key := prompt_key(video.name)) is not None:
            found.base[key] = video
    return found


def prompt_keys(config, run_dir: Path) -> list[tuple[str, str, str]]:
    """(key, prompt as listed, prompt as embedded) of each validation prompt of `config`, in order."""
    return [(prompt_key(sample_path(run_dir, 0, index, text).name), listed, text)
            for index, (listed, text) in enumerate(zip(config.validation.prompts, validation_texts(config)))]


def src(video: Path, page_dir: Path) -> str:
    """A video's address relative to the page's folder (so the folders can move together), quoted and escaped."""
    relative = Path(os.path.relpath(video, page_dir)).as_posix()
    return html.escape(quote(relative, safe="/"))


def video_tag(video: Path | None, page_dir: Path) -> str:
    if video is None:
        return '<span class="none">-</span>'
    return f'<video controls preload="metadata" src="{src(video, page_dir)}"></video>'


def grid(config, run_dir: Path, renders: Renders, headings: dict[int, str]) -> str:
    """The table prompt x step: a row per prompt (the config's first, then any other prompt the files name), a column
    for the base model where it was rendered, then one per step, headed by `headings[step]` (HTML)."""
    labels = {key: text for key, _, text in prompt_keys(config, run_dir)}
    keys = list(labels) + sorted({key for videos in renders.by_step.values() for key in videos} - set(labels))
    keys = [key for key in keys if any(key in videos for videos in renders.by_step.values()) or key in renders.base]
    base = bool(renders.base)
    steps = sorted(renders.by_step)
    head = "".join([
        "<th>prompt</th>", "<th>base model<br>(adapter off)</th>" if base else "",
        *(f"<th>{headings.get(step, f'step {step}')}</th>" for step in steps)])
    body = []
    for key in keys:
        cells = [f'<th class="prompt">{html.escape(labels.get(key, key))}</th>']
        if base:
            cells.append(f"<td>{video_tag(renders.base.get(key), run_dir)}</td>")
        cells += [f"<td>{video_tag(renders.by_step[step].get(key), run_dir)}</td>" for step in steps]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="grid"><table>\n<tr>{head}</tr>\n' + "\n".join(body) + "\n</table></div>"
