"""The motion guard: does the LoRA still move its videos as the base model does?

A LoRA trained on many still images (or on clips that barely move) can freeze motion while its loss looks fine. So a
LoRA run with validation prompts also renders each prompt with the adapter off at the same seed, size, steps and
guidance, once per run: the videos go to samples/base/ and their motion to samples/base/motion.json, keyed by those
settings, so a resume or a later validation never renders them again unless the settings change. Every validation
then logs `quality/motion_ratio`: the LoRA videos' motion over the base videos'.

Motion is the mean optical-flow magnitude (OpenCV's Farneback), in pixels per frame at the video's size, measured on
the rendered frames in memory (not the lossy mp4). Flow rather than the mean frame-to-frame change, measured on the
sample clips at 480x720: a still frame with a 10 % brightness flicker or 6 grey levels of noise has as much
frame-to-frame change as the clips' real motion (9-25 and 4-7 levels against 8-105) but little flow (0-0.2 and 0-0.1
px against 1-9.5; the test pattern 4 and 0.6), and blurring (sigma 3) or lowering the contrast (x0.6), as a style LoRA
may, moves the frame-to-frame change by up to 23x and the flow by 2-44 %. Frames are measured at most WORK_SIDE
pixels long: faster, and steadier than at full size under blur and noise.

The ratio is the prompts' total motion with the LoRA over the base's total (the per-prompt ratios' mean weighted by
the base's motion), so a prompt the base renders nearly still cannot swing it; the per-prompt ratios are logged beside
it (`quality/motion_ratio/NN`), with `quality/motion` and `quality/motion_base` (the prompts' mean flow).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..records import DamagedRecordError, read_json
from ..run_dir import BASE_SAMPLES_DIR, MOTION_RECORD, REPORT_FILE, sample_path

logger = logging.getLogger(__name__)

RATIO, MOTION, MOTION_BASE = "quality/motion_ratio", "quality/motion", "quality/motion_base"
WORK_SIDE = 360  # the long side frames are measured at (never enlarged)
MEASURE = f"farneback-{WORK_SIDE}"  # part of each base render's key: another measure measures the base again


def measures_motion(config: Config) -> bool:
    """The guard runs for LoRA runs with validation prompts and videos of more than one frame (`quality.motion`)."""
    return (config.quality.motion and config.train.mode == "lora" and bool(config.validation.prompts)
            and config.data.num_frames > 1)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ConfigError("quality.motion: the motion guard measures optical flow with OpenCV, which is not "
                          "installed (a dependency of cogft); pip install opencv-python-headless, or set "
                          "quality.motion=false to train without it") from None
    return cv2


def check_motion_guard(config: Config) -> None:
    """Refuse, before prepare, a run whose motion guard cannot measure (OpenCV missing)."""
    if measures_motion(config):
        _cv2()


def motion(frames) -> float:
    """The mean optical-flow magnitude of `frames` (float [F, H, W, 3] in 0..1, as a render returns them) in pixels per
    frame at their size: Farneback's dense flow between each pair of neighbouring frames (in grey, at most WORK_SIDE
    pixels long), averaged over the pixels and the pairs; 0 for a single frame."""
    cv2 = _cv2()
    frames = np.asarray(frames)
    scale = min(1.0, WORK_SIDE / max(frames.shape[1:3]))
    grey = []
    for frame in frames:
        pixels = cv2.cvtColor(np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        grey.append(pixels if scale == 1 else cv2.resize(pixels, None, fx=scale, fy=scale,
                                                         interpolation=cv2.INTER_AREA))
    # OpenCV's documented defaults: a 0.5 pyramid of 3 levels, 15-pixel windows, 3 iterations, degree-5 expansion
    flows = [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0) for a, b in zip(grey, grey[1:])]
    return float(np.mean([np.linalg.norm(flow, axis=-1).mean() for flow in flows]) / scale) if flows else 0.0


def _digest(value) -> str | None:
    """A short hash of a tensor's bytes, a PIL image's, or a list of PIL frames' (None: nothing given)."""
    if value is None:
        return None
    hasher = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        hasher.update(str(value.dtype).encode())
        hasher.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    else:
        for image in value if isinstance(value, list) else [value]:
            hasher.update(image.tobytes())
    return hasher.hexdigest()[:16]


