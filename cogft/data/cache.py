"""Prepare: clips + captions → cached VAE latent distributions and T5 prompt embeddings.

Run once per dataset and model; training then needs neither the T5 encoder nor the VAE encoder.
Entries are keyed by content (the clip's bytes, every preprocessing parameter, the encoder's
identity), so a changed clip or setting re-encodes only what changed, a renamed clip does not, and
one cache serves many runs. Image-to-video models get, in each clip's entry, K encodings of its
conditioning image (the given one or the window's first frame) under seeded pixel noise: the reference
recipe noises the image before encoding, so one frozen draw would not do, and training must not hold the
VAE encoder. A clip with a loss mask (`masks.py`) gets it on the latent grid in each window's entry, and the mask's
bytes in its key. Each entry is written to a temporary name and renamed, so an interrupted
prepare leaves no half entry and a rerun encodes only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from .. import cogft_home
from ..config import Config
from ..disk import disk_full_error, is_disk_full
from ..host_memory import host_peak_gib
from ..models.family import LOSS_MASK, Variant
from ..models.loading import load_pipeline, load_text_encoder, load_vae, resolve_model_path
from ..run_dir import REPORT_FILE, safetensors_length
from .captions import count_tokens, load_tokenizer, truncation_note, validation_texts
from .checks import Problem, admission_problems, byte_duplicates, file_digest, summarize_problems
from .control import (
    PairedDecode,
    check_control_settings,
    control_problem,
    extract_control,
    extractor_identity,
)
from .images import IMAGE_READING, image_problem, read_image
from .masks import MASK_READING, check_masks, decode_with_mask, mask_latents, mask_problem
from .sources import Clip, DataSet, data_sets, is_still, printable, read_set
from .triggers import bleed_texts, check_trigger, clip_triggers, without_triggers
from .video import ClipProbe, Decoded, DecodeSpec, window_offsets, windows_note
from .workers import isolated_map

logger = logging.getLogger(__name__)
PROMPT_BATCH = 16


@dataclass(frozen=True)
class CacheEntry:
    latents: tuple[str, ...]  # safetensors with latent_mean, latent_logvar [C, F, h, w]: one per window
    prompt: str    # safetensors with prompt_embeds [L, D]
    video: str
    caption: str
    frames: int    # the clip's frame bucket (1: a still image) and resolution bucket: a batch holds one bucket
    height: int
    width: int
    clip: str = ""  # the clip's content key (its bytes, and its given image's): how it is encoded changes it not
    set: int = 0    # its source's place in `data.sets` (0 for `data.path`)
    prior: bool = False  # a `kind: prior` set's: trained towards the base model's prediction
    line: str = ""  # where it was listed ("videos.txt:3"): its row's `listed_at` in prepare_report.jsonl
    untriggered_prompt: str = ""  # with eval.holdout: the caption's embedding without its trigger ("": it has none)

    @property
    def bucket(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width


@dataclass(frozen=True)
class Kept:
    """A clip (or still image) ready to train on: its cache entries (one per window) and its bucket."""

    clip: Clip
    paths: tuple[Path, ...]
    frames: int
    size: tuple[int, int]
    digest: str  # Preparer.clip_key


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass
class PreparedData:
    entries: list[CacheEntry]
    validation_prompts: list[tuple[str, str]]  # (prompt, embedding file)
    negative_prompt: str                       # embedding file of "" for classifier-free guidance
    report: list[dict] = field(default_factory=list)  # one row per listed clip, then {"summary": ...}
    bleed_prompts: list[tuple[str, str]] = field(default_factory=list)  # embedding files of validation prompts with
                                                                         # their trigger and without (quality/bleed)

    @property
    def summary(self) -> dict:
        return next(row["summary"] for row in self.report if "summary" in row)


def cache_root(config: Config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return cogft_home() / "cache"


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def component_identity(model_path: str, component: str, revision: str | None) -> dict:
    """What makes an encoder's output unique: its config plus its weight files' sizes and times."""
    folder = Path(model_path) / component
    identity: dict = {"path": model_path, "revision": revision, "component": component}
    if folder.is_dir():
        identity["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
        )
    return identity


def _payload_sha256(blob: bytes) -> str:
    """The checksum of a safetensors file's tensor bytes (what follows its 8-byte length and JSON header)."""
    return hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


