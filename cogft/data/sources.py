"""Read the clip list of a dataset: (video path, caption) pairs from the supported layouts.

Layouts: a folder with `prompts.txt` + `videos.txt` (one line each, paired, as in the official
CogVideo fine-tuning); a `.csv` / `.jsonl` metadata file with video and caption columns, or a folder
holding one as `metadata.csv` / `metadata.jsonl` (the Hub's layout, whose `file_name` column is read as
the video column); or a plain folder of clips and still images with a same-named `.txt` caption beside
each. Any list may name still images: they train as one-frame samples. Paths are relative to the folder
holding the list. Image-to-video models may be given a conditioning image per clip: an `images.txt`
beside `videos.txt` (paired line by line; a blank line means the clip's first frame) or an image column
in the metadata file; without one they take the clip's first frame. Control models read a control video per
clip the same ways: `controls.txt` (paired) or a control column; and a loss mask per clip (an image or a video
weighting the loss, white counting whole) the same ways too: `masks.txt` (paired) or a mask column. Text is read with
`surrogateescape`, so a caption that is not valid UTF-8 reaches the per-file checks (and the report) instead of
failing the whole list; problems are returned per entry (`Clip.refused`), never raised mid-list. A Hub dataset's entries
must stay inside its snapshot (`hub.escapes`); a local list may name any file its user can read.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from .captions import prefixed
from .errors import DatasetLayoutError
from .hub import dataset_folder, escapes, is_hub_path

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv", ".flv", ".3gp",
    ".ogv",
})
# still images: conditioning images of image-to-video models, and one-frame samples beside the clips
IMAGE_EXTENSIONS = frozenset({".png", ".apng", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# image formats that may hold an animation: such a file is a clip (ffmpeg decodes it), a single image a still
ANIMATED_EXTENSIONS = frozenset({".png", ".apng", ".webp", ".gif"})


def is_still(path: str | Path) -> bool:
    """Whether a listed file is a still image (a one-frame sample): an image file that is not animated."""
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS and not (suffix in ANIMATED_EXTENSIONS and is_animated(path))


def is_animated(path: str | Path) -> bool:
    """Whether an image file holds more than one frame (an animated GIF, PNG or WebP). Only a regular file is
    opened (a pipe would be waited on); one that cannot be read counts as a still, whose checks say why."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(status.st_mode) and _animated(str(path), status.st_mtime_ns, status.st_size)


@lru_cache(maxsize=4096)
def _animated(path: str, mtime_ns: int, size: int) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except Exception:  # not an image, damaged, over the pixel limit...: read as a still, which is refused with why
        return False


METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # what a folder holds in the Hub's VideoFolder/ImageFolder layout
HUB_FILE_COLUMN = "file_name"                        # that layout's column naming each file
ID_TOKEN_COLUMN = "id_token"                         # a metadata column with each clip's trigger word (finetrainers')
# data.* keys naming a column of a .csv / .jsonl
COLUMN_KEYS = ("video_column", "caption_column", "image_column", "control_column", "mask_column")


def printable(path: str | Path) -> str:
    """A path as valid text: bytes of a file name that are not UTF-8 (read as surrogates) shown as \\xNN escapes,
    for places that must encode it (cache metadata, a terminal)."""
    text = os.fspath(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte (a JSON "\\ud83d")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Clip:
    video: Path
    caption: str | None  # None: no caption given at all (vs "" for an empty one)
    line: str  # where it was listed, for reports: "videos.txt:3", "meta.csv:row 5", "clips/a.mp4"
    image: Path | None = None  # the conditioning image of image-to-video models; None: the clip's first frame
    id_token: str = ""         # the metadata file's `id_token` for this clip (a subject's trigger word), if any
    refused: tuple[str, str] | None = None  # (problem code, detail): the entry as listed cannot be used; nothing
                                            # it names is opened
    control: Path | None = None  # the control video of control models (`controls.txt`, `data.control_column`)
    mask: Path | None = None     # the loss mask, an image or a video (`masks.txt`, `data.mask_column`); None: none

    @property
    def image_source(self) -> str:
        """The conditioning image as reports name it."""
        return str(self.image) if self.image else "first frame"


# UTF-32 LE's mark begins with UTF-16 LE's: longest first
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_NEWLINE = re.compile("\r\n|\r|\n")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) fails a whole list on one long caption