def render_key(config: Config, index: int, size: tuple[int, int], embeds: torch.Tensor, negative: torch.Tensor,
               image=None, control=None) -> str:
    """What a base render of validation prompt `index` depends on: the model, the prompt's and the negative prompt's
    embeddings, its seed, size, frames, steps, guidance, inference cache, start image and control video, and the
    measure. A base render whose key changed is rendered again."""
    model, validation = config.model, config.validation
    parts = {"measure": MEASURE, "model": model.path, "revision": model.revision, "fp8_base": model.fp8_base,
             "seed": validation.seed + index, "size": list(size), "frames": config.data.num_frames,
             "steps": validation.num_inference_steps, "guidance": validation.guidance_scale, "cache": validation.cache,
             "vae_tiling": config.data.vae_tiling, "prompt": _digest(embeds), "negative": _digest(negative),
             "image": _digest(image), "control": _digest(control)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class MotionGuard:
    """Each validation prompt's base motion (read from samples/base/motion.json, or measured at the next validation)
    and the motion of this validation's LoRA videos, which `log` turns into the run's metrics."""

    def __init__(self, run_dir: Path, texts: list[str], keys: list[str]):
        self.folder, self.texts, self.keys = run_dir / BASE_SAMPLES_DIR, texts, keys
        self.base = self._recorded()  # prompt index -> the base video's motion
        self.tuned: dict[int, float] = {}  # this validation's LoRA videos, on this process
        self.fresh: dict[int, float] = {}  # this validation's base renders, on this process
        missing = self.missing(range(len(keys)))
        if missing:
            logger.info("motion guard: the base model's video of validation prompts %s is rendered at the next "
                        "validation (%d kept in %s)", missing, len(self.base), self.folder / MOTION_RECORD)

    def _recorded(self) -> dict[int, float]:
        """The base motions of samples/base/motion.json whose render settings are still the prompts'."""
        path = self.folder / MOTION_RECORD
        if not path.is_file():
            return {}
        try:
            renders = read_json(path, "it is remade at the next validation", renders=dict)["renders"]
        except DamagedRecordError as error:
            logger.warning("%s", error)
            return {}
        known, changed = {}, []
        for index, key in enumerate(self.keys):
            entry = renders.get(str(index))
            if not isinstance(entry, dict) or entry.get("key") != key:
                changed += [index] if isinstance(entry, dict) else []
                continue
            value = entry.get("motion")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
                known[index] = float(value)
        if changed:
            logger.info("motion guard: validation prompts %s changed (prompt, seed, size, steps, guidance, image, "
                        "control or model) since their base render; rendered again", changed)
        return known

    def missing(self, indices) -> list[int]:
        """Which of the prompts `indices` have no base motion yet."""
        return [i for i in indices if i not in self.base]

    def log(self, accelerator, step: int, counts: bool) -> dict[str, float]:
        """Every process calls it after a validation (the motions are summed over them: each rendered its share, or,
        with sharded weights, every prompt, of which the main process's `counts`). Logs and returns the metrics,
        the same on every process; the main process records the new base motions."""
        count = len(self.keys)
        table = torch.zeros(4, count, dtype=torch.float64, device=accelerator.device)
        if counts:
            for row, values in ((0, self.tuned), (2, self.fresh)):
                for index, value in values.items():
                    table[row, index], table[row + 1, index] = value, 1
        tuned, has_tuned, fresh, has_fresh = accelerator.reduce(table, reduction="sum").tolist()
        self.tuned, self.fresh = {}, {}
        new = {i: fresh[i] for i in range(count) if has_fresh[i]}
        if new:
            self.base.update(new)
            if accelerator.is_main_process:
                self._write()
        pairs = {i: (tuned[i], self.base[i]) for i in range(count) if has_tuned[i] and i in self.base}
        metrics = motion_metrics(pairs)
        if metrics:
            accelerator.log(metrics, step=step)
            if RATIO in metrics:
                logger.info("motion at step %d: %s %.3f (LoRA %.3g px/frame, base %.3g)", step, RATIO, metrics[RATIO],
                            metrics[MOTION], metrics[MOTION_BASE])
            else:
                logger.warning("motion at step %d: the base model's validation videos do not move (no optical flow), "
                               "so there is no motion ratio", step)
        return metrics

    def _write(self) -> None:
        """samples/base/motion.json with the current prompts' base motions, replaced atomically."""
        renders = {str(i): {"key": self.keys[i], "prompt": self.texts[i], "motion": value,
                            "video": sample_path(Path(), 0, i, self.texts[i]).name}
                   for i, value in sorted(self.base.items())}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / MOTION_RECORD
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"measure": MEASURE, "renders": renders}, indent=1))
        os.replace(tmp, path)


