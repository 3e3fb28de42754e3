"""Per-file checks shared by `prepare` and `cogft doctor`, so both say the same thing about a clip.

A problem has a stable short code (for totals: "skipped by reason") and a detail that names the
file's issue and the fix. Checks here need no decoder: existence, size, caption text, duplicates.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from .sources import Clip, is_still


@dataclass(frozen=True)
class Problem:
    code: str    # stable: not_found, empty_file, not_a_video, no_video_stream, decode_failed, damaged_stream
                 # (decode errors inside the frames to train on), decoder_crashed, too_short, missing_caption,
                 # empty_caption, caption_not_utf8, duplicate,
                 # unreadable, image_missing, image_unreadable (conditioning images and still samples),
                 # still_unsupported (a still image where the model cannot train on one frame),
                 # outside_dataset (a Hub dataset naming a file outside itself), invalid_entry (a list entry that
                 # is not a file name and a caption: a JSON number, an unquoted comma), extreme_aspect (a picture
                 # data.resize=crop would scale to a huge size to keep a sliver of it)
    detail: str  # what exactly is wrong and what to do about it


# problems that leave nothing to open: the file's metadata is not read after one of these
NO_FILE = frozenset(("not_found", "empty_file", "not_a_video", "unreadable", "outside_dataset", "invalid_entry"))


def file_problem(path: Path) -> Problem | None:
    """A reason the file cannot be a clip, checked before any decode: missing (or a link to nothing), not a
    regular file (a folder; a pipe or device, which a reader would wait on forever), empty, or not readable."""
    try:
        return _file_problem(path)
    except (OSError, ValueError) as error:  # a name too long, a link loop, a file gone meanwhile
        return Problem("unreadable", f"cannot be examined ({getattr(error, 'strerror', None) or error}); fix the "
                                     "name or the file")


def _file_problem(path: Path) -> Problem | None:
    if not path.exists():
        if path.is_symlink():
            return Problem("not_found", f"a symbolic link to {os.readlink(path)}, which cannot be followed; "
                                        "fix the link or the list")
        return Problem("not_found", "file not found; fix the path in the list or add the file")
    if path.is_dir():
        return Problem("not_found", "is a directory, not a video file")
    if not path.is_file():
        return Problem("not_a_video", "not a regular file (a pipe, socket or device); list the video file itself")
    if path.stat().st_size == 0:
        return Problem("empty_file", "empty file (0 bytes); re-export or remove it")
    try:
        path.open("rb").close()
    except OSError as error:
        return Problem("unreadable", f"cannot be opened ({error.strerror or error}); give the user running cogft "
                                     "read access (chmod a+r) or copy it")
    return None


def caption_problem(caption: str | None, line: str = "") -> Problem | None:
    """`line`: where the clip is listed (`Clip.line`), so an empty caption of a videos.txt list names the line of
    prompts.txt to write it on (`cogft split` leaves them empty for the user)."""
    if caption is None:
        return Problem("missing_caption", "no caption (for a folder of clips: a .txt with the same name beside it)")
    if not caption:
        where = f" on line {line.partition(':')[2]} of prompts.txt" if line.startswith("videos.txt:") else ""
        return Problem("empty_caption", f"the caption is empty; write one{where} or remove the clip")
    if "\0" in caption:
        return Problem("caption_not_utf8", "the caption contains NUL characters (UTF-16 saved without a byte-order "
                                           "mark?); re-save it as UTF-8")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as error:
        try:
            bad = f"byte 0x{caption[error.start].encode('utf-8', 'surrogateescape').hex()}"
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape, not a byte of the file
            bad = f"a lone surrogate \\u{ord(caption[error.start]):x}"
        return Problem(
            "caption_not_utf8",
            f"the caption is not valid UTF-8 ({bad} at character {error.start}); re-save it as UTF-8",
        )
    return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def repeated_entries(clips: list[Clip]) -> dict[str, str]:
    """Entries that list the same file with the same caption as an earlier one: {line: first line}.

    Found by path, without reading the files; same bytes under another path: `content_repeats`.
    """
    first: dict[tuple[Path, str | None], str] = {}
    repeats = {}
    for clip in clips:
        if clip.refused:
            continue
        try:
            key = (clip.video.resolve(), clip.caption)
        except (OSError, RuntimeError, ValueError):  # a link loop, a name no file system takes: file_problem says so
            continue
        if key in first:
            repeats[clip.line] = first[key]
        else:
            first[key] = clip.line
    return repeats


def byte_duplicates(clips: list[Clip]) -> list[list[str]]:
    """Groups of listed entries whose files have the same bytes; only files of equal size are hashed."""
    by_size = defaultdict(list)
    for clip in clips:
        if not clip.refused and file_problem(clip.video) is None:
            by_size[clip.video.stat().st_size].append(clip)
    groups = defaultdict(list)
    for same_size in by_size.values():
        if len(same_size) > 1:
            for clip in same_size:
                groups[file_digest(clip.video)].append(clip.line)
    return [lines for lines in groups.values() if len(lines) > 1]


def content_repeats(duplicates: list[list[str]], clips: list[Clip]) -> dict[str, str]:
    """Entries with the same bytes (`byte_duplicates`) and the same caption as an earlier entry: {line: first line}.

    Cheap enough for every rank to compute over the whole list before sharding, so copies that land
    on different ranks are caught before either is encoded.
    """
    caption_of = {clip.line: clip.caption for clip in clips}
    repeats = {}
    for group in duplicates:
        first_with: dict[str | None, str] = {}
        for line in group:
            first = first_with.setdefault(caption_of[line], line)
            if first != line:
                repeats[line] = first
    return repeats


def admission_problems(clips: list[Clip], duplicates: list[list[str]],
                       single_frame_problem: str | None = None) -> dict[str, list[Problem]]:
    """The one admission rule before any decode, shared by prepare and `cogft doctor` so they cannot drift
    apart: {line: problems}, empty where the entry goes on to decoding. `duplicates`: `byte_duplicates(clips)`;
    `single_frame_problem`: why the model cannot train on one frame (`Variant.single_frame_problem`), which turns
    every still image away first.

    Computed over the whole list, so copies that prepare's ranks would split are still caught.
    """
    repeats = repeated_entries(clips)
    same_content = content_repeats(duplicates, clips)
    found = {}
    for clip in clips:
        if clip.refused:  # nothing it names is opened
            found[clip.line] = [Problem(*clip.refused)]
            continue
        problems = [p for p in (file_problem(clip.video), caption_problem(clip.caption, clip.line)) if p]
        if single_frame_problem and is_still(clip.video):
            problems.insert(0, Problem("still_unsupported",
                                       f"a still image (a one-frame sample): {single_frame_problem}"
                                       "; train it with a text-to-video model or leave it out"))
        if clip.line in repeats:
            problems.append(Problem("duplicate", f"the same file and caption as {repeats[clip.line]}; "
                                                 "listed once is enough"))
        elif clip.line in same_content:
            problems.append(Problem("duplicate", f"the same video bytes and caption as {same_content[clip.line]}"))
        found[clip.line] = problems
    return found


def summarize_problems(rows: list[dict]) -> dict[str, int]:
    """Counts of skipped rows by problem code, most frequent first."""
    return dict(Counter(r["problem"] for r in rows if r.get("status") == "skipped").most_common())