def _read_text(path: Path, whole_list: bool = True) -> str:
    """A list or caption file as editors write it: UTF-8, or UTF-8/16/32 with a byte-order mark (Windows Notepad's
    "Unicode" is UTF-16 with one). Other bytes reach the per-file checks as surrogates instead of failing the list.
    NUL bytes (UTF-16 without a mark) fail a `whole_list`; in one caption the caption check reports them."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetLayoutError(f"{path}: cannot be read ({error.strerror or error}); give the user running cogft "
                                 "read access (chmod a+r)") from None
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


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _listed_path(folder: Path, entry: str) -> Path:
    """A path from a list, relative to its folder; a Windows-style path (backslashes) that does not exist as
    written is read with slashes."""
    path = folder / entry
    if "\\" in entry and not _exists(path):
        path = folder / entry.replace("\\", "/")
    return path


def _outside(within: Path | None, *paths: Path | None) -> tuple[str, str] | None:
    """The refusal of an entry of a Hub dataset (`within`: its snapshot) naming a file outside it."""
    for path in paths:
        if within is not None and path is not None and (why := escapes(path, within)):
            return "outside_dataset", f"{why}; a dataset from the Hub may name only its own files"
    return None


def _is_list(path: Path) -> bool:
    """Whether a list file (videos.txt, metadata.csv...) is there; one that is there but cannot be a list (a
    dangling link, a folder, a pipe that reading would wait on) fails the dataset rather than being passed over."""
    if path.is_file():
        return True
    if path.is_symlink() and not _exists(path):
        raise DatasetLayoutError(f"{path}: a symbolic link to {os.readlink(path)}, which cannot be followed; fix the "
                                 "link or remove it")
    if _exists(path):
        raise DatasetLayoutError(f"{path}: not a regular file (a folder, a pipe or a device); make it a text file "
                                 "or remove it")
    return False


def _check_list_file(path: Path, within: Path | None) -> None:
    if within is not None and (why := escapes(path, within)):
        raise DatasetLayoutError(f"{why}; a dataset from the Hub may name only its own files")


def _from_txt_pair(folder: Path, within: Path | None) -> list[Clip]:
    for name in ("videos.txt", "prompts.txt", "images.txt", "controls.txt", "masks.txt"):
        _check_list_file(folder / name, within)
    videos, prompts = _lines(folder / "videos.txt"), _lines(folder / "prompts.txt")
    if len(videos) != len(prompts):
        raise DatasetLayoutError(
            f"{folder}: videos.txt has {len(videos)} lines but prompts.txt has {len(prompts)}; "
            "they must pair line by line"
        )
    images = _lines(folder / "images.txt") if _is_list(folder / "images.txt") else [""] * len(videos)
    if len(images) != len(videos):
        raise DatasetLayoutError(f"{folder}: images.txt has {len(images)} lines but videos.txt has {len(videos)}; they "
                                 "must pair line by line (a blank line: that clip's first frame)")
    controls = _lines(folder / "controls.txt") if _is_list(folder / "controls.txt") else [""] * len(videos)
    if len(controls) != len(videos):
        raise DatasetLayoutError(f"{folder}: controls.txt has {len(controls)} lines but videos.txt has {len(videos)}; "
                                 "they must pair line by line (a blank line: that clip has no control video)")
    masks = _lines(folder / "masks.txt") if _is_list(folder / "masks.txt") else [""] * len(videos)
    if len(masks) != len(videos):
        raise DatasetLayoutError(f"{folder}: masks.txt has {len(masks)} lines but videos.txt has {len(videos)}; they "
                                 "must pair line by line (a blank line: that clip has no loss mask)")
    clips = []
    for i, (v, p, im, c, m) in enumerate(zip(videos, prompts, images, controls, masks)):
        if v.strip():
            video, image = _listed_path(folder, v.strip()), _listed_path(folder, im.strip()) if im.strip() else None
            control = _listed_path(folder, c.strip()) if c.strip() else None
            mask = _listed_path(folder, m.strip()) if m.strip() else None
            clips.append(Clip(video, p.strip(), f"videos.txt:{i + 1}", image,
                              refused=_outside(within, video, image, control, mask), control=control, mask=mask))
    return clips


def _caption_beside(video: Path, within: Path | None) -> tuple[str | None, tuple[str, str] | None]:
    """The caption in `<stem>.txt` beside a clip (None: there is none), or why it cannot be read."""
    caption_file = video.with_suffix(".txt")
    if not caption_file.is_symlink() and not _exists(caption_file):
        return None, None
    if refused := _outside(within, caption_file):
        return None, refused
    if not caption_file.is_file():
        return None, ("unreadable", f"its caption {caption_file.name} is not a readable file (a folder, a pipe or a "
                                    "dangling link); make it a text file")
    try:
        return _read_text(caption_file, whole_list=False).strip(), None
    except DatasetLayoutError as error:
        return None, ("unreadable", f"its caption {error}")


def _from_folder(folder: Path, within: Path | None) -> list[Clip]:
    """Every video and image file under `folder` (by extension, recursively, sorted), caption from `<stem>.txt`."""
    os.scandir(folder).close()  # an unreadable folder fails here, not as "no clips"
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
        refused = _outside(within, video)
        caption, caption_refused = (None, None) if refused else _caption_beside(video, within)
        clips.append(Clip(video, caption, str(video.relative_to(folder)), refused=refused or caption_refused))
    return clips


def _kind(value: object) -> str:
    """A JSON value's kind, for a message: 'a number (3)', 'a list'."""
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    name = names.get(type(value), type(value).__name__)
    return f"{name} ({value!r})" if isinstance(value, (bool, int, float)) else name


