"""One clip → the frames the model trains on: probe, frame selection, resize (crop or fit), decode.

`probe_clip` reads metadata only (ffmpeg's stream info, decord's or ffmpeg's frame index); `cogft doctor` stops
there. `decode_clip` continues to the pixels, and has ffmpeg decode the selected range once more to
catch damage that decord conceals. Where decord cannot open or decode a clip (AV1, GIF, Theora...), the
bundled ffmpeg binary indexes and decodes it instead (`ffmpeg_decode.py`), with a note in the report.
Where decord is not installed or does not import (it has wheels for Linux x86_64, macOS x86_64 and
Windows only), or `COGFT_DECODER=ffmpeg` asks for it, ffmpeg reads every clip: the same frames and the
same problems, one log line per process instead of a note per clip, and `"decoder"` in each clip's
`source`. Both run inside worker processes (see `workers.py`), so a decoder that crashes in native code
takes down one worker, not the whole prepare. Imports nothing heavier than numpy (decord when used), and
never raises for a bad file: problems are returned.

Frames are picked by timestamp, so variable-frame-rate clips sample real time evenly. Display
rotation (phone clips) and non-square pixels: decord 0.6.0 applies the rotation itself and resizes
in the displayed orientation (checked against ffmpeg's own autorotated output in the tests); the
target size is computed from the displayed size that `ffmpeg -i` reports.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import ffmpeg_decode
from .checks import Problem
from .probe import MediaInfo, probe_media

logger = logging.getLogger(__name__)

DECODER_VARIABLE = "COGFT_DECODER"  # auto (default): decord where it imports, else ffmpeg; or decord, ffmpeg
_DECODERS = ("auto", "decord", "ffmpeg")


@dataclass(frozen=True)
class DecodeSpec:
    buckets: tuple[int, ...]  # frame counts a clip may be cut to, largest (data.num_frames) first
    height: int
    width: int
    fps: float | None         # None: consecutive frames at the clip's own rate
    resize: str = "crop"      # "crop": cover the target and centre-crop; "fit": fit inside and pad (letterbox)
    windows: int = 1          # windows per clip, spread evenly over it; training draws one per epoch
    sizes: tuple[tuple[int, int], ...] = ()  # resolution buckets (height, width); () or one: height x width alone

    def pixel_key(self) -> dict:
        """What shapes an entry's pixels apart from its frame count (which is part of the key on its own)."""
        return {"height": self.height, "width": self.width, "fps": self.fps, "resize": self.resize}

    def bucket_for(self, height: int, width: int) -> tuple[int, int]:
        """The training size for a clip displayed at height x width: the bucket nearest its aspect ratio."""
        return nearest_size(height, width, self.sizes or ((self.height, self.width),))

    def at(self, size: tuple[int, int]) -> DecodeSpec:
        """This spec at one training size (a resolution bucket)."""
        return replace(self, height=size[0], width=size[1])


