"""Control videos for control models: given per clip (`controls.txt`, a control column), read exactly as the clip
is read (`video.decode_aligned`), or made from the clip's own frames in prepare by an extractor (`data.control`).

An extractor runs on the very frames a window trains on, after the resize and crop, so the control lines up with
the clip by construction; its name and settings are part of the cache key, so a changed threshold re-encodes.
Validation and `cogft sample` read their control videos with `read_control`: the same frame picking, resize and
extractor, at the video's own size and length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import Config, ConfigError, DataConfig
from .checks import Problem
from .images import decode_sample
from .video import Decoded, DecodeSpec, decode_aligned, decode_clip

if TYPE_CHECKING:  # the prepare workers import this module for `decode_with_control`: they need no torch
    import torch


def check_control_settings(config: Config, conditions: tuple[str, ...], model_name: str) -> None:
    """Refuse, by key and before any clip is read, control settings the model cannot use or cannot run."""
    if config.data.control is not None and "control" not in conditions:
        raise ConfigError(f"data.control={config.data.control}: {model_name} takes no control video; set "
                          "model.control: true to train a control model from it, or leave data.control out")
    if config.data.control == "canny":
        try:
            import kornia  # noqa: F401
        except ImportError:
            raise ConfigError("data.control=canny: needs kornia, which is not installed; pip install "
                              "'cogft[control]' (or pip install kornia)") from None


def extractor_identity(data: DataConfig) -> dict:
    """What an extracted control depends on beside the clip's frames (part of the cache key); given controls: their
    bytes are in the clip's key instead."""
    if data.control is None:
        return {"control": "given"}
    return {"control": data.control, "thresholds": list(data.canny_thresholds)}


def extract_control(frames: np.ndarray, data: DataConfig, device: torch.device) -> np.ndarray:
    """The control video of uint8 frames [F, H, W, 3] by `data.control`: white edges on black for `canny`."""
    import torch
    from kornia.filters import canny

    pixels = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float() / 255.0
    low, high = data.canny_thresholds
    with torch.no_grad():
        _, edges = canny(pixels, low_threshold=low, high_threshold=high)
    edges = (edges[:, 0] * 255).round().to(torch.uint8)  # [F, H, W] in {0, 255}
    return edges[..., None].expand(-1, -1, -1, 3).contiguous().cpu().numpy()


@dataclass
class PairedDecode:
    """A clip's windows, and its given control video's windows at the same frames (None: none given; a Problem:
    the control cannot be used, so neither can the clip), and its loss mask's likewise (`masks.read_mask`)."""

    clip: Decoded
    control: tuple[np.ndarray, ...] | Problem | None = None
    mask: tuple[np.ndarray, ...] | Problem | None = None


def decode_with_control(item: tuple[str, str | None], spec: DecodeSpec) -> PairedDecode:
    """A worker's job: the listed file's windows, then its control video's aligned to them."""
    video, control = item
    decoded = decode_sample(video, spec)
    if control is None or decoded.problem is not None:
        return PairedDecode(decoded)
    return PairedDecode(decoded, decode_aligned(control, decoded.probe, spec))


def control_problem(clip_control: Path | None, data: DataConfig) -> Problem | None:
    """Why a clip of a control model cannot be prepared before anything is decoded: no control video and no
    extractor, or a listed control video that is not there."""
    if data.control is not None:
        return None
    if clip_control is None:
        return Problem("no_control", "it has no control video: list one in controls.txt (or the "
                                     f"{data.control_column!r} column), or set data.control: canny")
    if not clip_control.is_file():
        what = "is not a file" if clip_control.exists() else "not found"
        return Problem("control_missing", f"its control video {clip_control} {what}; fix the path")
    return None


def read_frames(path: str, num_frames: int, height: int, width: int, data: DataConfig, key: str) -> list:
    """A video as PIL frames of a video's size and length, picked by timestamp at `data.fps` and resized and cropped
    as clips are (a validation or `cogft sample` control video, a `--video` to restyle); refused by `key` where it
    cannot be read or is too short."""
    from PIL import Image

    decoded = decode_clip(path, DecodeSpec((num_frames,), height, width, data.fps, data.resize))
    if decoded.problem is not None:
        raise ConfigError(f"{key}: {path}: {decoded.problem.detail}")
    return [Image.fromarray(frame) for frame in decoded.frames]


def read_control(path: str, num_frames: int, height: int, width: int, data: DataConfig, key: str,
                 device: torch.device) -> list:
    """`read_frames`, then `data.control`'s extractor (a source video, read as a clip's control is made)."""
    from PIL import Image

    frames = read_frames(path, num_frames, height, width, data, key)
    if data.control is None:
        return frames
    extracted = extract_control(np.stack([np.asarray(frame) for frame in frames]), data, device)
    return [Image.fromarray(frame) for frame in extracted]