def _row_refusal(row: dict, columns: tuple[str, ...], header: int | None) -> tuple[str, str] | None:
    """Why a row cannot be read as one clip: a CSV row with more fields than its header (an unquoted comma in a
    caption), or a JSON value that is not text where a file name or a caption belongs."""
    if None in row:  # csv.DictReader puts a longer row's extra fields under None
        return "invalid_entry", (f"the row has {header + len(row[None])} fields but the header names {header}; "
                                 "put a caption with a comma in double quotes")
    for column in columns:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            return "invalid_entry", f"its {column!r} is {_kind(value)}, not text; write it as a JSON string"
        if value is not None and "\0" in value:
            return "invalid_entry", f"its {column!r} contains a NUL character"
    return None


def _from_rows(rows: list, file: Path, video_column: str, caption_column: str, what: str,
               image_column: str, given_columns: tuple[str, ...], within: Path | None,
               control_column: str = "control", mask_column: str = "mask") -> list[Clip]:
    if video_column == "video" and rows and all(isinstance(r, dict) and "video" not in r and HUB_FILE_COLUMN in r
                                                for r in rows):
        video_column = HUB_FILE_COLUMN  # a Hub-style metadata file, with the default column name left as it is
    names = list(dict.fromkeys(str(key) for row in rows if isinstance(row, dict) for key in row if key is not None))
    if "data.image_column" in given_columns and rows and image_column not in names:
        raise DatasetLayoutError(f"data.image_column={image_column!r}: no {what} of {file} has that column (columns: "
                                 f"{', '.join(names)}); name one of them, or leave the key out to condition each clip "
                                 "on its first frame")
    if "data.control_column" in given_columns and rows and control_column not in names:
        raise DatasetLayoutError(f"data.control_column={control_column!r}: no {what} of {file} has that column "
                                 f"(columns: {', '.join(names)}); name one of them")
    if "data.mask_column" in given_columns and rows and mask_column not in names:
        raise DatasetLayoutError(f"data.mask_column={mask_column!r}: no {what} of {file} has that column "
                                 f"(columns: {', '.join(names)}); name one of them")
    header = len(rows[0]) - (None in rows[0]) if rows and isinstance(rows[0], dict) else None
    clips = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or video_column not in row:
            columns = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise DatasetLayoutError(
                f"{file}: {what} {i + 1} has no {video_column!r} column (columns: {columns}); set data.video_column"
            )
        line = f"{file.name}:{what} {i + 1}"
        refused = _row_refusal(row, (video_column, caption_column, image_column, control_column, mask_column,
                                     ID_TOKEN_COLUMN), header)
        if refused is None and not (row[video_column] or "").strip():
            refused = "invalid_entry", f"names no file in its {video_column!r} column"
        if refused is not None:
            clips.append(Clip(file.parent, None, line, refused=refused))
            continue
        caption, image = row.get(caption_column), (row.get(image_column) or "").strip()
        video = _listed_path(file.parent, row[video_column].strip())
        image = _listed_path(file.parent, image) if image else None
        control = (row.get(control_column) or "").strip()
        control = _listed_path(file.parent, control) if control else None
        mask = (row.get(mask_column) or "").strip()
        mask = _listed_path(file.parent, mask) if mask else None
        clips.append(Clip(video, None if caption is None else caption.strip(), line, image,
                          (row.get(ID_TOKEN_COLUMN) or "").strip(), _outside(within, video, image, control, mask),
                          control, mask))
    if rows and caption_column not in names:  # a wrong column, not captions missing here and there
        raise DatasetLayoutError(f"{file}: no {what} has a {caption_column!r} column (columns: {', '.join(names)}); "
                                 "set data.caption_column")
    return clips