TMP_SUFFIX = ".tmp"
STALE_AFTER_S = 600  # far longer than one entry's write takes


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write with a checksum of the tensors, to a temporary name, flushed, then renamed: readers see a whole
    entry or none, and `entry_problem` can tell later if its bytes changed. A failed write (a full disk) removes
    its temporary file; a kill leaves it to `remove_orphaned_tmp`."""
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    blob = safetensors_bytes(tensors, metadata={**metadata, "sha256": _payload_sha256(safetensors_bytes(tensors))})
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(f"cache entry {path}", path.parent, len(blob),
                                  "Free space there, or set data.cache_dir to a folder on a disk with room; a rerun "
                                  "encodes only what is missing") from error
        raise


def remove_orphaned_tmp(root: Path) -> None:
    """Remove the temporary files of `save_atomic` calls whose process was killed: nothing else ever would. A file
    whose writer (the pid in its name) is alive stays, and so does one written in the last STALE_AFTER_S: a
    process on another machine or in another container sharing the cache has a pid this one cannot check."""
    removed = 0
    for tmp in root.glob(f"*/*/.*{TMP_SUFFIX}"):
        pid = tmp.name.removesuffix(TMP_SUFFIX).rpartition(".")[2]
        if not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):  # another rank may remove it first
            if time.time() - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
                removed += 1
    if removed:
        logger.info("removed %d temporary files of interrupted prepares from %s", removed, root)


def entry_problem(path: Path) -> str | None:
    """Why a cache entry cannot be trusted (unreadable, truncated, bytes changed since written), or None.
    Entries written before checksums were kept pass when their header and size hold together."""
    try:
        blob = path.read_bytes()
        header_end = 8 + int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:header_end])
    except (OSError, ValueError) as error:
        return f"unreadable ({error})"
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        return "unreadable (its header is not a safetensors header)"
    expected = header.get("__metadata__", {}).get("sha256")
    if expected is not None:
        return None if _payload_sha256(blob) == expected else "its bytes changed since it was written (checksum)"
    try:
        return None if len(blob) == safetensors_length(blob[8:header_end]) else "truncated"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "unreadable (its header is not a safetensors header)"


def _metadata_problem(meta: dict) -> str | None:
    """What in an entry's metadata does not read as `encode_latents` wrote it, or None."""
    try:
        int(meta["available"])
        if "source_size" in meta:
            _height, _width = map(int, meta["source_size"].split("x"))
        notes, source = json.loads(meta.get("notes", "[]")), json.loads(meta.get("source") or "{}")
    except (KeyError, ValueError, TypeError) as error:
        return f"its metadata does not read ({type(error).__name__}: {error})"
    if not isinstance(notes, list) or not isinstance(source, dict):
        return "its metadata does not read (notes or source of the wrong type)"
    return None


def _repair(path: Path) -> str | None:
    """Drop a damaged entry so it is made again; returns what was wrong, for the log and the report."""
    problem = entry_problem(path)
    if problem is not None:
        logger.warning("cache entry %s: %s; making it again", path, problem)
        path.unlink(missing_ok=True)
    return problem


def _crashed(item: tuple[str, str | None, str | None]) -> PairedDecode:
    return PairedDecode(Decoded(ClipProbe(problem=Problem(
        "decoder_crashed", "the decoder crashed on this file, its control video or its loss mask (its worker process "
                           "died); re-encode it with ffmpeg"
    ))))


COMPILE_VAE_FROM_CLIPS = 600  # where the encoder's one-time compile pays for itself (docs/performance.md)


def compile_vae_enabled(setting: bool | str, device: torch.device, clips: int) -> bool:
    """`data.compile_vae: auto` compiles on CUDA once enough clips wait to pay for the compile."""
    if setting == "auto":
        return device.type == "cuda" and clips >= COMPILE_VAE_FROM_CLIPS
    return bool(setting)