def nearest_size(height: int, width: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The size whose aspect ratio is nearest (in log ratio) to height x width's; the first listed of equals. Cropping
    to it then loses the least of the picture."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[1] / size[0]) - aspect))


@dataclass(frozen=True)
class Selection:
    windows: tuple[tuple[int, ...], ...]  # decord frame indices per window, each len == the bucket
    offsets: tuple[int, ...]              # each window's first frame, counted at the target rate
    available: int                        # frames the clip has at the target rate
    notes: tuple[str, ...]

    @property
    def indices(self) -> tuple[int, ...]:
        """The first window: the clip's start."""
        return self.windows[0]


@dataclass
class ClipProbe:
    problem: Problem | None = None
    info: MediaInfo | None = None
    frames: int | None = None          # frames in the file, once decord or ffmpeg could index it
    selection: Selection | None = None
    seconds: float = 0.0
    decord_error: str | None = None    # why decord could not read the clip (ffmpeg did instead)
    decoder: str | None = None         # which decoder indexed (and decodes) the clip: "decord", "ffmpeg" (or "pillow")
    size: tuple[int, int] | None = None  # the resolution bucket (height, width) it trains at

    def source(self) -> dict:
        """The clip as found, and the decoder that read it, for reports."""
        if self.info is None:
            return {}
        return {"codec": self.info.codec, "width": self.info.width, "height": self.info.height,
                "fps": self.info.fps, "frames": self.frames, "duration": self.info.duration,
                "rotation": self.info.rotation, "decoder": self.decoder}


@dataclass
class Decoded:
    probe: ClipProbe
    windows: tuple[np.ndarray, ...] = ()  # uint8 [F, H, W, 3] per window of the selection
    notes: tuple[str, ...] = field(default=())

    @property
    def problem(self) -> Problem | None:
        return self.probe.problem

    @property
    def frames(self) -> np.ndarray | None:
        """The first window's frames (the clip's start)."""
        return self.windows[0] if self.windows else None


def window_offsets(available: int, bucket: int, count: int) -> tuple[int, ...]:
    """Up to `count` distinct window starts spread evenly from the clip's start to its end."""
    spare = available - bucket
    if count == 1 or spare <= 0:
        return (0,)
    return tuple(sorted({round(spare * i / (count - 1)) for i in range(count)}))


def windows_note(bucket: int, offsets: tuple[int, ...]) -> list[str]:
    """The report's note on a clip's windows (none for a single one); made per run, never cached."""
    if len(offsets) == 1:
        return []
    return [f"{len(offsets)} windows of {bucket} frames starting at frames {list(offsets)} (at the target rate); "
            "training draws one per epoch"]


def select_frames(starts: np.ndarray, end: float, spec: DecodeSpec) -> Selection | Problem:
    """Frames to keep, by timestamp: the largest bucket the clip fills, at `spec.fps` (or consecutive).

    `starts` are the frames' presentation times in seconds, `end` the end of the last frame. The clip
    is never sampled faster than its own rate (no frame is invented); a clip that fills no bucket
    is a problem, not a padded clip.
    """
    n = len(starts)
    if n == 0:
        return Problem("decode_failed", "the video stream has no frames")
    gaps = np.diff(starts)
    native, step, available = _timing(starts, end, spec.fps)
    notes = []
    if spec.fps is not None:
        if step > native * 1.001:
            notes.append(f"resampled {1 / native:.3g} -> {spec.fps:g} fps")
        elif 1.0 / spec.fps < native * 0.999:
            notes.append(f"clip runs at {1 / native:.3g} fps, below data.fps={spec.fps:g}: kept every frame")
    if n > 2 and gaps.max() - gaps.min() > 0.25 * native:
        notes.append(f"variable frame rate ({1 / gaps.max():.3g}-{1 / max(gaps.min(), 1e-6):.3g} fps): "
                     "frames picked by timestamp")
    fitting = [b for b in spec.buckets if b <= available]
    if not fitting:
        need = spec.buckets[-1]
        return Problem("too_short", (
            f"too short: {available} frame(s) at {1 / step:.3g} fps ({end - starts[0]:.2f} s); the smallest bucket "
            f"needs {need} ({need * step:.2f} s); lower data.min_frames to keep it"
        ))
    bucket = fitting[0]
    if bucket < spec.buckets[0]:
        notes.append(f"shorter than data.num_frames={spec.buckets[0]}: put in the {bucket}-frame bucket "
                     f"({available} frames at {1 / step:.3g} fps)")
    offsets = window_offsets(available, bucket, spec.windows)
    windows = tuple(_window(starts, end, spec.fps, o, bucket) for o in offsets)
    return Selection(windows, offsets, available, tuple(notes))


def _timing(starts: np.ndarray, end: float, fps: float | None) -> tuple[float, float, int]:
    """(the clip's mean frame interval, the interval frames are taken at, frames available at that interval)."""
    n = len(starts)
    native = float(starts[-1] - starts[0]) / (n - 1) if n > 1 else float(end - starts[0])  # mean: webm rounds to ms
    native = max(native, 1e-6)
    if fps is None:
        return native, native, n
    step = max(1.0 / fps, native)
    return native, step, max(1, math.ceil((end - starts[0]) / step - 1e-6))


def _window(starts: np.ndarray, end: float, fps: float | None, offset: int, bucket: int) -> tuple[int, ...]:
    """The frame indices of `bucket` frames from `offset` (counted at the target rate), picked by timestamp."""
    if fps is None:
        return tuple(range(offset, offset + bucket))
    native, step, _ = _timing(starts, end, fps)
    ticks = starts[0] + step * (offset + np.arange(bucket)) + 0.01 * native
    return tuple(int(i) for i in np.searchsorted(starts, ticks, side="right") - 1)


def resized_size(height: int, width: int, spec: DecodeSpec) -> tuple[int, int]:
    """The size to decode at: covering the target (crop) or inside it (fit), keeping the aspect ratio."""
    scales = (spec.height / height, spec.width / width)
    scale = max(scales) if spec.resize == "crop" else min(scales)
    new_h, new_w = math.ceil(height * scale - 1e-6), math.ceil(width * scale - 1e-6)
    if spec.resize == "crop":
        return max(spec.height, new_h), max(spec.width, new_w)
    return min(spec.height, max(1, new_h)), min(spec.width, max(1, new_w))


MAX_CROP_LOSS = 64  # `crop` scales to cover the target: a picture needing more than this many times its area


def crop_problem(height: int, width: int, spec: DecodeSpec) -> Problem | None:
    """A picture so much wider or taller than its bucket that covering the bucket would scale it to a huge size
    (a 1x100000 image: gigabytes) and keep a sliver of it; refused before anything is decoded."""
    new_h, new_w = resized_size(height, width, spec)
    if spec.resize != "crop" or new_h * new_w <= MAX_CROP_LOSS * spec.height * spec.width:
        return None
    kept = new_h * new_w // (spec.height * spec.width)
    return Problem("extreme_aspect", f"{width}x{height} is too far from the {spec.width}x{spec.height} training "
                                     f"shape: data.resize=crop would keep 1/{kept} of it; crop it yourself, add a "
                                     "data.buckets size of its shape, or use data.resize=fit")


def place(frames: np.ndarray, spec: DecodeSpec) -> np.ndarray:
    """Centre-crop (crop) or centre-pad with black (fit) [F, h, w, 3] frames to the target size."""
    _, h, w, _ = frames.shape
    if spec.resize == "crop":
        top, left = (h - spec.height) // 2, (w - spec.width) // 2
        return np.ascontiguousarray(frames[:, top : top + spec.height, left : left + spec.width])
    out = np.zeros((frames.shape[0], spec.height, spec.width, 3), dtype=frames.dtype)
    top, left = (spec.height - h) // 2, (spec.width - w) // 2
    out[:, top : top + h, left : left + w] = frames
    return out


def geometry_notes(info: MediaInfo, spec: DecodeSpec) -> list[str]:
    """What resizing does to this clip: rotation, non-square pixels, scale, crop or letterbox."""
    new_h, new_w = resized_size(info.height, info.width, spec)
    notes = []
    if info.rotation:
        notes.append(f"rotated {info.rotation} degrees counter-clockwise (display rotation in the file)")
    stored = (info.stored_width, info.stored_height)
    if (info.width, info.height) not in (stored, stored[::-1]):
        notes.append(f"non-square pixels: stored {stored[0]}x{stored[1]}, displayed {info.width}x{info.height}")
    if (new_h, new_w) != (spec.height, spec.width):
        how = "centre-cropped" if spec.resize == "crop" else "letterboxed (black bars)"
        notes.append(f"scaled {info.width}x{info.height} -> {new_w}x{new_h}, {how} to {spec.width}x{spec.height}")
    elif (info.height, info.width) != (spec.height, spec.width):
        notes.append(f"scaled {info.width}x{info.height} -> {spec.width}x{spec.height}")
    return notes


def _first_line(error: Exception) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message[:200]}"


