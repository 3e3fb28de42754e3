"""Clips decord cannot read go through ffmpeg; clips damaged in the middle are caught, not trained on."""

from __future__ import annotations

import logging
import subprocess
import sys
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
                        "-i", SOURCE, "-t", str(seconds), "-pix_fmt", "yuv420p", *codec, str(folder / name)],
                       check=True)

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


# Without decord (macOS arm64, Linux aarch64, a broken install): ffmpeg reads every clip, with the same result.

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SPECS = [DecodeSpec((9,), 64, 96, 8.0), DecodeSpec((17, 9), 96, 128, None, resize="fit"),
                DecodeSpec((9,), 480, 720, 8.0, windows=3)]
HOSTILE_SPEC = DecodeSpec((9, 5), 64, 96, 8.0)  # the tiny config with data.min_frames=5, as in test_hostile.py


@pytest.fixture
def pick_decoder(monkeypatch):
    """Re-make the process's decoder choice; `pick_decoder(False)` hides decord as a platform without its wheels
    does."""
    from cogft.data import video

    def pick(with_decord: bool) -> None:
        if with_decord:
            if "decord" in sys.modules and sys.modules["decord"] is None:
                monkeypatch.delitem(sys.modules, "decord")  # the real module imports again
        else:
            monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
        video.decoder.cache_clear()

    monkeypatch.delenv("COGFT_DECODER", raising=False)
    yield pick
    video.decoder.cache_clear()  # before monkeypatch restores decord: the next test chooses again


def decode_both(pick_decoder, path: Path, spec: DecodeSpec):
    """`decode_clip` with decord importable, then without it."""
    pick_decoder(True)
    with_decord = decode_clip(str(path), spec)
    pick_decoder(False)
    return with_decord, decode_clip(str(path), spec)


def assert_same_result(with_decord, without) -> None:
    """The same problem (code and reason) or the same frames, selection and notes; only the decoder differs."""
    assert without.probe.decord_error is None and without.probe.source()["decoder"] == "ffmpeg"  # decord not tried
    assert (without.problem is None) == (with_decord.problem is None), (with_decord.problem, without.problem)
    if with_decord.problem is not None:
        assert without.problem == with_decord.problem  # code and detail, word for word
        return
    assert without.probe.source() == {**with_decord.probe.source(), "decoder": "ffmpeg"}
    assert without.probe.selection == with_decord.probe.selection and without.notes == with_decord.notes
    assert not any("decoded by ffmpeg" in note for note in without.notes)  # said once in the log instead
    assert len(without.windows) == len(with_decord.windows)
    for ours, theirs in zip(without.windows, with_decord.windows):
        assert np.array_equal(ours, theirs)  # measured: bit-exact on every sample and hostile clip


@pytest.mark.parametrize("spec", SAMPLE_SPECS)
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "data" / "videos").glob("*.mp4")))
def test_without_decord_sample_clips_decode_to_decords_frames(pick_decoder, name, spec):
    with_decord, without = decode_both(pick_decoder, REPO / "data" / "videos" / name, spec)
    assert with_decord.problem is None and with_decord.probe.source()["decoder"] == "decord"
    assert_same_result(with_decord, without)


@pytest.mark.parametrize("name", ["good.mp4", "short.mp4", "single_frame.mp4", "vfr.mp4", "rotated_phone.mp4",
                                  "odd_size.mov", "large_4k.mp4", "vp9.webm", "mpeg4.avi", "truncated.mp4"])
def test_without_decord_hostile_clips_keep_their_problems(pick_decoder, hostile_clips, name):
    with_decord, without = decode_both(pick_decoder, hostile_clips / name, HOSTILE_SPEC)
    assert_same_result(with_decord, without)
    expected = {"single_frame.mp4": "too_short", "truncated.mp4": "decode_failed"}  # the rest decode
    assert (without.problem and without.problem.code) == expected.get(name)


def test_without_decord_damage_is_found_and_located_the_same(pick_decoder, clips):
    with_decord, without = decode_both(pick_decoder, clips / "damaged.mp4", DecodeSpec((9,), 64, 96, 8.0))
    assert with_decord.problem.code == "damaged_stream"
    assert_same_result(with_decord, without)


