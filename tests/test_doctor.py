"""`cogft doctor` on the hostile set: the same verdicts as prepare, from metadata only."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_doctor_json_with_a_config(hostile_clips, capsys):
    from cogft.cli import main
    from cogft.data.doctor import format_table

    code = main(["doctor", str(REPO / "configs" / "tiny-lora.yaml"), f"data.path={hostile_clips}", "data.min_frames=5",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clips"] == 18 and report["ok"] == 9 and report["would_skip"] == 9  # crash.mp4 is fine on paper
    assert report["problems"] == {code: 1 for code in (
        "empty_caption", "caption_not_utf8", "missing_caption", "duplicate", "no_video_stream", "too_short",
        "not_a_video", "decode_failed", "empty_file")}
    assert report["buckets"] == {"9": 8, "5": 1}
    rows = {row["listed_at"]: row for row in report["files"]}
    assert rows["truncated.mp4"]["problems"][0]["code"] == "decode_failed"
    assert any("rotated 90 degrees" in n for n in rows["rotated_phone.mp4"]["notes"])
    assert rows["good.mp4"]["caption_tokens"] > report["caption_token_limit"] == 16
    histograms = report["histograms"]
    assert histograms["size"]["3840x2160"] == 1 and histograms["size"]["64x96"] == 1
    assert histograms["size"]["719x481"] == 1
    assert histograms["frames"]["1-9"] == 2  # single_frame.mp4 and short.mp4
    assert sum(histograms["caption_tokens"].values()) == 15
    group = next(g for g in report["duplicates"] if "good.mp4" in g)
    assert set(group) == {"good.mp4", "same_bytes_as_good.mp4", "no_caption.mp4", "empty_caption.mp4",
                          "latin1_caption.mp4"}
    table = format_table(report)
    assert "zero_bytes.mp4" in table and "would skip, by reason" in table and "same bytes: " in table


def test_doctor_on_a_bare_folder_uses_default_settings(hostile_clips):
    from cogft.data.doctor import diagnose

    report = diagnose(hostile_clips)
    assert report["settings"]["buckets"] == [49, 41, 33, 25, 17]
    assert report["token_counts_skipped"].startswith("no config given")
    assert "caption_tokens" not in report["files"][0]
    assert report["problems"]["too_short"] == 13  # 1.5 s clips hold 12 frames at 8 fps, fewer than 17; vfr.mp4 fits