def _decord_import_error() -> str | None:
    """Why `import decord` fails here (not installed, no wheel for this platform, a broken build); None if it works."""
    try:
        import decord  # noqa: F401
    except Exception as error:  # ImportError, or OSError/RuntimeError from a broken native library
        return _first_line(error)
    return None


@lru_cache(maxsize=1)
def decoder() -> str:
    """The decoder this process reads clips with ("decord" or "ffmpeg"), chosen once; logged once where it is ffmpeg.

    decord is the default where it imports; the bundled ffmpeg picks and scales the same frames, so
    a platform without decord (macOS arm64, Linux aarch64) or a broken decord install still trains,
    and `COGFT_DECODER=ffmpeg` forces it. Workers inherit the variable, so prepare and doctor agree.
    """
    asked = os.environ.get(DECODER_VARIABLE, "auto").strip().lower() or "auto"
    if asked not in _DECODERS:
        from ..config import ConfigError  # only on this path: workers stay free of pydantic

        raise ConfigError(f"{DECODER_VARIABLE}={asked!r} is not a decoder: use one of {', '.join(_DECODERS)}, "
                          f"or unset {DECODER_VARIABLE} to use decord where it imports and ffmpeg elsewhere")
    missing = None if asked == "ffmpeg" else _decord_import_error()
    if asked == "decord" and missing is not None:
        from ..config import ConfigError

        raise ConfigError(f"{DECODER_VARIABLE}=decord, but decord does not import ({missing}): `pip install decord` "
                          f"(wheels for Linux x86_64, macOS x86_64 and Windows), or unset {DECODER_VARIABLE} to "
                          "decode with the bundled ffmpeg")
    if asked == "ffmpeg":
        logger.info("decoding clips with the bundled ffmpeg (%s=ffmpeg): the same frames as decord", DECODER_VARIABLE)
        return "ffmpeg"
    if missing is not None:
        logger.info("decoding clips with the bundled ffmpeg: decord does not import (%s); the frames are the same as "
                    "decord's (it has wheels for Linux x86_64, macOS x86_64 and Windows only)", missing)
        return "ffmpeg"
    logger.debug("decoding clips with decord (ffmpeg for clips it cannot read; %s=ffmpeg forces ffmpeg)",
                 DECODER_VARIABLE)
    return "decord"