def test_without_decord_doctor_probes_with_ffmpegs_index(pick_decoder, hostile_clips):
    for name in ("good.mp4", "short.mp4", "vfr.mp4", "single_frame.mp4", "truncated.mp4"):
        pick_decoder(True)
        with_decord = probe_clip(str(hostile_clips / name), HOSTILE_SPEC)
        pick_decoder(False)
        without = probe_clip(str(hostile_clips / name), HOSTILE_SPEC)
        assert (without.problem, without.frames, without.selection) == \
               (with_decord.problem, with_decord.frames, with_decord.selection), name
        assert without.source()["decoder"] == "ffmpeg"


def test_without_decord_the_choice_is_logged_once(pick_decoder, caplog):
    pick_decoder(False)
    with caplog.at_level(logging.INFO, logger="cogft.data.video"):
        for name in ("test_pattern.mp4", "bouncing_square.mp4"):
            assert decode_clip(str(REPO / "data" / "videos" / name), SAMPLE_SPECS[0]).problem is None
    said = [r.getMessage() for r in caplog.records if r.name == "cogft.data.video"]
    assert len(said) == 1 and "decoding clips with the bundled ffmpeg: decord does not import" in said[0], said


def test_cogft_decoder_forces_ffmpeg_and_names_bad_values(pick_decoder, monkeypatch):
    from cogft.config import ConfigError
    from cogft.data import video

    pick_decoder(True)
    monkeypatch.setenv("COGFT_DECODER", "ffmpeg")
    decoded = decode_clip(str(REPO / "data" / "videos" / "test_pattern.mp4"), SAMPLE_SPECS[0])
    assert decoded.problem is None and decoded.probe.source()["decoder"] == "ffmpeg"
    assert decoded.probe.decord_error is None
    monkeypatch.setenv("COGFT_DECODER", "ffmpgg")
    video.decoder.cache_clear()
    with pytest.raises(ConfigError, match="COGFT_DECODER='ffmpgg' is not a decoder: use one of auto, decord, ffmpeg"):
        probe_clip(str(REPO / "data" / "videos" / "test_pattern.mp4"), SAMPLE_SPECS[0])
    monkeypatch.setenv("COGFT_DECODER", "decord")
    pick_decoder(False)
    with pytest.raises(ConfigError, match="COGFT_DECODER=decord, but decord does not import.*pip install decord"):
        probe_clip(str(REPO / "data" / "videos" / "test_pattern.mp4"), SAMPLE_SPECS[0])


def test_prepare_with_cogft_decoder_ffmpeg_in_its_workers(pick_decoder, hostile_clips, tmp_path, monkeypatch):
    """The variable reaches prepare's spawned workers: the hostile set gets the rows it gets with decord."""
    import torch

    from cogft.config_file import load_config
    from cogft.data.cache import prepare
    from cogft.models.loading import load_variant

    monkeypatch.setenv("COGFT_DECODER", "ffmpeg")
    config = load_config(REPO / "configs" / "tiny-lora.yaml", [
        f"data.path={hostile_clips}", f"data.cache_dir={tmp_path / 'cache'}", "data.min_frames=5",
        f"output_dir={tmp_path / 'run'}", "tracking.report_to=none",
    ])
    prepared = prepare(config, load_variant(config.model.path), torch.device("cpu"), show_progress=False)
    rows = {Path(r["clip"]).name: r for r in prepared.report[:-1]}
    skipped = {name: row["problem"] for name, row in rows.items() if row["status"] == "skipped"}
    assert skipped == {"zero_bytes.mp4": "empty_file", "truncated.mp4": "decode_failed", "text_file.mp4": "not_a_video",
                       "audio_only.mp4": "no_video_stream", "single_frame.mp4": "too_short",
                       "no_caption.mp4": "missing_caption", "empty_caption.mp4": "empty_caption",
                       "latin1_caption.mp4": "caption_not_utf8", "same_bytes_as_good.mp4": "duplicate"}
    kept = [row for row in rows.values() if row["status"] != "skipped"]
    assert len(kept) == 9 and {row["source"]["decoder"] for row in kept} == {"ffmpeg"}
    assert rows["short.mp4"]["frames"] == 5 and not any("decoded by ffmpeg" in n for r in kept for n in r["notes"])


def test_the_prepare_workers_job_imports_no_torch():
    """Each decode worker imports the module of its job: torch there would add seconds and hundreds of MB a worker."""
    import subprocess
    import sys

    script = ("import sys, cogft.data.masks, cogft.data.control; "
              "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
