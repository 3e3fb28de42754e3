"""Container metadata from `ffmpeg -i` (the binary imageio-ffmpeg ships), without decoding frames.

decord exposes neither the codec, nor the display rotation, nor the pixel aspect ratio, nor whether a
file is audio only, and its errors for unreadable files are opaque. `ffmpeg -i` prints all of it
on stderr in a few tens of milliseconds; this module parses that text.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .checks import Problem

_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: (Video|Audio): (.*)$")
_SIZE = re.compile(r",\s(\d+)x(\d+)")
_SAR = re.compile(r"SAR (\d+):(\d+)")
_FPS = re.compile(r"([\d.]+)k? fps")
_DURATION = re.compile(r"Duration: (\d+):(\d+):([\d.]+)")
_DISPLAYMATRIX = re.compile(r"rotation of (-?[\d.]+) degrees", re.IGNORECASE)  # counter-clockwise
_ROTATE_TAG = re.compile(r"^\s*rotate\s*:\s*(-?\d+)\s*$")  # older ffmpeg: clockwise


@dataclass(frozen=True)
class MediaInfo:
    codec: str
    width: int             # as displayed: stored size, pixel aspect and rotation applied
    height: int
    stored_width: int
    stored_height: int
    rotation: int          # display rotation, degrees counter-clockwise, one of 0, 90, 180, 270
    fps: float | None      # the container's average rate
    duration: float | None
    has_audio: bool


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _error_line(stderr: str) -> str:
    """The most telling line of a failed `ffmpeg -i`: the first that names an error, without its prefix."""
    lines = [re.sub(r"^\[[^\]]*\]\s*", "", line).strip() for line in stderr.splitlines()]
    for line in lines:
        if any(word in line for word in ("not found", "Invalid", "invalid", "Error", "error")):
            return line
    return next((line for line in reversed(lines) if line), "no output from ffmpeg")


def parse_ffmpeg_info(stderr: str) -> MediaInfo | Problem:
    """Parse `ffmpeg -i FILE` stderr into the first real video stream's metadata, or the problem."""
    if "Input #0" not in stderr:
        return Problem("not_a_video", f"ffmpeg cannot read it: {_error_line(stderr)}")
    video, rotation, has_audio = None, 0, False
    for line in stderr.splitlines():
        stream = _STREAM.match(line)
        if stream:
            kind, rest = stream.groups()
            if kind == "Audio":
                has_audio = True
            elif video is None and "(attached pic)" not in rest:  # cover art of audio files is not a clip
                video = rest
            continue
        if video is not None:
            if match := _DISPLAYMATRIX.search(line):
                rotation = round(float(match.group(1)))
            elif match := _ROTATE_TAG.match(line):
                rotation = -int(match.group(1))
    if video is None:
        what = "audio only, no video stream" if has_audio else "no video stream"
        return Problem("no_video_stream", f"{what}; it cannot be a training clip")
    size = _SIZE.search(video)
    if not size:
        return Problem("not_a_video", f"ffmpeg reports no frame size for the video stream: {video[:120]}")
    stored_w, stored_h = int(size.group(1)), int(size.group(2))
    sar = _SAR.search(video)
    width, height = stored_w, stored_h
    if sar and int(sar.group(1)) > 0 and int(sar.group(2)) > 0 and sar.group(1) != sar.group(2):
        width = round(stored_w * int(sar.group(1)) / int(sar.group(2)))
    rotation = round(rotation / 90) * 90 % 360  # decoders apply quarter turns only
    if rotation in (90, 270):
        width, height = height, width
    fps = _FPS.search(video)
    duration = _DURATION.search(stderr)
    return MediaInfo(
        codec=video.split(",")[0].split()[0],
        width=width,
        height=height,
        stored_width=stored_w,
        stored_height=stored_h,
        rotation=rotation,
        fps=float(fps.group(1)) if fps else None,
        duration=(int(duration.group(1)) * 3600 + int(duration.group(2)) * 60 + float(duration.group(3))
                  if duration else None),
        has_audio=has_audio,
    )


def probe_media(path: str | Path) -> MediaInfo | Problem:
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", f"file:{Path(path).resolve()}"],
        capture_output=True, timeout=60,
    )
    return parse_ffmpeg_info(result.stderr.decode("utf-8", errors="replace"))
