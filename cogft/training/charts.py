"""Line charts of metrics.jsonl series, as inline SVG (report.html, compare.html) and as a PNG drawn with Pillow
(curves.png): no plotting library, nothing fetched when a page opens."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

WIDTH, HEIGHT = 720, 260  # one chart; curves.png stacks them
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 16, 30, 34
PALETTE = ("#1f4e9c", "#c05a1c", "#2a8a3e", "#b0489a", "#8a6d1f", "#1c8a8a", "#7a3fc0", "#555555")

Points = list[tuple[float, float]]


def series(rows: list[dict], key: str) -> Points:
    """(step, value) of each row that logs `key` as a finite number."""
    return [(row["step"], float(row[key])) for row in rows
            if isinstance(row.get(key), (int, float)) and not isinstance(row[key], bool) and math.isfinite(row[key])]


@dataclass(frozen=True)
class Chart:
    title: str
    series: list[tuple[str, str, Points]]  # (name, colour, [(step, value)]), finite values only
    limits: list[tuple[str, float]] = field(default_factory=list)  # (label, value): a dashed line across the chart

    def ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        points = [p for _, _, pts in self.series for p in pts]
        steps = [p[0] for p in points] or [0.0]
        values = [p[1] for p in points] + [value for _, value in self.limits] or [0.0]
        return (min(steps), max(steps)), (min(values), max(values))

    def _at(self):
        (s0, s1), (v0, v1) = self.ranges()
        x0, x1, y0, y1 = _LEFT, WIDTH - _RIGHT, _TOP, HEIGHT - _BOTTOM

        def at(step: float, value: float) -> tuple[float, float]:
            x = x0 + (step - s0) / (s1 - s0) * (x1 - x0) if s1 > s0 else (x0 + x1) / 2
            y = y1 - (value - v0) / (v1 - v0) * (y1 - y0) if v1 > v0 else (y0 + y1) / 2
            return x, y

        return at

    def plotted(self) -> list[tuple[str, str, list[tuple[float, float]]]]:
        """Each series in pixels of a WIDTH x HEIGHT chart (y grows downwards); a flat range sits mid-height."""
        at = self._at()
        return [(name, colour, [at(*p) for p in pts]) for name, colour, pts in self.series]

    def limit_lines(self) -> list[tuple[str, float]]:
        """(label, y in pixels) of each limit."""
        at = self._at()
        return [(label, at(0, value)[1]) for label, value in self.limits]

    def labels(self) -> list[tuple[float, float, str, str, str]]:
        """(x, y, anchor, text, colour): the title, each series' name in its colour, the value and step ranges, and
        each limit's label at its line's right end."""
        (s0, s1), (v0, v1) = self.ranges()
        bottom = HEIGHT - _BOTTOM
        legend = [(_LEFT + 140 * (i + 1), 18, "start", name, colour) for i, (name, colour, _) in enumerate(self.series)]
        limits = [(WIDTH - _RIGHT, y - 4, "end", label, "#666") for label, y in self.limit_lines()]
        return [(_LEFT, 18, "start", self.title, "black"), *legend, *limits,
                (_LEFT - 6, _TOP + 4, "end", f"{v1:.3g}", "black"), (_LEFT - 6, bottom, "end", f"{v0:.3g}", "black"),
                (_LEFT, bottom + 20, "start", f"step {s0:g}", "black"),
                (WIDTH - _RIGHT, bottom + 20, "end", f"step {s1:g}", "black")]


def svg(chart: Chart) -> str:
    """The chart as an inline <svg>: each series a <polyline data-series=NAME>, each limit a dashed <line>."""
    bottom, right = HEIGHT - _BOTTOM, WIDTH - _RIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(chart.title)}">',
             f'<path d="M{_LEFT} {_TOP} V{bottom} H{right}" fill="none" stroke="#888"/>']
    for label, y in chart.limit_lines():
        parts.append(f'<line data-limit="{html.escape(label)}" x1="{_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#d03030" stroke-dasharray="6 4"/>')
    for name, colour, points in chart.plotted():
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points * (2 if len(points) == 1 else 1))  # 1 step: a dot
        parts.append(f'<polyline data-series="{html.escape(name)}" fill="none" stroke="{colour}" stroke-width="1.5" '
                     f'stroke-linecap="round" points="{coords}"><title>{html.escape(name)}</title></polyline>')
    for x, y, anchor, text, colour in chart.labels():
        parts.append(f'<text x="{x}" y="{y:.1f}" text-anchor="{anchor}" fill="{colour}" font-size="12">'
                     f"{html.escape(text)}</text>")
    return "\n".join([*parts, "</svg>"])


def png(charts: list[Chart], path: Path) -> None:
    """The same charts, stacked, as a PNG drawn with Pillow (already installed for imageio)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT * len(charts)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for index, chart in enumerate(charts):
        top = index * HEIGHT
        draw.line([(_LEFT, top + _TOP), (_LEFT, top + HEIGHT - _BOTTOM), (WIDTH - _RIGHT, top + HEIGHT - _BOTTOM)],
                  fill="#888888")
        for _, y in chart.limit_lines():
            for x in range(_LEFT, WIDTH - _RIGHT, 10):  # dashed
                draw.line([(x, top + y), (min(x + 6, WIDTH - _RIGHT), top + y)], fill="#d03030")
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