def motion_metrics(pairs: dict[int, tuple[float, float]]) -> dict[str, float]:
    """`quality/motion_ratio` (the total over the total), `quality/motion`, `quality/motion_base` and each prompt's
    ratio, from {prompt index: (LoRA motion, base motion)}; the ratio is left out where the base does not move."""
    if not pairs:
        return {}
    tuned, base = sum(t for t, _ in pairs.values()), sum(b for _, b in pairs.values())
    metrics = {MOTION: tuned / len(pairs), MOTION_BASE: base / len(pairs)}
    if base > 0:
        metrics[RATIO] = tuned / base
    metrics.update({f"{RATIO}/{i:02d}": t / b for i, (t, b) in sorted(pairs.items()) if b > 0})
    return metrics


def still_images(run_dir: Path) -> tuple[int, int] | None:
    """(still images, samples) the data kept, from prepare_report.jsonl's summaries (one per rank); None without."""
    path = run_dir / REPORT_FILE
    images = kept = 0
    found = False
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            summary = json.loads(line).get("summary")
        except (ValueError, AttributeError):
            continue
        if isinstance(summary, dict) and isinstance(summary.get("images"), int):
            images, kept, found = images + summary["images"], kept + int(summary.get("kept", 0)), True
    return (images, kept) if found else None


def motion_lines(config: Config, run_dir: Path, logged: list[dict]) -> list[str]:
    """The summary's and report's words on motion: the last ratio, the lowest, and a warning with the count of still
    images when the last falls below `quality.min_motion_ratio`."""
    rows = [row for row in logged if isinstance(row.get(RATIO), (int, float)) and not isinstance(row[RATIO], bool)]
    if not rows:
        return []
    last, limit = rows[-1], config.quality.min_motion_ratio
    line = (f"  motion: quality/motion_ratio {last[RATIO]:.3f} at step {last['step']} (the LoRA's validation videos' "
            "optical flow over the base model's at the same seeds)")
    below = [row["step"] for row in rows[:-1] if row[RATIO] < limit]
    if below:
        line += f"; below quality.min_motion_ratio={limit:g} at step {', '.join(map(str, below))}"
    lines = [line]
    if last[RATIO] < limit:
        stills = still_images(run_dir)
        if stills is None:
            data = "the count of still images is unknown (no prepare_report.jsonl)"
        elif stills[0]:
            data = (f"the data had {stills[0]} still images of {stills[1]} samples (stills teach no motion: fewer of "
                    "them, or a smaller share of each epoch with data.sets' weight, keep it)")
        else:
            data = ("the data had no still images (clips that barely move, or training too long, freeze it too; "
                    "fewer steps or a lower train.learning_rate may keep it)")
        moving = [row for row in rows if row[RATIO] >= limit]
        earlier = f"; the last validation above it was at step {moving[-1]['step']}" if moving else ""
        lines.append(f"  WARNING: the LoRA freezes motion: quality/motion_ratio {last[RATIO]:.3f} is below "
                     f"quality.min_motion_ratio={limit:g}; {data}{earlier}")
    return lines


def motion_html(config: Config, run_dir: Path, logged: list[dict]) -> str:
    """report.html's Motion section (empty where no motion ratio was logged): the summary's words and the ratio at
    each validation."""
    lines = motion_lines(config, run_dir, logged)
    if not lines:
        return ""
    rows = "".join(f"<tr><td>{row['step']}</td><td>{row[RATIO]:.3f}</td></tr>" for row in logged
                   if isinstance(row.get(RATIO), (int, float)) and not isinstance(row[RATIO], bool))
    warned = ' style="color:#b00020"'
    words = "".join(f"<p{warned if 'WARNING' in line else ''}>{html.escape(line.strip())}</p>" for line in lines)
    return f"<h3>Motion</h3>\n{words}\n<table><tr><th>step</th><th>{RATIO}</th></tr>{rows}</table>\n"
