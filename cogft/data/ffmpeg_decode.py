"""The bundled ffmpeg binary as a second decoder: a frame index and frames where decord fails or is not
installed (`video.decoder`), and the damage check of the range prepare trains on.

decord 0.6.0 ships an old libavcodec without AV1 (and fails on GIF, Theora, animated WebP...), so clips
that `ffmpeg -i` reads would be skipped as broken. And a stream damaged in the middle often decodes in
decord without an error: the decoder conceals the damage with grey or smeared blocks that look like
frames. ffmpeg logs every such error, so prepare decodes the selected range once more with it.

Locating damage: `-debug_ts` makes ffmpeg's decoder thread log one `decoder ->` line per frame it
outputs, in the same thread and order as the decoder's own error lines; frames logged before the first
error line were decoded before the damaged packet reached the decoder, so their count is a true lower
bound on where the damage starts (the parser, which runs ahead, can only make it earlier).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import Problem
from .probe import ffmpeg_exe

_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")
_TIMEBASE = re.compile(r"^#tb 0: (\d+)/(\d+)")
_ERROR_LEVELS = ("[error]", "[fatal]", "[panic]")
# `decoder ->` lines per frame; one decoder thread, as frame threads output late and widen the damage's location
_LOG_ARGS = ["-loglevel", "level+info", "-debug_ts", "-threads", "1"]


@dataclass(frozen=True)
class FrameIndex:
    starts: np.ndarray  # presentation times in seconds, sorted: the same order decord indexes frames in
    end: float          # end of the last frame


@dataclass(frozen=True)
class FfmpegRun:
    frames: np.ndarray | None  # uint8 [F, H, W, 3] when frames were asked for, else None
    clean: int                 # frames the decoder output before its first error (all of them if none)
    error: str | None          # ffmpeg's first error line, prefixes stripped; None: decoded cleanly


def _command(path: str | Path, before: list[str], after: list[str]) -> list[str]:
    """ffmpeg with `before` as input options and `after` as output options, on the first video stream only."""
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", *before, "-i", f"file:{Path(path).resolve()}",
            "-map", "0:v:0", "-an", "-sn", "-dn", *after]


def _clean_line(line: str) -> str:
    """An ffmpeg log line without its `[codec @ 0x…]` and `[level]` prefixes."""
    return _PREFIX.sub("", line).strip()


def first_error(stderr: str) -> str | None:
    """The first line ffmpeg logged at error level (needs `-loglevel level+…`), without prefixes."""
    line = next((line for line in stderr.splitlines() if any(tag in line for tag in _ERROR_LEVELS)), None)
    return None if line is None else _clean_line(line) or "an unnamed error"


def frame_index(path: str | Path) -> FrameIndex | Problem:
    """Frame start times from the demuxer's packets (no decoding: cheap enough for `cogft doctor`).

    A demuxer error here (a truncated file, a corrupt packet) means the container itself is damaged.
    """
    result = subprocess.run(
        _command(path, ["-loglevel", "level+error"], ["-c", "copy", "-f", "framecrc", "-"]),
        capture_output=True, timeout=300,
    )
    error = first_error(result.stderr.decode("utf-8", errors="replace"))
    if error is not None:
        return Problem("decode_failed", f'the file is damaged or truncated: ffmpeg reports "{error[:200]}"; '
                                        "re-download or re-export it")
    lines = result.stdout.decode("utf-8", errors="replace").splitlines()
    base = next((m.groups() for m in map(_TIMEBASE.match, lines) if m), None)
    rows = [line.split(",") for line in lines if line and not line.startswith("#")]
    if base is None or not rows:
        return Problem("decode_failed", "ffmpeg finds no video packets in the file; it holds no frames to train on")
    tick = int(base[0]) / int(base[1])
    stamps = [(int(r[2]) if r[2].strip() != "NOPTS" else int(r[1]), int(r[3])) for r in rows]
    starts = np.sort(np.array([s for s, _ in stamps], dtype=np.float64)) * tick
    end = max(s + d for s, d in stamps) * tick
    return FrameIndex(starts, max(end, float(starts[-1])))


def _run(command: list[str], frames_shape: tuple[int, int] | None) -> FfmpegRun:
    """Run a decode with `-debug_ts`; count the frames decoded before the first error, read rgb24 frames."""
    result = subprocess.run(command, capture_output=True, timeout=600)
    stderr = result.stderr.decode("utf-8", errors="replace")
    error = first_error(stderr)
    if error is None and result.returncode != 0:
        error = f"ffmpeg exited with code {result.returncode}"
    decoded = 0
    for line in stderr.splitlines():
        if any(tag in line for tag in _ERROR_LEVELS):
            break
        decoded += "decoder -> " in line
    frames = None
    if frames_shape is not None:
        height, width = frames_shape
        count = len(result.stdout) // (height * width * 3)
        frames = np.frombuffer(result.stdout[: count * height * width * 3], np.uint8).reshape(count, height, width, 3)
    return FfmpegRun(frames, decoded, error)


def check_range(path: str | Path, last: int) -> FfmpegRun:
    """Decode frames 0..`last` (presentation order) to nowhere, to learn whether the decoder reports damage.

    A quick pass on all cores first; only a clip it finds an error in is decoded again on one thread with
    per-frame timing, to locate the damage. Damage is rare, and the locating pass alone took 2.4x decord's
    decode of a sample clip (0.76 against 0.31 s per clip on the CI machine)."""
    output = ["-fps_mode", "passthrough", "-frames:v", str(last + 1), "-f", "null", "-"]
    quick = subprocess.run(_command(path, ["-loglevel", "level+error"], output), capture_output=True, timeout=600)
    if quick.returncode == 0 and first_error(quick.stderr.decode("utf-8", errors="replace")) is None:
        return FfmpegRun(None, last + 1, None)
    return _run(_command(path, _LOG_ARGS, output), None)


def decode_frames(path: str | Path, indices: list[int], height: int, width: int) -> FfmpegRun:
    """The frames at `indices` (sorted, presentation order, as decord counts them), scaled to `height` x `width`.

    Selected by frame number with the `select` filter, so the frames are the ones decord's index names;
    scaled with swscale's bilinear filter, the default of the libavfilter decord bundles: on clips both
    read, the pixels equal decord's bit for bit (tests/test_decoding.py). ffmpeg autorotates, as decord does.
    """
    wanted = "+".join(f"eq(n\\,{i})" for i in indices)
    graph = f"select='{wanted}',scale={width}:{height}:flags=bilinear,format=rgb24"
    output = ["-vf", graph, "-fps_mode", "passthrough", "-frames:v", str(len(indices)), "-f", "rawvideo",
              "-pix_fmt", "rgb24", "-"]
    return _run(_command(path, _LOG_ARGS, output), (height, width))