@contextlib.contextmanager
def _decord_path(path: str) -> Iterator[str]:
    """`path` as decord can open it: decord takes UTF-8 text only, so a file name with other bytes (read as
    surrogates) is opened through a temporary link with a plain name."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="cogft-") as folder:
            link = os.path.join(folder, "clip" + "".join(c for c in os.path.splitext(path)[1] if c.isascii()))
            os.symlink(os.path.abspath(path), link)
            yield link
        return
    yield path


def _decord_index(path: str) -> tuple[np.ndarray, float]:
    """Frame start times and the end of the last frame from decord's index; raises as decord does."""
    import decord

    with _decord_path(path) as readable:
        reader = decord.VideoReader(readable, num_threads=1)
        count = len(reader)
        stamps = reader.get_frame_timestamp(range(count)) if count else np.zeros((0, 2))
    return stamps[:, 0], float(stamps[-1, 1]) if count else 0.0


def _probe_with_index(path: str, spec: DecodeSpec) -> tuple[ClipProbe, np.ndarray]:
    """`probe_clip` plus the frame start times, which `decode_clip` needs to say where damage is."""
    started = time.perf_counter()
    probe = ClipProbe()
    starts = _fill_probe(path, spec, probe)
    probe.seconds = time.perf_counter() - started
    return probe, starts


def _frame_index(path: str, probe: ClipProbe) -> tuple[np.ndarray, float] | Problem:
    """Frame start times and end from decord's index, or from ffmpeg's packets where decord is not used or fails."""
    if decoder() == "decord":
        probe.decoder = "decord"
        try:
            return _decord_index(path)
        except Exception as error:  # decord raises RuntimeError and DECORDError (not a RuntimeError)
            probe.decord_error = _first_line(error)
    probe.decoder = "ffmpeg"
    index = ffmpeg_decode.frame_index(path)  # demuxing only: doctor stays fast
    return index if isinstance(index, Problem) else (index.starts, index.end)