class Preparer:
    """Holds the keys, stage timings and lazily loaded encoders for one config on one device."""

    def __init__(self, config: Config, variant: Variant, device: torch.device):
        self.config = config
        self.variant = variant
        self.device = device
        self.dtype = variant.compute_dtype(device)
        self.model_path = resolve_model_path(config.model.path)
        self.root = cache_root(config)
        data = config.data
        self.spec = DecodeSpec(variant.frame_buckets(data.num_frames, data.shortest_bucket), *data.sizes[0], data.fps,
                               data.resize, data.windows, data.sizes)
        self.seconds: Counter = Counter()  # by stage, for the summary and bench_prepare
        self.repaired: dict[str, list[str]] = {}  # content digest -> notes on damaged entries made again
        rev = config.model.revision
        self.takes_image = "image" in variant.conditions  # a clip's given image (`data.image_column`) is used
        self.takes_control = "control" in variant.conditions  # each clip's control video, given or extracted
        check_control_settings(config, variant.conditions, variant.name)
        # what the family's entries depend on beside the VAE (text-to-video: nothing, so its keys stay as they were)
        encoder = [component_identity(self.model_path, "vae", rev), str(self.dtype), *variant.cache_identity(config)]
        if self.takes_control:
            encoder.append(extractor_identity(data))
        # one salt per resolution bucket: a bucket added or removed leaves the other buckets' entries as they are
        self._latent_salts = {size: _digest(self.spec.at(size).pixel_key(), *encoder) for size in data.sizes}
        self._prompt_salt = _digest(
            component_identity(self.model_path, "text_encoder", rev),
            component_identity(self.model_path, "tokenizer", rev),
            variant.max_text_seq_length,
            str(self.dtype),
        )

    def latent_path(self, content_digest: str, frames: int, size: tuple[int, int], offset: int = 0) -> Path:
        """Where a window of `frames` frames at `size` starting at frame `offset` (the clip's start: 0) is cached."""
        parts = (content_digest, self._latent_salts[size], frames) + ((offset,) if offset else ())
        key = _digest(*parts)
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def prompt_path(self, text: str) -> Path:
        key = _digest(text, self._prompt_salt)
        return self.root / "prompts" / key[:2] / f"{key}.safetensors"

    def find_cached(self, content_digest: str, still: bool) -> tuple[tuple[Path, ...], tuple[int, ...], dict, int,
                                                                      tuple[int, int]] | None:
        """The entries this clip would be encoded to now, if they all exist: the largest frame bucket its frames
        fill (a still image: one frame) at the resolution bucket nearest its shape, one entry per window; returned
        with their window starts, the first entry's metadata, the frame bucket and the size.

        The frame count, size and window start are part of the key and each entry records how many frames
        the clip had and its displayed size, so a changed bucket list or window count reuses every entry
        that is still right.
        """
        frame_buckets = (1,) if still else self.spec.buckets
        for size, frames in ((size, frames) for size in self._latent_salts for frames in frame_buckets):
            path = self.latent_path(content_digest, frames, size)
            if not path.is_file() or self._damaged(content_digest, path):
                continue
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            if problem := _metadata_problem(meta):  # the checksum covers the tensors, not the header
                logger.warning("cache entry %s: %s; making it again", path, problem)
                path.unlink(missing_ok=True)
                self.repaired.setdefault(content_digest, []).append(f"damaged cache entry made again: {problem}")
                continue
            available = int(meta["available"])
            if max(b for b in frame_buckets if b <= available) != frames or not self._nearest(meta, size):
                continue
            offsets = window_offsets(available, frames, self.spec.windows)
            paths = tuple(self.latent_path(content_digest, frames, size, o) for o in offsets)
            # the first window is `path`, checked above
            if all(p == path or (p.is_file() and not self._damaged(content_digest, p)) for p in paths):
                return paths, offsets, meta, frames, size
        return None

    def _nearest(self, meta: dict, size: tuple[int, int]) -> bool:
        """Whether `size` is still the bucket for the clip an entry was made from (one size: always)."""
        if len(self._latent_salts) == 1:
            return True
        if "source_size" not in meta:  # written before resolution buckets: encode it again
            return False
        return self.spec.bucket_for(*map(int, meta["source_size"].split("x"))) == size

    def _damaged(self, content_digest: str, path: Path) -> bool:
        """Check an entry (a flipped byte, a truncated write); a damaged one is removed and noted for the clip."""
        problem = _repair(path)
        if problem is not None:
            self.repaired.setdefault(content_digest, []).append(f"damaged cache entry made again: {problem}")
        return problem is not None

    def encode_latents(self, todo: list[tuple[Clip, str]], rows: dict[str, dict],
                       show_progress: bool) -> list[Kept]:
        """Decode (in worker processes) and VAE-encode `todo` = [(clip, content digest)]; returns what was written."""
        if not todo:
            return []
        started = time.perf_counter()
        model = self.config.model
        vae = load_vae(model.path, self.variant, self.dtype, model.revision).to(self.device).eval()
        if self.config.data.vae_tiling:
            vae.enable_tiling()
        if compile_vae_enabled(self.config.data.compile_vae, self.device, len(todo)):
            logger.info("compiling the VAE encoder for %d clips (a one-time wait)", len(todo))
            vae.encoder = torch.compile(vae.encoder)
        self.seconds["load_vae"] += time.perf_counter() - started
        written = []
        bar = tqdm(total=len(todo), desc="prepare: encode clips", unit="clip", disable=not show_progress)
        results = isolated_map(partial(decode_with_mask, spec=self.spec),
                               [(str(c.video), self._given_control(c), c.mask and str(c.mask)) for c, _ in todo],
                               _crashed,
                               workers=self.config.data.decode_workers)
        waited = time.perf_counter()
        for index, paired in results:
            decoded = paired.clip
            self.seconds["decode_wait"] += time.perf_counter() - waited
            self.seconds["decode_in_workers"] += decoded.probe.seconds
            clip, digest = todo[index]
            row = rows[clip.line]
            if decoded.probe.info is not None:
                row["source"] = decoded.probe.source()
            problem, given = decoded.problem, None
            if problem is None and isinstance(paired.control, Problem):
                problem = paired.control
            if problem is None and isinstance(paired.mask, Problem):
                problem = paired.mask
            if problem is None:
                given = self.given_image(clip, len(decoded.probe.selection.offsets), decoded.probe.size)
                problem = given if isinstance(given, Problem) else None
            if problem is not None:
                row.update(status="skipped", problem=problem.code, reason=problem.detail)
            else:
                encode_started = time.perf_counter()
                count, size = int(decoded.frames.shape[0]), decoded.probe.size
                selection, info = decoded.probe.selection, decoded.probe.info
                image, image_notes = given
                clip_notes = [*decoded.notes, *image_notes]
                targets = tuple(self.latent_path(digest, count, size, o) for o in selection.offsets)
                conditions = {"image": image} if self.takes_image else {}
                for window, (frames, offset, target) in enumerate(zip(decoded.windows, selection.offsets, targets)):
                    if self.takes_control:
                        conditions["control"] = (paired.control[window] if paired.control is not None
                                                 else extract_control(frames, self.config.data, self.device))
                    # the window's own seed for draws made at encoding (an image's pixel noise)
                    seed = int(_digest(digest, offset, "image noise")[:15], 16)
                    entry = self.variant.encode_sample(vae, frames, conditions, seed, self.config, self.device,
                                                       self.dtype)
                    if paired.mask is not None:
                        entry[LOSS_MASK] = mask_latents(self.variant, paired.mask[window], count)
                    save_atomic(
                        entry,
                        target,
                        {"video": printable(clip.video), "frames": str(count), "available": str(selection.available),
                         "offset": str(offset), "size": _size_text(size),
                         "source_size": _size_text((info.height, info.width)), "notes": json.dumps(clip_notes),
                         "source": json.dumps(row.get("source", {}))},
                    )
                self.seconds["vae_encode"] += time.perf_counter() - encode_started
                notes = [*self.repaired.pop(digest, []), *clip_notes, *windows_note(count, selection.offsets)]
                row.update(status="encoded", frames=count, size=_size_text(size), windows=len(targets), notes=notes)
                written.append(Kept(clip, targets, count, size, digest))
            bar.update(1)
            waited = time.perf_counter()
        bar.close()
        del vae
        return written

    def given_image(self, clip: Clip, windows: int,
                    size: tuple[int, int]) -> tuple[np.ndarray | None, list[str]] | Problem:
        """The clip's conditioning image at its bucket's size (None: each window's first frame), with notes."""
        if not self.takes_image or clip.image is None:
            return None, []
        read = read_image(clip.image, self.spec.at(size))
        if isinstance(read, Problem):
            return read
        image, notes = read
        if windows > 1:
            notes.append(f"the given conditioning image {clip.image.name} conditions all {windows} windows")
        return image, notes

    def _given_control(self, clip: Clip) -> str | None:
        """The control video read beside a clip: its listed one, unless the model takes none or an extractor makes
        it."""
        if not self.takes_control or self.config.data.control is not None or clip.control is None:
            return None
        return str(clip.control)

    def clip_key(self, clip: Clip) -> str | Problem:
        """What a clip's entries are keyed by: its bytes, and those of its given conditioning image, control video or
        loss mask if any (with how images and masks are read, so one read differently now is encoded again)."""
        digest = file_digest(clip.video)
        if is_still(clip.video):
            digest = _digest(digest, IMAGE_READING)
        if self.takes_control:
            if problem := control_problem(clip.control, self.config.data):
                return problem
            if (control := self._given_control(clip)) is not None:
                digest = _digest(digest, file_digest(Path(control)), "control")
        if clip.mask is not None:
            if problem := mask_problem(clip.mask):
                return problem
            digest = _digest(digest, file_digest(clip.mask), "mask", MASK_READING)
        if not self.takes_image or clip.image is None:
            return digest
        return image_problem(clip.image) or _digest(digest, file_digest(clip.image), IMAGE_READING)

    def caption_tokens(self, captions: list[str]) -> dict[str, int]:
        if not captions:
            return {}
        started = time.perf_counter()
        tokens = count_tokens(load_tokenizer(self.config.model.path, self.config.model.revision), captions)
        self.seconds["tokenize"] += time.perf_counter() - started
        return tokens

    def encode_prompts(self, texts: list[str], show_progress: bool) -> None:
        todo = sorted({t for t in texts if not self.prompt_path(t).is_file() or _repair(self.prompt_path(t))})
        if not todo:
            return
        started = time.perf_counter()
        model = self.config.model
        pipe = load_pipeline(model.path, self.variant, self.dtype, model.revision, transformer=None, vae=None,
                             text_encoder=load_text_encoder(model.path, self.variant, self.dtype, self.device,
                                                            model.revision))
        # the pipeline logs each truncated caption's cut-off tail, padding tokens and all, which no one can act on;
        # the report notes every truncation with its token count instead (`truncation_note`)
        pipeline_log = logging.getLogger(type(pipe).__module__)
        level = pipeline_log.level
        pipeline_log.setLevel(logging.ERROR)
        try:
            self._embed(pipe, todo, show_progress)
        finally:
            pipeline_log.setLevel(level)
        del pipe
        self.seconds["text_encode"] += time.perf_counter() - started

    def _embed(self, pipe, todo: list[str], show_progress: bool) -> None:
        for start in tqdm(range(0, len(todo), PROMPT_BATCH), desc="prepare: embed prompts", disable=not show_progress):
            batch = todo[start : start + PROMPT_BATCH]
            embeds = self.variant.embed_prompts(pipe, batch, self.device, self.dtype)
            for text, embed in zip(batch, embeds):
                save_atomic({"prompt_embeds": embed}, self.prompt_path(text), {"caption": text[:1000]})