def _csv_rows(path: Path) -> list[dict]:
    """A CSV file's rows; a quote opened and never closed (which would swallow every row after it into one
    caption) or another malformed quote fails the list, naming the line."""
    rows, start = [], 2
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), strict=True)
        for row in reader:
            rows.append(row)
            start = reader.line_num + 1
    except csv.Error as error:
        raise DatasetLayoutError(f"{path}: the row starting at line {start} is not valid CSV ({error}); a field "
                                 "in double quotes must end with one, and a quote inside it is written twice (\"\")"
                                 ) from None
    finally:
        csv.field_size_limit(limit)
    return rows


def read_dataset(data, with_prefix: bool = True) -> list[Clip]:
    """The clips of a `data` config section: its layout and columns (a hf://datasets/ path read from its local
    snapshot, every path it names kept inside it), each caption behind `data.caption_prefix` and the clip's
    `id_token` (`with_prefix`)."""
    path, within = dataset_folder(data.path) if is_hub_path(data.path) else (data.path, None)
    defaults = type(data).model_fields
    given = tuple(f"data.{key}" for key in COLUMN_KEYS if getattr(data, key) != defaults[key].default)
    clips = read_clips(path, data.video_column, data.caption_column, data.image_column, within=within,
                       given_columns=given, control_column=data.control_column, mask_column=data.mask_column)
    return with_trigger_words(clips, data.caption_prefix) if with_prefix else clips


@dataclass(frozen=True)
class DataSet:
    """One source of the run's data (`data.sets[i]`, or `data.path` alone): its own data section, as a run with it
    alone would have it, and how it is mixed."""

    key: str           # how messages name it: "data.sets[1]", or "data" for `data.path`
    data: object       # the `data` section with this set's path, caption prefix and buckets, and no `sets`
    index: int = 0
    prior: bool = False           # `kind: prior`: trained towards the base model's prediction, not its clips
    repeats: int = 1
    weight: float | None = None   # the set's share of an epoch instead of `repeats`


def data_sets(data) -> list[DataSet]:
    """The sources of a `data` section: each of `data.sets`, or `data.path` as the one set."""
    if not data.sets:
        return [DataSet("data", data)]
    return [DataSet(f"data.sets[{i}]", data.model_copy(update={
        "path": s.path, "sets": None,
        "caption_prefix": data.caption_prefix if s.caption_prefix is None else s.caption_prefix,
        "buckets": data.buckets if s.buckets is None else s.buckets,
    }), i, s.kind == "prior", s.repeats or 1, s.weight) for i, s in enumerate(data.sets)]


