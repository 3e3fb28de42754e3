"""Conditioning images of image-to-video models: read, turned upright, and sized exactly as the clips are.

A clip's given image, a validation image and `cogft sample --image` all pass through `read_image`, so the
image a model is sampled from is cropped the way its training images were (the stock pipeline would
stretch it to the video's size instead).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checks import Problem
from .video import DecodeSpec, place, resized_size

IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .webp .bmp .tif .tiff".split())


def missing_image(path: Path) -> Problem | None:
    if path.is_file():
        return None
    return Problem("image_missing", f"conditioning image {path} not found; fix the path, or leave it out to "
                                    "condition on the clip's first frame")


def read_image(path: str | Path, spec: DecodeSpec) -> tuple[np.ndarray, list[str]] | Problem:
    """uint8 [H, W, 3] at the spec's size (covered and centre-cropped, or letterboxed), with notes on what was
    done to it; a Problem when the file cannot be read as an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if problem := missing_image(path):
        return problem
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return Problem("image_unreadable", f"conditioning image {path} cannot be read ({type(error).__name__}: "
                                           f"{str(error)[:200]}); re-save it as PNG or JPEG")
    new_h, new_w = resized_size(image.height, image.width, spec)
    notes = []
    if (image.height, image.width) != (spec.height, spec.width):
        how = "centre-cropped" if spec.resize == "crop" else "letterboxed"
        notes.append(f"conditioning image {image.width}x{image.height} scaled to {new_w}x{new_h}, {how} to "
                     f"{spec.width}x{spec.height}")
    pixels = np.array(image.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    return place(pixels[None], spec)[0], notes


def conditioning_image(path: str | Path, height: int, width: int, resize: str, key: str):
    """A PIL image at the training size for the pipeline's `image`; an unusable file is a ConfigError on `key`."""
    from PIL import Image

    from ..config import ConfigError

    read = read_image(path, DecodeSpec((1,), height, width, None, resize))
    if isinstance(read, Problem):
        raise ConfigError(f"{key}: {read.detail}")
    return Image.fromarray(read[0])
