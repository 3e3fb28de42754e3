"""Loss masks: a weight per pixel on a clip's loss, so a LoRA learns the subject and not the background.

A clip's mask (`masks.txt` beside `videos.txt`, or `data.mask_column`) is a video, read as the clip is
(`video.decode_aligned`: the same frames by time, the same resize and crop, the same aspect ratio and at least its
length), or a still image: one mask for every frame of the clip, sized as the clip's frames are. Grey levels are the
weights (white 1, black 0; a colour's luma), or an image's alpha where it has transparency. The family maps
each window's pixel mask to its latent grid (`Variant.loss_mask_latents`), cached beside the window's latents under
`LOSS_MASK`; the mask's bytes are part of the clip's key, so a changed mask re-encodes. A mask that cannot be used
skips its clip with the reason. A clip without a mask caches none and weighs every pixel alike: where a batch mixes
the two, `dataset.collate` gives it a mask of ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ConfigError
from .checks import Problem, file_problem
from .control import PairedDecode, decode_with_control
from .images import fit_image, open_upright
from .sources import Clip, is_still
from .video import ASPECT_TOLERANCE, ClipProbe, DecodeSpec, decode_aligned

if TYPE_CHECKING:  # the prepare workers import this module for `decode_with_mask`: they need no torch
    import torch

    from ..models.family import Variant

MASK_READING = 1  # how a mask's pixels become weights (BT.601 luma / 255); part of a masked clip's cache key
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_ALPHA_MODES = frozenset(("RGBA", "RGBa", "LA", "La", "PA"))  # Pillow modes with an alpha band


def check_masks(variant: Variant, clips: list[Clip], where: str, mask_column: str) -> None:
    """Refuse, before any clip is read, loss masks the model's family cannot map to its latents or train with."""
    masked = sum(clip.mask is not None for clip in clips)
    if masked and not variant.maps_loss_masks:
        raise ConfigError(f"{where}: loss masks are listed for {masked} of {len(clips)} clips (masks.txt or the "
                          f"{mask_column!r} column), but masks need a family that maps them and {variant.name}'s "
                          "does not; remove the masks")


def mask_problem(mask: Path) -> Problem | None:
    """Why a listed mask cannot be used, before anything is decoded: not there, or not a readable file."""
    if not mask.exists():
        return Problem("mask_missing", f"its loss mask {mask} not found; fix the path (masks.txt, or the mask "
                                       "column), or leave it blank to weigh the whole frame")
    if problem := file_problem(mask):
        return Problem("mask_unreadable", f"its loss mask {mask}: {problem.detail}")
    return None


def grey(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames [..., H, W, 3] as uint8 grey [..., H, W]: their luma (ITU-R BT.601), so grey stays grey;
    a frame at a time (a whole window in float would take 4x its bytes)."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    return np.stack([np.round(frame.astype(np.float32) @ _LUMA).clip(0, 255).astype(np.uint8)
                     for frame in flat]).reshape(frames.shape[:-1])


def read_mask(path: str, clip: ClipProbe, spec: DecodeSpec) -> tuple[np.ndarray, ...] | Problem:
    """A clip's loss mask per window of the clip, uint8 grey [F, H, W] at the clip's bucket; a still image gives
    [1, H, W] (every frame of the window alike)."""
    if not is_still(path):
        read = decode_aligned(path, clip, spec, "mask", "mask video")
        if isinstance(read, Problem) and read.code == "mask_unreadable":
            return Problem(read.code, f"{read.detail}; a loss mask is an image or a video (white counts, black not)")
        return read if isinstance(read, Problem) else tuple(grey(window) for window in read)
    name = Path(path).name
    image = _weights_image(path)
    if isinstance(image, str):
        return Problem("mask_unreadable", f"its loss mask {name} cannot be read as an image or a video ({image}); "
                                          "save it as a PNG or a video")
    if abs(math.log(image.width / image.height * clip.info.height / clip.info.width)) > ASPECT_TOLERANCE:
        return Problem("mask_mismatch", (
            f"its loss mask {name} is {image.width}x{image.height} and the clip {clip.info.width}x{clip.info.height}: "
            "another aspect ratio would not line up with the clip after the crop; make the mask at the clip's size"))
    pixels, _ = fit_image(image, spec.at(clip.size), "loss mask")
    still = grey(pixels)[None]
    return tuple(still for _ in clip.selection.windows)


def _weights_image(path: str):
    """A mask image as RGB whose grey is the weight: its alpha where some of it is transparent (a cut-out of the
    subject works as it is), else its pixels as every image is read (`open_upright`); or why it cannot be read."""
    from PIL import Image, ImageOps

    opened = open_upright(path)  # the checks every image passes (pixel limit, formats with a known range)
    if isinstance(opened, str):
        return opened
    try:
        with Image.open(path) as image:
            if image.mode in _ALPHA_MODES or "transparency" in image.info:
                alpha = ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
                if alpha.getextrema()[0] < 255:
                    return alpha.convert("RGB")
    except Exception as error:  # as open_upright: Pillow raises many kinds on damaged files
        return f"{type(error).__name__}: {str(error)[:200]}"
    return opened[0]


def decode_with_mask(item: tuple[str, str | None, str | None], spec: DecodeSpec) -> PairedDecode:
    """A worker's job: the listed file's windows and its control video's (`decode_with_control`), then its loss
    mask's aligned to them (None: it has none)."""
    video, control, mask = item
    paired = decode_with_control((video, control), spec)
    if mask is not None and paired.clip.problem is None and not isinstance(paired.control, Problem):
        paired.mask = read_mask(mask, paired.clip.probe, spec)
    return paired


def mask_latents(variant: Variant, mask: np.ndarray, frames: int) -> torch.Tensor:
    """A window's grey mask as the family caches it (`loss_mask_latents`), in fp32."""
    import torch

    weights = torch.from_numpy(mask).float().div(255).expand(frames, -1, -1)
    return variant.loss_mask_latents(weights).float().contiguous()