def _check_listed(clips: list[Clip], rank: int, world_size: int, preparer: Preparer, rows: dict[str, dict]):
    """This rank's share: rows for every clip, the cached entries found, and what must be encoded."""
    # the whole list: copies on other ranks count too
    admission = admission_problems(clips, byte_duplicates(clips), preparer.variant.single_frame_problem())
    cached: list[Kept] = []
    todo: list[tuple[Clip, str]] = []
    masked = any(clip.mask for clip in clips)
    for clip in clips[rank::world_size]:
        row = rows.setdefault(clip.line, {"clip": str(clip.video), "listed_at": clip.line})
        if preparer.takes_image:
            row["image"] = clip.image_source
        if preparer.takes_control:
            row["control"] = (f"data.control={config_control}" if (config_control := preparer.config.data.control)
                              else str(clip.control) if clip.control else None)
        if masked:
            row["mask"] = str(clip.mask) if clip.mask else None
        if admission[clip.line]:
            problem = admission[clip.line][0]
            row.update(status="skipped", problem=problem.code, reason=problem.detail)
            continue
        digest = preparer.clip_key(clip)
        if isinstance(digest, Problem):
            row.update(status="skipped", problem=digest.code, reason=digest.detail)
            continue
        hit = preparer.find_cached(digest, is_still(clip.video))
        if hit is None:
            todo.append((clip, digest))
            continue
        paths, offsets, meta, frames, size = hit
        row.update(status="cached", frames=frames, size=_size_text(size), windows=len(paths),
                   notes=[*json.loads(meta.get("notes", "[]")), *windows_note(frames, offsets)])
        if meta.get("source"):
            row["source"] = json.loads(meta["source"])
        cached.append(Kept(clip, paths, frames, size, digest))
    return cached, todo


