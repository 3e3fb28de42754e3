"""Prepare: clips + captions → cached VAE latent distributions and T5 prompt embeddings.

Run once per dataset and model; training then needs neither the T5 encoder nor the VAE encoder.
Entries are keyed by content (the clip's bytes, every preprocessing parameter, the encoder's
identity), so a changed clip or setting re-encodes only what changed, a renamed clip does not, and
one cache serves many runs. Each entry is written to a temporary name and renamed, so an interrupted
prepare leaves no half entry and a rerun encodes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import Config
from ..models.loading import load_pipeline, load_vae, resolve_model_path
from .sources import Clip, read_clips
from .video import DecodeSpec, decode_pool, is_readable

logger = logging.getLogger(__name__)
PROMPT_BATCH = 16


@dataclass(frozen=True)
class CacheEntry:
    latents: str   # safetensors with latent_mean, latent_logvar [C, F, h, w]
    prompt: str    # safetensors with prompt_embeds [L, D]
    video: str
    caption: str


@dataclass
class PreparedData:
    entries: list[CacheEntry]
    validation_prompts: list[tuple[str, str]]  # (prompt, embedding file)
    negative_prompt: str                       # embedding file of "" for classifier-free guidance
    report: list[dict] = field(default_factory=list)


def cache_root(config: Config) -> Path:
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return Path(os.environ.get("COGFT_HOME", Path.home() / ".cache" / "cogft")) / "cache"


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def component_identity(model_path: str, component: str, revision: str | None) -> dict:
    """What makes an encoder's output unique: its config plus its weight files' sizes and times."""
    folder = Path(model_path) / component
    identity: dict = {"path": model_path, "revision": revision, "component": component}
    if folder.is_dir():
        identity["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
        )
    return identity


def encode_dtype(family_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Encoders run in the family's dtype on accelerators; CPUs get fp32 (half convolutions are slow there)."""
    return torch.float32 if device.type == "cpu" else family_dtype


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class Preparer:
    """Holds the keys and lazily loaded encoders for one config on one device."""

    def __init__(self, config: Config, family, device: torch.device):
        self.config = config
        self.family = family
        self.device = device
        self.dtype = encode_dtype(family.dtype, device)
        self.model_path = resolve_model_path(config.model.path)
        self.root = cache_root(config)
        self.spec = DecodeSpec(config.data.num_frames, config.data.height, config.data.width, config.data.fps)
        rev = config.model.revision
        self._latent_salt = _digest(asdict(self.spec), component_identity(self.model_path, "vae", rev), str(self.dtype))
        self._prompt_salt = _digest(
            component_identity(self.model_path, "text_encoder", rev),
            component_identity(self.model_path, "tokenizer", rev),
            family.max_text_seq_length,
            str(self.dtype),
        )

    def latent_path(self, content_digest: str) -> Path:
        key = _digest(content_digest, self._latent_salt)
        return self.root / "latents" / key[:2] / f"{key}.safetensors"

    def prompt_path(self, text: str) -> Path:
        key = _digest(text, self._prompt_salt)
        return self.root / "prompts" / key[:2] / f"{key}.safetensors"

    def encode_latents(self, todo: list[tuple[Clip, Path]], report: dict[str, dict], show_progress: bool) -> None:
        if not todo:
            return
        vae = load_vae(self.config.model.path, self.dtype, self.config.model.revision).to(self.device).eval()
        if self.config.data.vae_tiling:
            vae.enable_tiling()
        bar = tqdm(total=len(todo), desc="prepare: encode clips", unit="clip", disable=not show_progress)
        results = decode_pool([str(c.video) for c, _ in todo], self.spec, workers=min(2, os.cpu_count() or 1))
        for index, decoded in results:
            clip, target = todo[index]
            entry = report[clip.line]
            if decoded.frames is None:
                entry.update(status="skipped", reason=decoded.error)
            else:
                frames = torch.from_numpy(decoded.frames).to(self.device)
                pixels = (frames.permute(3, 0, 1, 2).unsqueeze(0).to(self.dtype) / 127.5) - 1.0  # [1,3,F,H,W]
                with torch.no_grad():
                    dist = vae.encode(pixels).latent_dist
                save_atomic(
                    {"latent_mean": dist.mean[0], "latent_logvar": dist.logvar[0]},
                    target,
                    {"video": str(clip.video), "frames": str(self.spec.num_frames)},
                )
                entry.update(status="encoded", notes=list(decoded.notes))
            bar.update(1)
        bar.close()
        del vae

    def encode_prompts(self, texts: list[str], show_progress: bool) -> None:
        todo = sorted({t for t in texts if not self.prompt_path(t).exists()})
        if not todo:
            return
        pipe = load_pipeline(self.config.model.path, self.dtype, self.config.model.revision, transformer=None, vae=None)
        pipe.text_encoder.to(self.device)
        tokenizer = pipe.tokenizer
        limit = self.family.max_text_seq_length
        for text in todo:
            length = len(tokenizer(text).input_ids)
            if length > limit:
                logger.warning("caption truncated to %d tokens (has %d): %.80s", limit, length, text)
        for start in tqdm(range(0, len(todo), PROMPT_BATCH), desc="prepare: embed prompts", disable=not show_progress):
            batch = todo[start : start + PROMPT_BATCH]
            with torch.no_grad():
                embeds, _ = pipe.encode_prompt(
                    batch, do_classifier_free_guidance=False, max_sequence_length=limit,
                    device=self.device, dtype=self.dtype,
                )
            for text, embed in zip(batch, embeds):
                save_atomic({"prompt_embeds": embed}, self.prompt_path(text), {"caption": text[:1000]})
        del pipe


