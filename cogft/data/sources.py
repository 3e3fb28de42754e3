"""Read the clip list of a dataset: (video path, caption) pairs from the supported layouts.

Layouts: a folder with `prompts.txt` + `videos.txt` (one line each, paired, as in the official
CogVideo fine-tuning), or a `.csv` / `.jsonl` metadata file with video and caption columns. Paths
are relative to the folder holding the list. Problems are returned per entry, never raised mid-list.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


class DatasetLayoutError(ValueError):
    """The dataset path itself is unusable (no list found, unreadable metadata)."""


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str
    line: str  # where it was listed, for reports: "videos.txt:3", "meta.csv:row 5"


def _from_txt_pair(folder: Path) -> list[Clip]:
    videos = (folder / "videos.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    prompts = (folder / "prompts.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    if len(videos) != len(prompts):
        raise DatasetLayoutError(
            f"{folder}: videos.txt has {len(videos)} lines but prompts.txt has {len(prompts)}; they must pair line by line"
        )
    return [
        Clip(folder / v.strip(), p.strip(), f"videos.txt:{i + 1}")
        for i, (v, p) in enumerate(zip(videos, prompts))
        if v.strip()
    ]


def _from_rows(rows: list[dict], file: Path, video_column: str, caption_column: str, what: str) -> list[Clip]:
    clips = []
    for i, row in enumerate(rows):
        if video_column not in row:
            raise DatasetLayoutError(
                f"{file}: {what} {i + 1} has no {video_column!r} column (columns: {', '.join(row)}); "
                "set data.video_column"
            )
        caption = row.get(caption_column)
        clips.append(Clip(file.parent / str(row[video_column]), str(caption or "").strip(), f"{file.name}:{what} {i + 1}"))
    return clips


def read_clips(path: str | Path, video_column: str = "video", caption_column: str = "caption") -> list[Clip]:
    path = Path(path)
    if path.is_dir():
        if (path / "videos.txt").is_file() and (path / "prompts.txt").is_file():
            return _from_txt_pair(path)
        raise DatasetLayoutError(
            f"{path}: no videos.txt + prompts.txt found; point data.path at such a folder or at a .csv/.jsonl file"
        )
    if not path.is_file():
        raise DatasetLayoutError(f"data.path {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return _from_rows(list(csv.DictReader(handle)), path, video_column, caption_column, "row")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetLayoutError(f"{path}: line {n + 1} is not valid JSON: {error}") from None
        return _from_rows(rows, path, video_column, caption_column, "line")
    raise DatasetLayoutError(f"data.path {path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