def _fill_probe(path: str, spec: DecodeSpec, probe: ClipProbe) -> np.ndarray:
    """Fill `probe` from ffmpeg's stream info and the frame index (decord's, or ffmpeg's packets)."""
    info = probe_media(path)
    if isinstance(info, Problem):
        probe.problem = info
        return np.zeros(0)
    probe.info = info
    probe.size = spec.bucket_for(info.height, info.width)
    if problem := crop_problem(info.height, info.width, spec.at(probe.size)):
        probe.problem = problem
        return np.zeros(0)
    index = _frame_index(path, probe)
    if isinstance(index, Problem):
        probe.problem = index
        return np.zeros(0)
    starts, end = index
    probe.frames = len(starts)
    selection = select_frames(starts, end, spec)
    if isinstance(selection, Problem):
        probe.problem = selection
    elif probe.decord_error is not None:
        probe.selection = replace(selection, notes=(*selection.notes, _ffmpeg_note(info)))
    else:
        probe.selection = selection
    return starts


def _ffmpeg_note(info: MediaInfo) -> str:
    return f"decoded by ffmpeg: decord cannot read {info.codec}"


def probe_clip(path: str, spec: DecodeSpec) -> ClipProbe:
    """Metadata and the frame plan, without decoding pixels (ffmpeg's packet index where decord fails)."""
    return _probe_with_index(path, spec)[0]


def stream_problem(run: ffmpeg_decode.FfmpegRun, last: int, starts: np.ndarray) -> Problem | None:
    """Whether ffmpeg's decode of frames 0..`last` hit an error, and where.

    A damaged clip is skipped, not cut to its undamaged frames: a decoder conceals damage with grey
    or smeared blocks that persist until the next keyframe, and where that is the log does not say;
    losing one clip is cheaper than training on frames that look plausible and are wrong.
    """
    if run.error is None or run.clean > last:
        return None  # every frame up to the last selected one was decoded before any error
    if run.clean == 0:
        return Problem("decode_failed", f'cannot decode it: ffmpeg reports "{run.error[:200]}" at the first frame; '
                                        "re-export it (e.g. to H.264) or re-download it")
    at = float(starts[min(run.clean, len(starts) - 1)] - starts[0])
    return Problem("damaged_stream", (
        f'the video stream is damaged at or after frame {run.clean} ({at:.2f} s), inside the frames prepare trains '
        f'on: ffmpeg reports "{run.error[:200]}"; re-download or re-export the file, or trim it to its first {at:.2f} s'
    ))


def _decord_frames(path: str, wanted: list[int], height: int, width: int) -> np.ndarray | str:
    """decord's frames at `wanted`, resized; decord's error message where it cannot decode them."""
    try:
        import decord

        with _decord_path(path) as readable:
            reader = decord.VideoReader(readable, num_threads=1, width=width, height=height)
            return reader.get_batch(wanted).asnumpy()
    except Exception as error:  # RuntimeError, or DECORDError for damaged streams
        return _first_line(error)


def _decode_pixels(path: str, probe: ClipProbe, starts: np.ndarray, wanted: list[int],
                   size: tuple[int, int]) -> tuple[np.ndarray | Problem, list[str]]:
    """The frames at `wanted` by decord, checked for damage by ffmpeg; by ffmpeg alone where decord is not used or
    fails."""
    notes = []  # decord's failure to index was noted by the probe; decord not being used is logged once
    if probe.decoder == "decord":
        frames = _decord_frames(path, wanted, *size)
        if isinstance(frames, np.ndarray):
            return stream_problem(ffmpeg_decode.check_range(path, wanted[-1]), wanted[-1], starts) or frames, []
        probe.decoder, probe.decord_error, notes = "ffmpeg", frames, [_ffmpeg_note(probe.info)]
    run = ffmpeg_decode.decode_frames(path, wanted, *size)
    problem = stream_problem(run, wanted[-1], starts)
    if problem is None and len(run.frames) != len(wanted):
        decord = f" (decord: {probe.decord_error})" if probe.decord_error is not None else ""
        problem = Problem("decode_failed", f"ffmpeg decoded {len(run.frames)} of the {len(wanted)} frames selected"
                                           f"{decord}; re-export the file")
    return problem or run.frames, notes


