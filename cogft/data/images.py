"""Still images: conditioning images of image-to-video models, and images trained as one-frame samples.

Every image passes through `open_upright` and `fit_image`: turned upright (EXIF) and sized exactly as the clips
are (covered and centre-cropped, or letterboxed, at its bucket), so a conditioning image or a still sample
is treated like a clip's frame (the stock pipeline would stretch an image to the video's size instead).
Images beside the clips train as one-frame samples in a bucket of their own (`decode_sample`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .checks import Problem
from .probe import MediaInfo
from .sources import is_still
from .video import ClipProbe, DecodeSpec, Decoded, Selection, decode_clip, place, probe_clip, resized_size

STILL_DECODER = "pillow"


def missing_image(path: Path, fix: str = "fix the path, or leave it out to condition on the clip's first "
                                         "frame") -> Problem | None:
    """Why `path` is no image file (missing, or a folder), with `fix`; None where it is one."""
    if path.is_file():
        return None
    what = "is a folder, not an image file" if path.is_dir() else "not found"
    return Problem("image_missing", f"conditioning image {path} {what}; {fix}")


def open_upright(path: str | Path):
    """The image as RGB, turned as its EXIF orientation says, or why it cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB"), opened.format or Path(path).suffix[1:]
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"{type(error).__name__}: {str(error)[:200]}"


def fit_image(image, spec: DecodeSpec, what: str) -> tuple[np.ndarray, list[str]]:
    """uint8 [H, W, 3] at the spec's size, as clip frames are sized, with a note on what was done to `what`."""
    from PIL import Image

    new_h, new_w = resized_size(image.height, image.width, spec)
    notes = []
    if (image.height, image.width) != (spec.height, spec.width):
        how = "centre-cropped" if spec.resize == "crop" else "letterboxed"
        notes.append(f"{what} {image.width}x{image.height} scaled to {new_w}x{new_h}, {how} to "
                     f"{spec.width}x{spec.height}")
    pixels = np.array(image.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    return place(pixels[None], spec)[0], notes


def read_image(path: str | Path, spec: DecodeSpec, missing_fix: str | None = None
               ) -> tuple[np.ndarray, list[str]] | Problem:
    """A conditioning image at the spec's size with notes; a Problem when it is missing or cannot be read (the
    advice `missing_fix` for a missing one, where the default, to leave it out, does not apply)."""
    path = Path(path)
    if problem := (missing_image(path) if missing_fix is None else missing_image(path, missing_fix)):
        return problem
    opened = open_upright(path)
    if isinstance(opened, str):
        return Problem("image_unreadable", f"conditioning image {path} cannot be read ({opened}); re-save it as PNG "
                                           "or JPEG")
    return fit_image(opened[0], spec, "conditioning image")


def conditioning_image(path: str | Path, height: int, width: int, resize: str, key: str):
    """A PIL image at the training size for the pipeline's `image`; an unusable file is a ConfigError on `key`."""
    from PIL import Image

    from ..config import ConfigError

    read = read_image(path, DecodeSpec((1,), height, width, None, resize),
                      "give the path of an image file (PNG, JPEG, WebP, ...); it is required here")
    if isinstance(read, Problem):
        raise ConfigError(f"{key}: {read.detail}")
    return Image.fromarray(read[0])


def _still(path: str, spec: DecodeSpec):
    """(probe, upright image) of a still sample: one frame, in the bucket nearest its aspect ratio."""
    started = time.perf_counter()
    probe = ClipProbe(decoder=STILL_DECODER)
    opened = open_upright(path)
    if isinstance(opened, str):
        probe.problem = Problem("image_unreadable", f"cannot be read as an image ({opened}); re-save it as PNG or JPEG")
        return probe, None
    image, kind = opened
    probe.info = MediaInfo(codec=kind.lower(), width=image.width, height=image.height, stored_width=image.width,
                           stored_height=image.height, rotation=0, fps=None, duration=None, has_audio=False)
    probe.frames, probe.size = 1, spec.bucket_for(image.height, image.width)
    probe.selection = Selection(windows=((0,),), offsets=(0,), available=1, notes=())
    probe.seconds = time.perf_counter() - started
    return probe, image


def probe_sample(path: str, spec: DecodeSpec) -> ClipProbe:
    """`probe_clip` for a listed file: a clip, or a still image (one frame)."""
    return _still(path, spec)[0] if is_still(path) else probe_clip(path, spec)


def decode_sample(path: str, spec: DecodeSpec) -> Decoded:
    """`decode_clip` for a listed file: a clip's windows, or a still image as one window of one frame."""
    if not is_still(path):
        return decode_clip(path, spec)
    started = time.perf_counter()
    probe, image = _still(path, spec)
    if image is None:
        return Decoded(probe)
    pixels, notes = fit_image(image, spec.at(probe.size), "image")
    probe.seconds = time.perf_counter() - started
    return Decoded(probe, (pixels[None],), tuple(notes))