def _summary(rows: list[dict], rank: int, world_size: int, seconds: float, stages: Counter) -> dict:
    statuses = Counter(r["status"] for r in rows)
    kept = [r for r in rows if r["status"] != "skipped"]
    return {
        "rank": rank,
        "world_size": world_size,
        "clips": len(rows),
        "kept": len(kept),
        "encoded": statuses["encoded"],
        "cached": statuses["cached"],
        "skipped": statuses["skipped"],
        "skipped_by_reason": summarize_problems(rows),
        "buckets": {str(f): n for f, n in sorted(Counter(r["frames"] for r in kept).items(), reverse=True)},
        "sizes": dict(Counter(r["size"] for r in kept).most_common()),
        "images": sum(r["frames"] == 1 and is_still(r["clip"]) for r in kept),
        "masks": sum(bool(r.get("mask")) for r in kept),
        "captions_truncated": sum(any(n.startswith("caption truncated") for n in r.get("notes", [])) for r in kept),
        "seconds": round(seconds, 3),
        "seconds_by_stage": {k: round(v, 3) for k, v in sorted(stages.items())},
        "encoded_per_s": round(statuses["encoded"] / seconds, 3) if seconds > 0 else None,
        "host_peak_gib": host_peak_gib(),  # the process's so far: the text encoder and VAE on their way to the GPU
    }