def decode_clip(path: str, spec: DecodeSpec) -> Decoded:
    """Probe, select frames, decode them resized to the clip's bucket, check the range for damage, crop or pad."""
    started = time.perf_counter()
    probe, starts = _probe_with_index(path, spec)
    if probe.problem is not None:
        return Decoded(probe)
    info, selection, spec = probe.info, probe.selection, spec.at(probe.size)
    wanted = sorted(set().union(*selection.windows))  # windows may overlap: decode each frame once
    frames, notes = _decode_pixels(path, probe, starts, wanted, resized_size(info.height, info.width, spec))
    if isinstance(frames, Problem):
        probe.problem = frames
        return Decoded(probe)
    frames = place(frames, spec)
    row = {index: i for i, index in enumerate(wanted)}
    windows = tuple(np.ascontiguousarray(frames[[row[i] for i in w]]) for w in selection.windows)
    probe.seconds = time.perf_counter() - started
    return Decoded(probe, windows, (*geometry_notes(info, spec), *selection.notes, *notes))


ASPECT_TOLERANCE = 0.01  # log aspect ratio: a paired video this close to its clip's shape crops alike


def decode_aligned(path: str, clip: ClipProbe, spec: DecodeSpec, role: str = "control",
                   what: str = "control video") -> tuple[np.ndarray, ...] | Problem:
    """A clip's paired video (a control video, a mask video) read as the clip was read: the frames at the same times
    (each of the clip's windows, counted at the target rate on the paired video's own timestamps), resized and cropped
    to the clip's bucket. It must have the clip's aspect ratio (cropped otherwise, the two would not line up) and cover
    the clip's windows; its own frame rate may differ. `role` names its problems' codes (`control_unreadable`,
    `mask_mismatch`...), `what` the video in their details."""
    name = Path(path).name
    info = probe_media(path)
    if isinstance(info, Problem):
        return Problem(f"{role}_unreadable", f"its {what} {name}: {info.detail}")
    shape, clip_shape = info.width / info.height, clip.info.width / clip.info.height
    if abs(math.log(shape / clip_shape)) > ASPECT_TOLERANCE:
        return Problem(f"{role}_mismatch", (
            f"its {what} {name} is {info.width}x{info.height} and the clip {clip.info.width}x"
            f"{clip.info.height}: another aspect ratio would not line up with the clip after the crop; render the "
            f"{what} at the clip's size"))
    probe = ClipProbe(info=info)
    index = _frame_index(path, probe)
    if isinstance(index, Problem):
        return Problem(f"{role}_unreadable", f"its {what} {name}: {index.detail}")
    starts, end = index
    bucket, offsets = len(clip.selection.windows[0]), clip.selection.offsets
    available = _timing(starts, end, spec.fps)[2] if len(starts) else 0
    if available < offsets[-1] + bucket:
        rate = f" at data.fps={spec.fps:g}" if spec.fps else ""
        return Problem(f"{role}_too_short", (
            f"its {what} {name} has {available} frames{rate}, and the clip's frames need "
            f"{offsets[-1] + bucket}: a {what} must cover its clip; make it as long as the clip"))
    windows = [_window(starts, end, spec.fps, offset, bucket) for offset in offsets]
    wanted = sorted(set().union(*windows))
    at = spec.at(clip.size)
    frames, _ = _decode_pixels(path, probe, starts, wanted, resized_size(info.height, info.width, at))
    if isinstance(frames, Problem):
        return Problem(f"{role}_unreadable", f"its {what} {name}: {frames.detail}")
    frames = place(frames, at)
    row = {index: i for i, index in enumerate(wanted)}
    return tuple(np.ascontiguousarray(frames[[row[i] for i in w]]) for w in windows)
