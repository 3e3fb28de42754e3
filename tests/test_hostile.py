"""The hostile set through prepare: every file gets a report row that says what was wrong and what was done."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cogft.data.video import DecodeSpec, decode_clip, select_frames

REPO = Path(__file__).resolve().parent.parent

# file -> (status, problem code or None, frames, a phrase the notes or the reason must contain)
EXPECTED = {
    "good.mp4": ("encoded", None, 9, "caption truncated"),
    "short.mp4": ("encoded", None, 5, "put in the 5-frame bucket (6 frames at 8 fps)"),
    "vfr.mp4": ("encoded", None, 9, "variable frame rate"),
    "rotated_phone.mp4": ("encoded", None, 9, "rotated 90 degrees"),
    "odd_size.mov": ("encoded", None, 9, "scaled 719x481 -> 96x65, centre-cropped to 96x64"),
    "large_4k.mp4": ("encoded", None, 9, "scaled 3840x2160 -> 114x64"),
    "vp9.webm": ("encoded", None, 9, "resampled 24 -> 8 fps"),
    "mpeg4.avi": ("encoded", None, 9, "scaled 176x144"),
    "zero_bytes.mp4": ("skipped", "empty_file", None, "0 bytes"),
    "truncated.mp4": ("skipped", "decode_failed", None, "damaged or truncated"),
    "text_file.mp4": ("skipped", "not_a_video", None, "ffmpeg cannot read it"),
    "audio_only.mp4": ("skipped", "no_video_stream", None, "audio only"),
    "single_frame.mp4": ("skipped", "too_short", None, "1 frame(s)"),
    "crash.mp4": ("skipped", "decoder_crashed", None, "worker process died"),
    "no_caption.mp4": ("skipped", "missing_caption", None, "no caption"),
    "empty_caption.mp4": ("skipped", "empty_caption", None, "caption is empty"),
    "latin1_caption.mp4": ("skipped", "caption_not_utf8", None, "byte 0xe9"),
    "same_bytes_as_good.mp4": ("skipped", "duplicate", None, "same video bytes and caption as good.mp4"),
}


def decode_or_die(item: tuple, spec: DecodeSpec):
    """Stands in for the prepare workers' job (a clip and its paired files) and really kills the process on
    crash.mp4, like a segfault."""
    from cogft.data.masks import decode_with_mask

    if Path(item[0]).name == "crash.mp4":
        os._exit(139)
    return decode_with_mask(item, spec)


@pytest.fixture(scope="module")
def hostile_run(hostile_clips, tmp_path_factory):
    from cogft.config_file import load_config
    from cogft.data.cache import prepare
    from cogft.models.loading import load_variant

    cache = tmp_path_factory.mktemp("hostile_cache")
    config = load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={hostile_clips}", f"data.cache_dir={cache}", "data.min_frames=5",
        f"output_dir={tmp_path_factory.mktemp('hostile_run')}", "tracking.report_to=none",
    ])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cogft.data.cache.decode_with_mask", decode_or_die)  # what the prepare workers run
        prepared = prepare(config, load_variant(config.model.path), torch.device("cpu"), show_progress=False)
    return prepared, cache


def test_every_hostile_file_has_a_row(hostile_run, hostile_clips):
    prepared, _ = hostile_run
    rows = {Path(r["clip"]).name: r for r in prepared.report[:-1]}
    assert set(rows) == set(EXPECTED) == {p.name for p in hostile_clips.iterdir() if p.suffix != ".txt"}
    for name, (status, problem, frames, phrase) in EXPECTED.items():
        row = rows[name]
        assert (row["status"], row.get("problem"), row.get("frames")) == (status, problem, frames), row
        assert row["listed_at"] == name
        said = row["reason"] if status == "skipped" else " | ".join(row["notes"])
        assert phrase in said, (name, said)
    assert rows["vp9.webm"]["source"]["codec"] == "vp9" and rows["mpeg4.avi"]["source"]["codec"] == "mpeg4"
    assert rows["good.mp4"]["caption_tokens"] > 16


def test_summary_counts_reasons_and_buckets(hostile_run):
    prepared, _ = hostile_run
    summary = prepared.summary
    assert summary["kept"] == 8 and summary["encoded"] == 8 and summary["skipped"] == 10
    assert summary["skipped_by_reason"] == {
        code: 1 for code in (e[1] for e in EXPECTED.values()) if code is not None
    }
    assert summary["buckets"] == {"9": 7, "5": 1}
    assert sorted(e.frames for e in prepared.entries) == [5] + [9] * 7


def test_cache_holds_only_whole_entries(hostile_run):
    from safetensors.torch import load_file

    prepared, cache = hostile_run
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    latents = sorted(p for p in files if p.parent.parent.name == "latents")
    assert latents == sorted(Path(e.latents[0]) for e in prepared.entries)
    short = next(e for e in prepared.entries if e.frames == 5)
    assert load_file(short.latents[0])["latent_mean"].shape == (4, 2, 8, 12)  # (5 - 1) / 4 + 1 latent frames
    assert all(load_file(p) for p in files)


def autorotated_first_frame(path: Path, height: int, width: int) -> np.ndarray:
    """ffmpeg's own reading of the clip: it applies the display rotation (autorotate is its default)."""
    import imageio_ffmpeg

    raw = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-"], capture_output=True, check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3).astype(int)


def test_rotated_phone_clip_comes_out_upright(hostile_clips):
    clip = hostile_clips / "rotated_phone.mp4"  # stored 96x64, displayed 64x96
    decoded = decode_clip(str(clip), DecodeSpec((1,), 96, 64, None))
    expected = autorotated_first_frame(clip, 96, 64)
    assert decoded.frames.shape == (1, 96, 64, 3)
    assert np.abs(decoded.frames[0] - expected).mean() < 3
    assert np.abs(np.rot90(decoded.frames[0], 2) - expected).mean() > 30


def test_fit_letterboxes_instead_of_cropping(hostile_clips):
    decoded = decode_clip(str(hostile_clips / "rotated_phone.mp4"), DecodeSpec((9,), 64, 96, 8.0, "fit"))
    frames = decoded.frames
    assert frames.shape == (9, 64, 96, 3)
    assert frames[:, :, :26].max() == 0 and frames[:, :, -27:].max() == 0 and frames[:, :, 30:60].max() > 0
    assert "scaled 64x96 -> 43x64, letterboxed (black bars) to 96x64" in decoded.notes


def test_variable_frame_rate_is_sampled_by_time():
    starts = np.concatenate([np.arange(30) / 30, 1 + np.arange(12) / 6])  # 30 fps for 1 s, then 6 fps
    selection = select_frames(starts, 3.0, DecodeSpec((17, 9), 64, 96, 8.0))
    assert len(selection.indices) == 17
    for k, index in enumerate(selection.indices):
        tick = k / 8
        assert starts[index] <= tick + 1e-9 and (index + 1 == len(starts) or starts[index + 1] > tick)
    assert any("variable frame rate" in n for n in selection.notes)
