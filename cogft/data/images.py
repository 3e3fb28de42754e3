"""Still images: conditioning images of image-to-video models, and images trained as one-frame samples.

Every image passes through `open_upright` and `fit_image`: turned upright (EXIF) and sized exactly as the clips
are (covered and centre-cropped, or letterboxed, at its bucket), so a conditioning image or a still sample
is treated like a clip's frame (the stock pipeline would stretch an image to the video's size instead).
Images beside the clips train as one-frame samples in a bucket of their own (`decode_sample`). Every pixel format
Pillow opens is read with its real range (`true_rgb`: 16-bit and float images scaled, transparency composited on
white) or refused with the reason; an image over Pillow's pixel limit (a decompression bomb) is refused, never
decoded. Animated GIF, PNG and WebP files are clips (`sources.is_still`), decoded by ffmpeg.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .checks import Problem, file_problem
from .probe import MediaInfo
from .sources import is_still
from .video import ClipProbe, Decoded, DecodeSpec, Selection, crop_problem, decode_clip, place, probe_clip, resized_size

STILL_DECODER = "pillow"
IMAGE_READING = 2  # how images are read (2: true range, transparency on white); part of their cache keys


def missing_image(path: Path, fix: str = "fix the path, or leave it out to condition on the clip's first "
                                         "frame") -> Problem | None:
    """Why `path` is no image file (missing, or a folder), with `fix`; None where it is one."""
    if path.is_file():
        return None
    what = "is a folder, not an image file" if path.is_dir() else "not found"
    return Problem("image_missing", f"conditioning image {path} {what}; {fix}")


# modes Pillow converts to RGB with their real range as they are, and those with an alpha band
_EIGHT_BIT_MODES = frozenset(("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"))
_ALPHA_MODES = frozenset(("RGBA", "RGBa", "LA", "La", "PA"))
_SIXTEEN_BIT_MODES = frozenset(("I;16", "I;16L", "I;16B", "I;16N"))
_FLOAT_SLACK = 1e-3  # float pixels this far outside 0..1 are rounding, clipped rather than refused


def _from_gray(values: np.ndarray):
    """Grey values in 0..1 as an 8-bit RGB image."""
    from PIL import Image

    return Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), "L").convert("RGB")


def declared_bits(image) -> int | None:
    """Bits per sample a TIFF declares for its unsigned integer pixels (Pillow holds 12-bit ones as I;16, signed
    16-bit and 32-bit ones as I); None where it declares none, or signed samples (no defined black or white)."""
    tags = getattr(image, "tag_v2", {})
    bits, sample_format = tags.get(258), tags.get(339, 1)
    if 2 in (sample_format if isinstance(sample_format, tuple) else (sample_format,)):
        return None
    return max(bits) if isinstance(bits, tuple) else bits


def true_rgb(image, bits: int | None = None) -> tuple[object, list[str]] | str:
    """The image as 8-bit RGB with its real range, and what was done; or why that cannot be known. `bits`: the bits
    per sample its file declares (`declared_bits`), which say the range of integer pixels held as mode I.

    Pillow's own `convert("RGB")` clips 16-bit and float values to 0..255 (a 16-bit grey image comes out almost
    white, a 0..1 float one black) and drops transparency, showing whatever colour hides under it."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        if mode != "I":
            bits = bits or 16  # a PNG declares none: 16
        if bits is None or bits > 16:
            return (f"its pixels are {bits or 'signed or 32'}-bit integers (Pillow mode {mode}), which have no "
                    "defined white level; re-save it with 8 or 16 bits per channel")
        return _from_gray(np.asarray(image).astype(np.float64) / (2**bits - 1)), [f"{bits}-bit grey scaled to 8 bits"]
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            return "its float pixels include NaN or infinity; re-save it as an 8- or 16-bit image"
        low, high = float(values.min()), float(values.max())
        if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
            return (f"its float pixels run from {low:g} to {high:g}; float images are read as 0 (black) to 1 (white), "
                    "so what these mean is unknown: re-save it as an 8- or 16-bit image")
        return _from_gray(values), ["float grey (0 to 1) scaled to 8 bits"]
    if mode in _ALPHA_MODES or "transparency" in image.info:
        from PIL import Image

        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return rgba.convert("RGB"), []
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), ["transparent pixels composited on white"]
    if mode not in _EIGHT_BIT_MODES:
        return f"its pixel format (Pillow mode {mode}) has no known range; re-save it as 8-bit RGB"
    return image.convert("RGB"), []


