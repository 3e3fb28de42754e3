"""Read the clip list of a dataset: (video path, caption) pairs from the supported layouts.

Layouts: a folder with `prompts.txt` + `videos.txt` (one line each, paired, as in the official
CogVideo fine-tuning); a `.csv` / `.jsonl` metadata file with video and caption columns, or a folder
holding one as `metadata.csv` / `metadata.jsonl` (the Hub's layout, whose `file_name` column is read as
the video column); or a plain folder of clips and still images with a same-named `.txt` caption beside
each. Any list may name still images: they train as one-frame samples. Paths are relative to the folder
holding the list. Image-to-video models may be given a conditioning image per clip: an `images.txt`
beside `videos.txt` (paired line by line; a blank line means the clip's first frame) or an image column
in the metadata file; without one they take the clip's first frame. Text is read with `surrogateescape`,
so a caption that is not valid UTF-8 reaches the per-file checks (and the report) instead of failing the
whole list; problems are returned per entry, never raised mid-list.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .captions import prefixed
from .errors import DatasetLayoutError
from .hub import dataset_folder, is_hub_path

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv", ".flv", ".3gp",
    ".ogv", ".gif",
})
# still images: conditioning images of image-to-video models, and one-frame samples beside the clips
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def is_still(path: str | Path) -> bool:
    """Whether a listed file is a still image (a one-frame sample), by its extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # what a folder holds in the Hub's VideoFolder/ImageFolder layout
HUB_FILE_COLUMN = "file_name"                        # that layout's column naming each file
ID_TOKEN_COLUMN = "id_token"                         # a metadata column with each clip's trigger word (finetrainers')


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str | None  # None: no caption given at all (vs "" for an empty one)
    line: str  # where it was listed, for reports: "videos.txt:3", "meta.csv:row 5", "clips/a.mp4"
    image: Path | None = None  # the conditioning image of image-to-video models; None: the clip's first frame
    id_token: str = ""         # the metadata file's `id_token` for this clip (a subject's trigger word), if any

    @property
    def image_source(self) -> str:
        """The conditioning image as reports name it."""
        return str(self.image) if self.image else "first frame"


# UTF-32 LE's mark begins with UTF-16 LE's: longest first
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_NEWLINE = re.compile("\r\n|\r|\n")


def _read_text(path: Path, whole_list: bool = True) -> str:
    """A list or caption file as editors write it: UTF-8, or UTF-8/16/32 with a byte-order mark (Windows Notepad's
    "Unicode" is UTF-16 with one). Other bytes reach the per-file checks as surrogates instead of failing the list.
    NUL bytes (UTF-16 without a mark) fail a `whole_list`; in one caption the caption check reports them."""
    data = path.read_bytes()
    for mark, encoding in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as error:
                raise DatasetLayoutError(f"{path}: starts with a {encoding} byte-order mark but is not valid "
                                         f"{encoding} ({error.reason} at byte {error.start}); re-save it as UTF-8"
                                         ) from None
    if whole_list and b"\0" in data:
        raise DatasetLayoutError(f"{path}: contains NUL bytes, so it is not UTF-8 text (UTF-16 without a byte-order "
                                 "mark?); re-save it as UTF-8")
    return data.decode("utf-8", errors="surrogateescape")


def _lines(path: Path) -> list[str]:
    """Lines ending in \\n, \\r\\n or a lone \\r (old Mac editors); str.splitlines would also split on U+2028 and
    the like, which would unpair lists."""
    lines = _NEWLINE.split(_read_text(path))
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _listed_path(folder: Path, entry: str) -> Path:
    """A path from a list, relative to its folder; a Windows-style path (backslashes) that does not exist as
    written is read with slashes."""
    path = folder / entry
    if "\\" in entry and not path.exists():
        path = folder / entry.replace("\\", "/")
    return path


def _from_txt_pair(folder: Path) -> list[Clip]:
    videos, prompts = _lines(folder / "videos.txt"), _lines(folder / "prompts.txt")
    if len(videos) != len(prompts):
        raise DatasetLayoutError(
            f"{folder}: videos.txt has {len(videos)} lines but prompts.txt has {len(prompts)}; "
            "they must pair line by line"
        )
    images = _lines(folder / "images.txt") if (folder / "images.txt").is_file() else [""] * len(videos)
    if len(images) != len(videos):
        raise DatasetLayoutError(f"{folder}: images.txt has {len(images)} lines but videos.txt has {len(videos)}; they "
                                 "must pair line by line (a blank line: that clip's first frame)")
    return [
        Clip(_listed_path(folder, v.strip()), p.strip(), f"videos.txt:{i + 1}",
             _listed_path(folder, im.strip()) if im.strip() else None)
        for i, (v, p, im) in enumerate(zip(videos, prompts, images))
        if v.strip()
    ]


