"""`cogft split`: long videos cut at scene changes into clips of the model's length, listed for data.path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny-lora.yaml")  # data.num_frames 9 at data.fps 8: a clip is 1.125 s of source
SEAM = 72  # two 3 s sample clips at 24 fps, joined


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory) -> Path:
    """A folder of "long" videos: two sample clips joined (with a sidecar caption), one without a caption, and a
    file that is not a video. Small frames, so the whole module runs in seconds."""
    from cogft.data.probe import ffmpeg_exe

    folder = tmp_path_factory.mktemp("long")
    videos = REPO / "data" / "videos"
    joined = "[0:v]scale=96:64,setsar=1[a];[1:v]scale=96:64,setsar=1[b];[a][b]concat=n=2:v=1[v]"
    ffmpeg = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    subprocess.run([*ffmpeg, "-i", str(videos / "test_pattern.mp4"), "-i", str(videos / "fractal_zoom.mp4"),
                    "-filter_complex", joined, "-map", "[v]", *h264, str(folder / "joined.mp4")], check=True)
    (folder / "joined.txt").write_text("a test pattern, then a fractal\nzooming in\n")
    subprocess.run([*ffmpeg, "-i", str(videos / "rotating_gradient.mp4"), "-vf", "scale=96:64", *h264,
                    str(folder / "uncaptioned.mp4")], check=True)
    (folder / "notes.mp4").write_text("not a video\n")
    return folder


def _split(src: Path, out: Path, *flags: str) -> int:
    from cogft.cli import main

    return main(["split", str(src), str(out), *flags])


def _frames(path: Path) -> np.ndarray:
    """Every frame of a video, to compare clips with their source frames."""
    from cogft.data.probe import ffmpeg_exe

    raw = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-fps_mode", "passthrough", "-f",
                          "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True)
    return np.frombuffer(raw.stdout, np.uint8).reshape(-1, 64, 96, 3)


def test_a_joined_clip_is_cut_at_the_seam_into_clips_of_the_model_length(long_videos, tmp_path):
    from cogft.data.split import SplitSettings, detect_scenes

    scenes = detect_scenes(long_videos / "joined.mp4", SplitSettings(9, 8.0, 9, None))
    assert len(scenes) == 2 and abs(scenes[0][1] - SEAM) <= 1 and scenes[1][0] == scenes[0][1]

    assert _split(long_videos, tmp_path / "out", "--config", TINY, "--crf", "0") == 0  # lossless: frames compare equal
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    pieces = record["sources"][str((long_videos / "joined.mp4").resolve())]["clips"]
    # 3 s per scene holds two 1.125 s clips (27 source frames each); the rest of each scene is left out
    assert [(p["scene"], p["first_frame"], p["frames"]) for p in pieces] == [
        (1, 0, 27), (1, 27, 27), (2, SEAM, 27), (2, SEAM + 27, 27)]
    source = _frames(long_videos / "joined.mp4")
    for piece in pieces:  # each clip holds exactly its source frames: none from across the seam, none missing
        clip = _frames(tmp_path / "out" / piece["clip"])
        assert np.array_equal(clip, source[piece["first_frame"]:piece["first_frame"] + piece["frames"]])
    assert pieces[2]["start"] == pytest.approx(SEAM / 24)


def test_a_container_without_an_index_is_cut_as_exactly(long_videos, tmp_path):
    """MPEG-TS starts at 1.4 s and has no index; with one keyframe (x264 ultrafast, 6 s) a seek would find none."""
    from cogft.data.probe import ffmpeg_exe
    from cogft.data.split import SplitSettings, split

    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "joined.ts"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(long_videos / "joined.mp4"), "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(source)], check=True)
    split(source, tmp_path / "out", SplitSettings(9, 8.0, 9, None, crf=0))
    clips = json.loads((tmp_path / "out" / "split.json").read_text())["sources"][str(source.resolve())]["clips"]
    frames = _frames(source)
    assert [c["first_frame"] for c in clips] == [0, 27, SEAM, SEAM + 27]
    for clip in clips:
        assert np.array_equal(_frames(tmp_path / "out" / clip["clip"]), frames[clip["first_frame"]:][:clip["frames"]])


def test_the_lists_train_as_data_path_with_captions_carried_or_left_to_write(long_videos, tmp_path, capsys):
    from cogft.cli import main
    from cogft.data.doctor import format_table

    out = tmp_path / "out"
    assert _split(long_videos, out, "--config", TINY) == 0
    printed = capsys.readouterr().out
    assert "6 clips from 2 of 3 videos" in printed and "2 clips have no caption yet" in printed
    assert "notes.mp4: not_a_video" in printed  # listed and skipped, the rest split
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert prompts[:4] == ["a test pattern, then a fractal zooming in"] * 4  # the sidecar, on one line
    assert prompts[4:] == ["", ""]

    assert main(["doctor", TINY, f"data.path={out}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clips"] == 6 and report["ok"] == 4 and report["problems"] == {"empty_caption": 2}
    assert report["buckets"] == {"9": 4}
    empty = next(r for r in report["files"] if r["listed_at"] == "videos.txt:5")
    assert "line 5 of prompts.txt" in empty["problems"][0]["detail"]
    assert "captions to write (empty, so prepare skips the clip): prompts.txt lines 5-6" in format_table(report)


def test_a_rerun_keeps_clips_and_written_captions_and_refuses_other_settings(long_videos, tmp_path, capsys):
    out = tmp_path / "out"
    assert _split(long_videos, out, "--config", TINY) == 0
    first = out / "clips" / "joined-scene001-01.mp4"
    written = first.stat().st_mtime_ns
    (out / "clips" / "uncaptioned-scene001-02.mp4").unlink()  # as if stopped before it was written
    videos, prompts = ((out / name).read_text().splitlines() for name in ("videos.txt", "prompts.txt"))
    prompts[4] = "a spinning gradient"
    del videos[1], prompts[1]  # a clip the user does not want
    for name, lines in (("videos.txt", videos), ("prompts.txt", prompts)):
        (out / name).write_text("\n".join(lines) + "\n")

    for _ in range(2):
        assert _split(long_videos, out, "--config", TINY) == 0
        assert first.stat().st_mtime_ns == written and (out / "clips" / "uncaptioned-scene001-02.mp4").is_file()
        assert (out / "videos.txt").read_text().splitlines() == videos
        assert (out / "prompts.txt").read_text().splitlines()[3:] == ["a spinning gradient", ""]
        assert "1 clips taken out of videos.txt by hand stay out" in capsys.readouterr().out

    assert _split(long_videos, out, "--frames", "17") == 2
    assert "frames: 9 there, 17 now" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert _split(long_videos, other, "--config", TINY) == 2
    assert "did not write" in capsys.readouterr().err and not (other / "videos.txt").exists()


def test_scenes_shorter_than_one_clip_are_skipped_with_why_or_kept_whole(long_videos, tmp_path, capsys):
    from cogft.data.ffmpeg_decode import frame_index
    from cogft.data.split import SplitSettings, plan_pieces

    index = frame_index(long_videos / "joined.mp4")
    scenes = [(0, SEAM), (SEAM, 2 * SEAM)]
    pieces, skipped = plan_pieces(index, scenes, SplitSettings(25, 8.0, 25, None))  # 3.125 s > a 3 s scene
    assert pieces == [] and [n for n, _ in skipped] == [1, 2]
    assert skipped[0][1] == ("scene 1 (0.00-3.00 s) is shorter than one clip (25 frames at 8 fps); --keep-short "
                             "keeps such scenes when they fill the shortest frame bucket")
    pieces, skipped = plan_pieces(index, scenes, SplitSettings(25, 8.0, 25, 17))  # 3 s fills the 17-frame bucket
    assert [(p.first, p.count) for p in pieces] == [(0, SEAM), (SEAM, SEAM)] and skipped == []
    pieces, _ = plan_pieces(index, scenes, SplitSettings(9, 8.0, 5, None))  # overlapping: a start every 5 frames
    assert [p.first for p in pieces if p.scene == 1] == [0, 15, 30, 45]

    assert _split(long_videos, tmp_path / "out", "--frames", "25", "--fps", "8") == 0
    assert "0 clips from 2 of 3 videos" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    reasons = [s["reason"] for e in record["sources"].values() for s in e["skipped"]]
    assert len(reasons) == 3 and all("shorter than one clip" in r for r in reasons)


def test_without_pyscenedetect_the_error_names_the_install(long_videos, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "scenedetect", None)  # import fails as if not installed
    assert _split(long_videos, tmp_path / "out") == 2
    assert "pip install 'cogft[split]'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_interrupted_write_leaves_no_clip_and_a_video_opencv_cannot_read_is_skipped(long_videos, tmp_path,
                                                                                       monkeypatch):
    from cogft.data import split as split_module
    from cogft.data.split import SplitSettings, split

    run = subprocess.run

    def interrupted(command, **kwargs):  # ffmpeg had written part of the first clip when Ctrl-C came
        if not command[-1].endswith(".part"):
            return run(command, **kwargs)
        Path(command[-1].removeprefix("file:")).write_bytes(b"half a clip")
        raise KeyboardInterrupt

    settings = SplitSettings(9, 8.0, 9, None)
    with monkeypatch.context() as patch:
        patch.setattr(split_module.subprocess, "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            split(long_videos, tmp_path / "out", settings)
    assert not list((tmp_path / "out" / "clips").rglob("*.*"))

    detect = split_module.detect_scenes

    def opencv_fails_on_joined(path, settings):
        if path.name == "joined.mp4":
            raise RuntimeError("VideoOpenFailure: codec not supported\nmore")
        return detect(path, settings)

    monkeypatch.setattr(split_module, "detect_scenes", opencv_fails_on_joined)
    summary = split(long_videos, tmp_path / "out", settings)
    assert summary["clips"] == 2  # the other video's, after the interrupted run: resumed into the same folder
    assert ("joined.mp4", "scene detection failed: PySceneDetect (OpenCV) cannot read it (VideoOpenFailure: codec "
                          "not supported); re-encode it to H.264 mp4") in summary["skipped_videos"]


def test_sources_that_would_share_clip_names_get_distinct_ones(tmp_path):
    from cogft.data.split import clip_stems

    videos = [tmp_path / "a.mp4", tmp_path / "a.mov", tmp_path / "sub" / "a.mp4", tmp_path / "b.mp4"]
    stems = clip_stems(tmp_path, videos)
    assert stems[videos[2]] == "sub/a" and stems[videos[3]] == "b"
    assert stems[videos[0]].startswith("a-") and stems[videos[1]].startswith("a-") and len(set(stems.values())) == 4


def test_a_variable_rate_video_gives_clips_prepare_takes_whole(tmp_path):
    """30 fps for 1 s, then 6 fps (slower than data.fps: prepare keeps every frame there, so a clip needs 9 of
    them), with timestamps rounded by the container: every clip still gives prepare its 9 frames."""
    from cogft.data.ffmpeg_decode import frame_index
    from cogft.data.probe import ffmpeg_exe
    from cogft.data.split import SplitSettings, fills, split

    (tmp_path / "src").mkdir()
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=30", "-t", "5",
                    "-vf", "setpts='if(lt(N,30),N/30,1+(N-30)/6)/TB'", "-fps_mode", "vfr", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(tmp_path / "src" / "vfr.mp4")], check=True)
    summary = split(tmp_path / "src" / "vfr.mp4", tmp_path / "out", SplitSettings(9, 8.0, 9, None))  # one file
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    clips = next(iter(record["sources"].values()))["clips"]
    assert summary["clips"] == len(clips) == 3 and [c["frames"] for c in clips][1:] == [9, 9]
    for clip in clips:
        written = frame_index(tmp_path / "out" / clip["clip"])
        assert fills(written.starts, written.end, 9, 8.0)