def image_problem(path: Path, missing_fix: str | None = None) -> Problem | None:
    """Why a conditioning image cannot be used, before it is decoded: missing (with `missing_fix` as the advice,
    where leaving it out does not apply), empty or not readable."""
    if problem := (missing_image(path) if missing_fix is None else missing_image(path, missing_fix)):
        return problem
    if problem := file_problem(path):
        return Problem("image_unreadable", f"conditioning image {path}: {problem.detail}")
    return None


def unusable_image(path: str | Path) -> str | None:
    """Why an image a key names cannot be used (unreadable, not an image, a format with no known range, over the
    pixel limit), found by reading it before any work; None where it can."""
    if problem := file_problem(Path(path)):
        return problem.detail
    opened = open_upright(path)
    return opened if isinstance(opened, str) else None


def check_validation_images(images: list[str]) -> None:
    """Refuse, by key and before any work, a `validation.images` file that cannot be used (the model has checked
    that it takes images and that each exists)."""
    for image in images:
        if why := unusable_image(image):
            raise ConfigError(f"validation.images: {image} cannot be used: {why}; re-save it as PNG or JPEG")


def open_upright(path: str | Path) -> tuple[object, str, list[str]] | str:
    """The image as 8-bit RGB with its real range (`true_rgb`), turned as its EXIF orientation says, its format and
    notes on what was done; or why it cannot be read. An image over Pillow's pixel limit is refused unread."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            converted = true_rgb(ImageOps.exif_transpose(opened), declared_bits(opened))  # a turned copy has no tags
            kind = opened.format or Path(path).suffix[1:]
    except Image.DecompressionBombError as error:
        return f"too large to decode safely ({str(error).rstrip('.')}); scale it down"
    except Exception as error:  # Pillow raises many kinds on damaged files (OSError, SyntaxError, struct.error...)
        return f"{type(error).__name__}: {str(error)[:200]}"
    if isinstance(converted, str):
        return converted
    return converted[0], kind, converted[1]


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
    if problem := image_problem(path, missing_fix):
        return problem
    opened = open_upright(path)
    if isinstance(opened, str):
        return Problem("image_unreadable", f"conditioning image {path} cannot be read ({opened}); re-save it as PNG "
                                           "or JPEG")
    if problem := crop_problem(opened[0].height, opened[0].width, spec):
        return Problem("image_unreadable", f"conditioning image {path}: {problem.detail}")
    pixels, notes = fit_image(opened[0], spec, "conditioning image")
    return pixels, [*(f"conditioning image: {note}" for note in opened[2]), *notes]


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
    """(probe, upright image) of a still sample: one frame, in the bucket nearest its aspect ratio; what reading
    it did (16-bit scaled, transparency composited) is in its selection's notes."""
    started = time.perf_counter()
    probe = ClipProbe(decoder=STILL_DECODER)
    opened = open_upright(path)
    if isinstance(opened, str):
        probe.problem = Problem("image_unreadable", f"cannot be read as an image ({opened}); re-save it as PNG or JPEG")
        return probe, None
    image, kind, notes = opened
    probe.info = MediaInfo(codec=kind.lower(), width=image.width, height=image.height, stored_width=image.width,
                           stored_height=image.height, rotation=0, fps=None, duration=None, has_audio=False)
    probe.frames, probe.size = 1, spec.bucket_for(image.height, image.width)
    if problem := crop_problem(image.height, image.width, spec.at(probe.size)):
        probe.problem = problem
        return probe, None
    probe.selection = Selection(windows=((0,),), offsets=(0,), available=1, notes=tuple(notes))
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
    return Decoded(probe, (pixels[None],), (*probe.selection.notes, *notes))