def write_report(rows: list[dict], run_dir: str | Path) -> Path:
    """The per-file report, one JSON object per line, in the run directory."""
    path = Path(run_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare(
    config: Config, variant: Variant, device: torch.device, rank: int = 0, world_size: int = 1,
    show_progress: bool = True,
) -> PreparedData:
    """Fill the cache for this rank's share of the clips and return the entries of that share.

    Shares are disjoint (clip i goes to rank i % world_size), so no clip is encoded twice; the
    caller gathers the shares. Validation prompts and the empty prompt are embedded on rank 0.
    Every listed clip of the share gets a report row; the last row is this rank's summary.
    Each of `data.sets` is prepared as a run with it alone would prepare it (its buckets, its caption prefix);
    every set's list is read, and a set without clips refused by key, before anything is encoded.
    """
    sets = data_sets(config.data)
    listed = [read_set(data_set) for data_set in sets]
    for data_set, clips in zip(sets, listed):
        check_masks(variant, clips, f"{data_set.key}.path", config.data.mask_column)
        check_trigger(data_set, clips)
    bleed = bleed_texts(config, listed)
    if len(sets) == 1:
        return _prepare_set(config, variant, device, rank, world_size, show_progress, sets[0], listed[0],
                            validation_texts(config), bleed)
    parts = [_prepare_set(config.model_copy(update={"data": data_set.data}), variant, device, rank, world_size,
                          show_progress, data_set, clips, validation_texts(config) if data_set is sets[-1] else None,
                          bleed)
             for data_set, clips in zip(sets, listed)]
    summaries = [part.summary for part in parts]
    summary = {**_summary([row for part in parts for row in part.report if "summary" not in row], rank, world_size,
                          sum(s["seconds"] for s in summaries), sum((Counter(s["seconds_by_stage"]) for s in summaries),
                                                                    Counter())),
               "sets": {data_set.key: {"path": data_set.data.path, "kind": "prior" if data_set.prior else "clips",
                                       **{k: s[k] for k in ("clips", "kept", "encoded", "cached", "skipped")}}
                        for data_set, s in zip(sets, summaries)}}
    last = parts[-1]
    return PreparedData(entries=[e for part in parts for e in part.entries],
                        validation_prompts=last.validation_prompts, negative_prompt=last.negative_prompt,
                        report=[*(row for part in parts for row in part.report if "summary" not in row),
                                {"summary": summary}], bleed_prompts=last.bleed_prompts)


def _prepare_set(config: Config, variant: Variant, device: torch.device, rank: int, world_size: int,
                 show_progress: bool, data_set: DataSet, clips: list[Clip],
                 validation: list[str] | None, bleed: list[tuple[str, str]] = ()) -> PreparedData:
    """`prepare` of one set (`config.data` is the set's); `validation`: the validation prompts to embed with the
    empty prompt (the last set's turn; None: not this set's), and with them `bleed`'s prompts with and without their
    trigger. With `eval.holdout`, each clip's caption is embedded without its trigger too (any clip may be held out;
    a prior set's never is)."""
    started = time.perf_counter()
    preparer = Preparer(config, variant, device)
    remove_orphaned_tmp(preparer.root)
    rows: dict[str, dict] = {}
    if not preparer.takes_image and any(clip.image for clip in clips):
        logger.warning("%d clips name a conditioning image; %s is text-to-video, so the images are not used",
                       sum(1 for clip in clips if clip.image), variant.name)
    if any(clip.control for clip in clips) and (not preparer.takes_control or config.data.control is not None):
        why = (f"data.control={config.data.control} makes each clip's control" if preparer.takes_control
               else f"{variant.name} takes no control video (model.control: true makes a control model)")
        logger.warning("%d clips name a control video; %s, so they are not used", sum(1 for c in clips if c.control),
                       why)
    cached, todo = _check_listed(clips, rank, world_size, preparer, rows)
    kept = cached + preparer.encode_latents(todo, rows, show_progress)

    tokens = preparer.caption_tokens([k.clip.caption for k in kept])
    limit = variant.max_text_seq_length
    for clip in (k.clip for k in kept):
        row = rows[clip.line]
        row["caption_tokens"] = tokens[clip.caption]
        if note := truncation_note(tokens[clip.caption], limit):
            row["notes"].append(note)
    bleed = bleed if validation is not None else []
    extra = [*validation, "", *(t for pair in bleed for t in pair)] if rank == 0 and validation is not None else []
    validation = validation or []  # "": guidance's negative prompt, and caption dropout's
    untriggered = [without_triggers(k.clip.caption, clip_triggers(k.clip, config.data))
                   if config.eval.holdout and not data_set.prior else k.clip.caption for k in kept]
    preparer.encode_prompts([k.clip.caption for k in kept] + untriggered + extra, show_progress)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    entries = [CacheEntry(tuple(str(p) for p in k.paths), str(preparer.prompt_path(k.clip.caption)), str(k.clip.video),
                          k.clip.caption, k.frames, *k.size, k.digest, data_set.index, data_set.prior, k.clip.line,
                          str(preparer.prompt_path(bare)) if bare != k.clip.caption else "")
               for k, bare in zip(kept, untriggered)]
    report = list(rows.values())
    if data_set.key != "data":
        for row in report:
            row["set"] = data_set.key
    for row in report:
        if row["status"] == "skipped":
            logger.warning("skipped %s (%s): %s", row["clip"], row["listed_at"], row["reason"])
    summary = _summary(report, rank, world_size, time.perf_counter() - started, preparer.seconds)
    logger.info(
        "prepare (rank %d/%d): %d clips kept (%d encoded now, %d cached; %d still images), %d skipped %s, buckets "
        "(frames: clips) %s, sizes %s, %.1f s, host memory peak %s GiB", rank, world_size, summary["kept"],
        summary["encoded"], summary["cached"], summary["images"], summary["skipped"], summary["skipped_by_reason"],
        summary["buckets"], summary["sizes"], summary["seconds"], summary["host_peak_gib"],
    )
    return PreparedData(
        entries=entries,
        validation_prompts=[(p, str(preparer.prompt_path(p))) for p in validation],
        negative_prompt=str(preparer.prompt_path("")),
        report=[*report, {"summary": summary}],
        bleed_prompts=[(str(preparer.prompt_path(triggered)), str(preparer.prompt_path(bare)))
                       for triggered, bare in bleed],
    )
