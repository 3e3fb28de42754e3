"""Clips decord cannot read go through ffmpeg; clips damaged in the middle are caught, not trained on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from cogft.data import ffmpeg_decode
from cogft.data.video import DecodeSpec, _decord_index, decode_clip, probe_clip, resized_size, select_frames

SOURCE = "testsrc2=size=160x120:rate=24"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """The same test pattern as AV1 (which decord 0.6.0 cannot open) and as lossless H.264, and a damaged H.264."""
    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("decoding")

    def encode(name: str, seconds: float, *codec: str) -> None:
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                        "-i", SOURCE, "-t", str(seconds), "-pix_fmt", "yuv420p", *codec, str(folder / name)], check=True)

    x264 = ("-c:v", "libx264", "-preset", "ultrafast")
    encode("av1.mp4", 1.5, "-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "10")
    encode("lossless.mp4", 1.5, *x264, "-qp", "0")
    encode("intact.mp4", 2, *x264, "-g", "12", "-movflags", "+faststart")  # index first: a cut file keeps it
    damaged = bytearray((folder / "intact.mp4").read_bytes())
    start = int(len(damaged) * 0.3)  # inside the second group of pictures (frames 12-23)
    damaged[start : start + 200] = bytes(b ^ 0x5A for b in damaged[start : start + 200])
    (folder / "damaged.mp4").write_bytes(bytes(damaged))
    return folder


def decord_frames(path: Path, indices: list[int], height: int, width: int) -> np.ndarray:
    import decord

    return decord.VideoReader(str(path), num_threads=1, width=width, height=height).get_batch(indices).asnumpy()


def test_av1_is_decoded_by_ffmpeg_with_a_note(clips):
    spec = DecodeSpec((9,), 64, 96, 8.0)
    av1, lossless = decode_clip(str(clips / "av1.mp4"), spec), decode_clip(str(clips / "lossless.mp4"), spec)
    assert av1.problem is None, av1.problem
    assert av1.frames.shape == (9, 64, 96, 3) and av1.probe.source()["codec"] == "av1"
    assert "decoded by ffmpeg: decord cannot read av1" in av1.notes
    assert av1.probe.selection.windows == lossless.probe.selection.windows
    # the same pattern through decord (lossless H.264): only AV1's compression differs (measured: mean 0.21, max 13)
    assert np.abs(av1.frames.astype(int) - lossless.frames.astype(int)).mean() < 1


def test_doctor_probe_plans_av1_without_decoding(clips):
    probe = probe_clip(str(clips / "av1.mp4"), DecodeSpec((9,), 64, 96, 8.0))
    assert probe.problem is None and probe.frames == 36
    assert "decoded by ffmpeg: decord cannot read av1" in probe.selection.notes


@pytest.mark.parametrize("spec", [DecodeSpec((9, 5), 64, 96, 8.0), DecodeSpec((17,), 96, 128, None),
                                  DecodeSpec((9,), 120, 160, 6.0, windows=3)])
def test_ffmpeg_picks_and_scales_the_frames_decord_does(clips, spec):
    """On a clip both decoders read: the same frame index, the same selection, the same pixels."""
    path = clips / "lossless.mp4"
    starts, end = _decord_index(str(path))
    index = ffmpeg_decode.frame_index(path)
    assert np.abs(index.starts - starts).max() < 1e-3 and abs(index.end - end) < 1e-3
    selection = select_frames(index.starts, index.end, spec)
    assert selection == select_frames(starts, end, spec)
    wanted = sorted(set().union(*selection.windows))
    height, width = resized_size(120, 160, spec)
    run = ffmpeg_decode.decode_frames(path, wanted, height, width)
    assert run.error is None
    assert np.array_equal(run.frames, decord_frames(path, wanted, height, width))  # measured: bit-exact


def test_damage_in_the_middle_is_skipped_and_located(clips):
    spec = DecodeSpec((9,), 64, 96, 8.0)
    intact = decord_frames(clips / "intact.mp4", list(range(48)), 120, 160).astype(int)
    damaged = decord_frames(clips / "damaged.mp4", list(range(48)), 120, 160).astype(int)  # decord does not complain
    broken = np.nonzero(np.abs(intact - damaged).mean(axis=(1, 2, 3)) > 0.5)[0]
    selected = decode_clip(str(clips / "intact.mp4"), spec).probe.selection.indices
    assert set(broken) & set(selected), (broken, selected)  # what prepare used to train on

    decoded = decode_clip(str(clips / "damaged.mp4"), spec)
    assert decoded.problem is not None and decoded.problem.code == "damaged_stream", decoded.problem
    assert decoded.frames is None
    assert f"at or after frame {broken[0]} ({broken[0] / 24:.2f} s)" in decoded.problem.detail
    assert "ffmpeg reports" in decoded.problem.detail


def test_intact_clip_passes_the_damage_check(clips):
    decoded = decode_clip(str(clips / "intact.mp4"), DecodeSpec((9,), 64, 96, 8.0))
    assert decoded.problem is None and decoded.frames.shape == (9, 64, 96, 3)
    assert not any("ffmpeg" in note for note in decoded.notes)


def test_truncated_file_names_ffmpeg_error(tmp_path, clips):
    data = (clips / "intact.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    decoded = decode_clip(str(tmp_path / "cut.mp4"), DecodeSpec((9,), 64, 96, 8.0))
    assert decoded.problem.code == "decode_failed"
    assert 'ffmpeg reports "' in decoded.problem.detail and "damaged or truncated" in decoded.problem.detail