def read_set(data_set: DataSet, with_prefix: bool = True) -> list[Clip]:
    """A set's clips (`read_dataset`), refused by key where its list names none."""
    try:
        clips = read_dataset(data_set.data, with_prefix)
    except DatasetLayoutError as error:
        if data_set.key == "data":
            raise
        raise DatasetLayoutError(f"{data_set.key}.path: {str(error).removeprefix('data.path ')}") from None
    if not clips and data_set.key != "data":  # data.path alone: the dataset's own "empty" error says more
        raise DatasetLayoutError(f"{data_set.key}.path: {data_set.data.path} has no clips; list at least one, or "
                                 f"remove the set")
    return clips


def with_trigger_words(clips: list[Clip], caption_prefix: str) -> list[Clip]:
    """Each caption behind the clip's `id_token` and then `caption_prefix`, as it is embedded."""
    return [replace(clip, caption=prefixed(prefixed(clip.caption, clip.id_token), caption_prefix)) for clip in clips]


def read_clips(path: str | Path, video_column: str = "video", caption_column: str = "caption",
               image_column: str = "image", *, within: Path | None = None,
               given_columns: tuple[str, ...] = (), control_column: str = "control",
               mask_column: str = "mask") -> list[Clip]:
    """`within`: the snapshot of a Hub dataset, which every listed path must stay inside; `given_columns`: the
    column keys set to names of the user's choice, which the list must have (a misspelled data.image_column
    would otherwise condition every clip on its first frame). A folder or list that cannot be read stops with an
    error naming it."""
    try:
        return _read_clips(Path(path), video_column, caption_column, image_column, within, given_columns,
                           control_column, mask_column)
    except OSError as error:  # a folder without read access, a list file gone meanwhile...
        raise DatasetLayoutError(f"{error.filename or path}: cannot be read ({error.strerror or error}); give the "
                                 "user running cogft access to it") from None


def _read_clips(path: Path, video_column: str, caption_column: str, image_column: str, within: Path | None,
                given_columns: tuple[str, ...], control_column: str = "control",
                mask_column: str = "mask") -> list[Clip]:
    if path.is_dir():
        videos, prompts = _is_list(path / "videos.txt"), _is_list(path / "prompts.txt")
        if videos and prompts:
            _no_columns(given_columns, path, "a videos.txt + prompts.txt folder (images go in images.txt, control "
                                             "videos in controls.txt, loss masks in masks.txt)")
            return _from_txt_pair(path, within)
        for name in METADATA_FILES:  # the Hub's folder convention (its file_name column is understood too)
            if _is_list(path / name):
                return _read_clips(path / name, video_column, caption_column, image_column, within, given_columns,
                                   control_column, mask_column)
        _no_columns(given_columns, path, "a folder of clips with a .txt caption beside each")
        return _from_folder(path, within)
    if not path.is_file():
        raise DatasetLayoutError(f"data.path {path} does not exist")
    _check_list_file(path, within)
    if path.suffix == ".csv":
        rows, what = _csv_rows(path), "row"
    elif path.suffix in (".jsonl", ".json"):
        rows, what = _jsonl_rows(path), "line"
    else:
        raise DatasetLayoutError(f"data.path {path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    return _from_rows(rows, path, video_column, caption_column, what, image_column, given_columns, within,
                      control_column, mask_column)


def _no_columns(given_columns: tuple[str, ...], path: Path, layout: str) -> None:
    if given_columns:
        raise DatasetLayoutError(f"{', '.join(given_columns)}: {path} is {layout}, which has no columns to name; "
                                 "leave the key out, or point data.path at a .csv / .jsonl list")


def _jsonl_rows(path: Path) -> list:
    rows = []
    for n, line in enumerate(_NEWLINE.split(_read_text(path))):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetLayoutError(f"{path}: line {n + 1} is not valid JSON: {error}") from None
            except RecursionError:
                raise DatasetLayoutError(f"{path}: line {n + 1} nests too deeply to read; each line must be one "
                                         "object like {\"video\": ..., \"caption\": ...}") from None
    return rows