def _from_folder(folder: Path) -> list[Clip]:
    """Every video and image file under `folder` (by extension, recursively, sorted), caption from `<stem>.txt`."""
    kinds = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    videos = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in kinds and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not videos:
        raise DatasetLayoutError(
            f"{folder}: no videos.txt + prompts.txt and no video or image files ({', '.join(sorted(kinds))}); "
            "point data.path at a folder of clips (and images) with a .txt caption beside each, or at a .csv/.jsonl "
            "file"
        )
    clips = []
    for video in videos:
        caption_file = video.with_suffix(".txt")
        caption = _read_text(caption_file, whole_list=False).strip() if caption_file.is_file() else None
        clips.append(Clip(video, caption, str(video.relative_to(folder))))
    return clips


def _from_rows(rows: list[dict], file: Path, video_column: str, caption_column: str, what: str,
               image_column: str) -> list[Clip]:
    if video_column == "video" and rows and all(isinstance(r, dict) and "video" not in r and HUB_FILE_COLUMN in r
                                                for r in rows):
        video_column = HUB_FILE_COLUMN  # a Hub-style metadata file, with the default column name left as it is
    clips = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or video_column not in row:
            columns = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DatasetLayoutError(
                f"{file}: {what} {i + 1} has no {video_column!r} column (columns: {columns}); set data.video_column"
            )
        caption, image = row.get(caption_column), str(row.get(image_column) or "").strip()
        clips.append(Clip(
            _listed_path(file.parent, str(row[video_column]).strip()),
            None if caption is None else str(caption).strip(),
            f"{file.name}:{what} {i + 1}",
            _listed_path(file.parent, image) if image else None,
            str(row.get(ID_TOKEN_COLUMN) or "").strip(),
        ))
    if rows and not any(caption_column in row for row in rows):  # a wrong column, not captions missing here and there
        raise DatasetLayoutError(f"{file}: no {what} has a {caption_column!r} column (columns: {', '.join(rows[0])}); "
                                 "set data.caption_column")
    return clips


def read_dataset(data, with_prefix: bool = True) -> list[Clip]:
    """The clips of a `data` config section: its layout and columns (a hf://datasets/ path read from its local
    snapshot), each caption behind `data.caption_prefix` and the clip's `id_token` (`with_prefix`)."""
    path = dataset_folder(data.path) if is_hub_path(data.path) else data.path
    clips = read_clips(path, data.video_column, data.caption_column, data.image_column)
    return with_trigger_words(clips, data.caption_prefix) if with_prefix else clips


def with_trigger_words(clips: list[Clip], caption_prefix: str) -> list[Clip]:
    """Each caption behind the clip's `id_token` and then `caption_prefix`, as it is embedded."""
    return [replace(clip, caption=prefixed(prefixed(clip.caption, clip.id_token), caption_prefix)) for clip in clips]


def read_clips(path: str | Path, video_column: str = "video", caption_column: str = "caption",
               image_column: str = "image") -> list[Clip]:
    path = Path(path)
    if path.is_dir():
        if (path / "videos.txt").is_file() and (path / "prompts.txt").is_file():
            return _from_txt_pair(path)
        for name in METADATA_FILES:  # the Hub's folder convention (its file_name column is understood too)
            if (path / name).is_file():
                return read_clips(path / name, video_column, caption_column, image_column)
        return _from_folder(path)
    if not path.is_file():
        raise DatasetLayoutError(f"data.path {path} does not exist")
    if path.suffix == ".csv":
        return _from_rows(list(csv.DictReader(io.StringIO(_read_text(path), newline=""))), path,
                          video_column, caption_column, "row", image_column)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(_NEWLINE.split(_read_text(path))):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetLayoutError(f"{path}: line {n + 1} is not valid JSON: {error}") from None
        return _from_rows(rows, path, video_column, caption_column, "line", image_column)
    raise DatasetLayoutError(f"data.path {path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
