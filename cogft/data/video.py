"""Decode one clip into the frames the model trains on: frame selection, resize-and-centre-crop.

Runs inside worker processes (see `decode_pool`), so a decoder that crashes in native code takes down
one worker, not the whole prepare. Imports nothing heavier than numpy and decord.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class DecodeSpec:
    num_frames: int
    height: int
    width: int
    fps: float | None  # None: consecutive frames at the clip's own rate


@dataclass
class Decoded:
    frames: np.ndarray | None  # uint8 [F, H, W, 3]
    error: str | None = None
    notes: tuple[str, ...] = ()


def frame_indices(total: int, native_fps: float, spec: DecodeSpec) -> tuple[list[int] | None, str]:
    """Indices of the frames to keep, or None with the reason when the clip is too short."""
    step = 1.0
    if spec.fps is not None and native_fps > 0:
        step = max(native_fps / spec.fps, 1.0)
    indices = [int(round(i * step)) for i in range(spec.num_frames)]
    if indices[-1] >= total:
        seconds = total / native_fps if native_fps > 0 else float("nan")
        need = (spec.num_frames - 1) * step / native_fps + 1 / native_fps if native_fps > 0 else float("nan")
        return None, (
            f"too short: {total} frames ({seconds:.2f} s at {native_fps:g} fps), "
            f"needs {spec.num_frames} frames at {spec.fps or native_fps:g} fps ({need:.2f} s)"
        )
    note = f"resampled {native_fps:g} -> {spec.fps:g} fps" if step > 1 else ""
    return indices, note


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The smallest size with the clip's aspect ratio that covers the target (then centre-cropped)."""
    scale = max(target_h / height, target_w / width)
    return max(target_h, math.ceil(height * scale - 1e-6)), max(target_w, math.ceil(width * scale - 1e-6))


def decode_clip(path: str, spec: DecodeSpec) -> Decoded:
    """Decode, select frames, resize to cover and centre-crop. Never raises for a bad file."""
    try:
        import decord

        probe = decord.VideoReader(path, num_threads=1)
        total, native_fps = len(probe), float(probe.get_avg_fps())
        if total == 0:
            return Decoded(None, "no video frames")
        height, width = probe[0].shape[:2]
        indices, note = frame_indices(total, native_fps, spec)
        if indices is None:
            return Decoded(None, note)
        new_h, new_w = cover_size(height, width, spec.height, spec.width)
        reader = decord.VideoReader(path, num_threads=1, width=new_w, height=new_h)
        frames = reader.get_batch(indices).asnumpy()
        top, left = (new_h - spec.height) // 2, (new_w - spec.width) // 2
        frames = np.ascontiguousarray(frames[:, top : top + spec.height, left : left + spec.width])
        notes = tuple(n for n in (note, f"cropped {width}x{height} -> {spec.width}x{spec.height}"
                                  if (new_h, new_w) != (spec.height, spec.width) else "") if n)
        return Decoded(frames, None, notes)
    except Exception as error:  # decord raises RuntimeError and DECORDError (not a RuntimeError)
        return Decoded(None, f"cannot decode: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def decode_pool(paths: list[str], spec: DecodeSpec, workers: int = 2) -> Iterator[tuple[int, Decoded]]:
    """Decode clips in worker processes, yielding (index, result) in order while later clips decode.

    At most `2 * workers` decoded clips wait in memory. A worker that dies (a segfault in native
    decoding code) marks that clip as failed and the pool is rebuilt for the rest.
    """
    ahead = 2 * max(1, workers)
    position = 0
    while position < len(paths):
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn")) as pool:
            pending: deque = deque()
            submitted = position
            try:
                while position < len(paths):
                    while submitted < len(paths) and len(pending) < ahead:
                        pending.append(pool.submit(decode_clip, paths[submitted], spec))
                        submitted += 1
                    result = pending.popleft().result()
                    yield position, result
                    position += 1
            except BrokenProcessPool:  # some clip in flight crashed its worker: retry this one alone
                yield position, _decode_isolated(paths[position], spec)
                position += 1


def _decode_isolated(path: str, spec: DecodeSpec) -> Decoded:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(decode_clip, path, spec).result()
        except BrokenProcessPool:
            return Decoded(None, "decoder crashed (worker process died)")


def is_readable(path: Path) -> str | None:
    """A reason the file cannot be a clip, checked before any decode."""
    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a directory"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None