def prepare(
    config: Config, family, device: torch.device, rank: int = 0, world_size: int = 1, show_progress: bool = True
) -> PreparedData:
    """Fill the cache for this rank's share of the clips and return the entries of that share.

    Shares are disjoint (clip i goes to rank i % world_size), so no clip is encoded twice; the
    caller gathers the shares. Validation prompts and the empty prompt are embedded on rank 0.
    """
    started = time.perf_counter()
    preparer = Preparer(config, family, device)
    clips = read_clips(config.data.path, config.data.video_column, config.data.caption_column)
    mine = clips[rank::world_size]
    report: dict[str, dict] = {}
    todo: list[tuple[Clip, Path]] = []
    kept: list[tuple[Clip, Path]] = []
    for clip in mine:
        entry = report.setdefault(clip.line, {"clip": str(clip.video), "listed_at": clip.line})
        problem = is_readable(clip.video)
        if problem is None and not clip.caption:
            problem = "missing or empty caption"
        if problem:
            entry.update(status="skipped", reason=problem)
            continue
        target = preparer.latent_path(file_digest(clip.video))
        kept.append((clip, target))
        if target.exists():
            entry.update(status="cached")
        else:
            todo.append((clip, target))
    preparer.encode_latents(todo, report, show_progress)
    kept = [(c, t) for c, t in kept if report[c.line]["status"] != "skipped"]

    extra = [*config.validation.prompts, ""] if rank == 0 else []
    preparer.encode_prompts([c.caption for c, _ in kept] + extra, show_progress)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    entries = [CacheEntry(str(t), str(preparer.prompt_path(c.caption)), str(c.video), c.caption) for c, t in kept]
    for entry in report.values():
        if entry["status"] == "skipped":
            logger.warning("skipped %s (%s): %s", entry["clip"], entry["listed_at"], entry["reason"])
    statuses = [e["status"] for e in report.values()]
    logger.info(
        "prepare (rank %d/%d): %d clips kept (%d encoded now, %d cached), %d skipped, %.1f s",
        rank, world_size, len(entries), statuses.count("encoded"), statuses.count("cached"),
        statuses.count("skipped"), time.perf_counter() - started,
    )
    return PreparedData(
        entries=entries,
        validation_prompts=[(p, str(preparer.prompt_path(p))) for p in config.validation.prompts],
        negative_prompt=str(preparer.prompt_path("")),
        report=list(report.values()),
    )
