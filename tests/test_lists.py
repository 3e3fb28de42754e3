"""Lists, captions and folders as people's machines write them: every encoding and line ending editors use,
Windows paths, and file-system oddities. Each gets the right outcome (read, or skipped with the true reason),
never a traceback, a dropped clip or a misleading reason."""

import os
import shutil
from pathlib import Path

import pytest

from cogft.data.checks import admission_problems, caption_problem, file_problem
from cogft.data.sources import DatasetLayoutError, read_clips

REPO = Path(__file__).resolve().parent.parent
NAMES = ("bouncing_square", "fractal_zoom")
CAPTIONS = ("un carré rouge qui rebondit", "フラクタル")  # non-ASCII: a wrong decode shows


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "set"
    (folder / "videos").mkdir(parents=True)
    for name in NAMES:
        shutil.copy(REPO / "data" / "videos" / f"{name}.mp4", folder / "videos")
    return folder


@pytest.mark.parametrize("encoding,newline", [("utf-8", "\n"), ("utf-8-sig", "\r\n"), ("utf-16", "\r\n"),
                                              ("utf-16-be", "\n"), ("utf-32", "\n"), ("utf-8", "\r")])
def test_paired_lists_in_any_editor_encoding_and_line_ending_read_the_same(tmp_path, encoding, newline):
    folder = _folder(tmp_path)
    bom = {"utf-16-be": "\ufeff"}.get(encoding, "")  # the BE codec writes no mark itself; editors do
    for name, lines in (("videos.txt", [f"videos/{n}.mp4" for n in NAMES]), ("prompts.txt", CAPTIONS)):
        (folder / name).write_bytes((bom + newline.join(lines) + newline).encode(encoding))
    clips = read_clips(folder)
    assert [c.video for c in clips] == [folder / "videos" / f"{n}.mp4" for n in NAMES]
    assert [c.caption for c in clips] == list(CAPTIONS)
    assert all(file_problem(c.video) is None for c in clips)


def test_metadata_with_a_byte_order_mark_crlf_and_windows_paths(tmp_path):
    folder = _folder(tmp_path)
    rows = ["video,caption", *(f"videos\\{n}.mp4,{c}" for n, c in zip(NAMES, CAPTIONS))]
    (folder / "meta.csv").write_bytes("\r\n".join(rows).encode("utf-8-sig"))
    clips = read_clips(folder / "meta.csv")  # the mark would otherwise be part of the first column's name
    assert [c.video for c in clips] == [folder / "videos" / f"{n}.mp4" for n in NAMES]
    assert [c.caption for c in clips] == list(CAPTIONS)
    lines = [f'{{"video": "videos/{n}.mp4", "caption": "{c}"}}' for n, c in zip(NAMES, CAPTIONS)]
    (folder / "meta.jsonl").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    assert [c.caption for c in read_clips(folder / "meta.jsonl")] == list(CAPTIONS)


def test_a_list_saved_as_utf16_without_a_mark_is_refused_by_name_and_a_caption_file_is_skipped(tmp_path):
    folder = _folder(tmp_path)
    (folder / "videos.txt").write_bytes("videos/bouncing_square.mp4\n".encode("utf-16-le"))
    (folder / "prompts.txt").write_text("a\n")
    with pytest.raises(DatasetLayoutError, match="videos.txt: contains NUL bytes.*re-save it as UTF-8"):
        read_clips(folder)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(folder / "videos" / "bouncing_square.mp4", plain / "clip.mp4")
    (plain / "clip.txt").write_bytes("a red square".encode("utf-16-le"))
    [clip] = read_clips(plain)
    assert caption_problem(clip.caption).code == "caption_not_utf8"


def test_file_system_oddities_get_their_true_reason(tmp_path, monkeypatch):
    folder = _folder(tmp_path)
    clip = folder / "videos" / "bouncing_square.mp4"
    (folder / "link.mp4").symlink_to(clip)
    (folder / "dangling.mp4").symlink_to(folder / "gone.mp4")
    os.mkfifo(folder / "pipe.mp4")
    assert file_problem(folder / "link.mp4") is None
    dangling = file_problem(folder / "dangling.mp4")
    assert dangling.code == "not_found" and "symbolic link to" in dangling.detail and "gone.mp4" in dangling.detail
    assert file_problem(folder / "pipe.mp4").code == "not_a_video"  # reading it would wait forever

    real_open = Path.open  # root reads any file whatever its mode, so the refusal is simulated

    def refused(self, *args, **kwargs):
        if self == clip:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refused)
    problem = file_problem(clip)
    assert problem.code == "unreadable" and "Permission denied" in problem.detail


def test_a_pipe_in_a_folder_of_clips_is_skipped_not_waited_on(tmp_path):
    folder = _folder(tmp_path) / "videos"
    os.mkfifo(folder / "stream.mp4")
    (folder / "stream.txt").write_text("a stream")
    clips = read_clips(folder)
    problems = admission_problems(clips, [])
    by_name = {c.video.name: problems[c.line] for c in clips}
    assert [p.code for p in by_name["stream.mp4"]] == ["not_a_video"]
