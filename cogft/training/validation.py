"""The validation hook: videos of the configured prompts from the transformer being trained.

It renders through the variant's stock pipeline around the in-memory transformer (no reload) with the
prompt embeddings prepare cached, so it needs only the VAE decoder beside it. A LoRA run's motion guard (motion.py)
also renders each prompt with the adapter off, once per run, and measures every video's motion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..config import Config
from ..data.control import read_control
from ..data.images import conditioning_image
from ..inference.render import render, write_mp4
from ..models.family import Variant
from ..models.loading import load_scheduler, load_vae
from ..models.modes import adapter_disabled, evaluating
from ..models.trained_modules import trained_whole
from ..run_dir import SAMPLES_DIR, base_sample_path, sample_path
from .motion import MotionGuard, measures_motion, motion, render_key
from .topology import Topology

logger = logging.getLogger(__name__)


class ValidationHook:
    """Samples the configured prompts with the in-memory transformer every `validation.every` steps.

    The prompts are spread over the processes (prompt i on data rank i % data_parallel_size: `Topology.share`), each
    writing its own videos, so a validation takes the time of its share, not of all of it, while the other ranks
    wait in a collective. With weights sharded over the processes (`shared_forward`: ZeRO-3, FSDP) every process takes
    part in every video's forward passes and the main one writes them. Each prompt keeps its seed
    (validation.seed + its index), so a video does not depend on the number of processes.
    """

    def __init__(self, config: Config, variant: Variant, device: torch.device,
                 prompts: list[tuple[str, str]], negative_file: str, run_dir: Path, topology: Topology = Topology(),
                 shared_forward: bool = False):
        self.config, self.variant, self.device, self.run_dir = config, variant, device, run_dir
        self.rank = topology.data_rank
        self.shows_progress = self.rank == 0  # one bar: the main process's share (every share takes about as long)
        self.mine = topology.share(len(prompts), shared_forward)
        self.writes_videos = self.rank == 0 or not shared_forward
        self.prompts = [(text, load_file(path)["prompt_embeds"]) for text, path in prompts]
        # each prompt's size (validation.sizes, else the largest bucket) and, for image-to-video, its image at that size
        self.sizes = [config.validation_size(i) for i in range(len(self.prompts))]
        self.images = [conditioning_image(image, *self.sizes[i], config.data.resize, f"validation.images[{i}]")
                       for i, image in enumerate(config.validation.images)] or [None] * len(self.prompts)
        # control models: each prompt's control video at its size and the training frame count (extracted as clips are)
        self.controls = [read_control(control, config.data.num_frames, *self.sizes[i], config.data,
                                      f"validation.controls[{i}]", device)
                         for i, control in enumerate(config.validation.controls)] or [None] * len(self.prompts)
        self.negative = load_file(negative_file)["prompt_embeds"]
        self.embedding_files = [path for _, path in prompts], negative_file  # (prompts, "") for the export check
        self.first_frames = None  # the first prompt's frames of the last validation asked to keep them
        self._pipe = None
        self.motion = MotionGuard(run_dir, [text for text, _ in self.prompts], [
            render_key(config, i, self.sizes[i], embeds, self.negative, self.images[i], self.controls[i])
            for i, (_, embeds) in enumerate(self.prompts)]) if measures_motion(config) else None

    def _pipeline(self, transformer):
        """The stock pipeline around the transformer being trained; built (and the VAE loaded) once."""
        if self._pipe is None:
            model = self.config.model
            vae = load_vae(model.path, self.variant, self.variant.compute_dtype(self.device),
                           model.revision).to(self.device).eval()
            if self.config.data.vae_tiling:
                vae.enable_tiling()
            scheduler = load_scheduler(model.path, self.variant, model.revision)
            self._pipe = self.variant.assemble_pipeline(transformer, vae, scheduler)
        return self._pipe

    def _render(self, pipe, index: int, embeds: torch.Tensor, bar: tqdm):
        cfg, (height, width) = self.config.validation, self.sizes[index]
        return render(
            pipe, self.variant, self.device, num_frames=self.config.data.num_frames, height=height, width=width,
            steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed + index,
            prompt_embeds=embeds[None].to(self.device), negative_prompt_embeds=self.negative[None].to(self.device),
            image=self.images[index], control=self.controls[index], cache=cfg.cache, on_step=lambda: bar.update(1),
        )

    def _render_or_skip(self, pipe, index: int, bar: tqdm, step: int):
        """Prompt `index`'s frames, or None after an out-of-memory (a validation video is not worth the run)."""
        try:
            return self._render(pipe, index, self.prompts[index][1], bar)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning("validation at step %d: out of GPU memory on prompt %d, skipped; lower the memory use "
                           "(train.memory_budget_gib, data.vae_tiling=true) to get validation videos", step, index)
            return None

    def __call__(self, transformer, step: int, keep_first: bool = False) -> list[tuple[int, str, str]]:
        """Render this process's prompts; returns (prompt index, prompt, mp4 path) of the videos it wrote. With
        `keep_first`, the process rendering the first prompt keeps its frames (`first_frames`), which the mp4's
        lossy encoding would blur, for the export check."""
        if self.motion is not None and trained_whole(transformer):  # the adapter off is not the base model then
            logger.warning("motion guard off: this run trains %s whole beside the LoRA, so switching the adapter off "
                           "does not give the base model to compare the motion with", ", ".join(trained_whole(
                               transformer)))
            self.motion = None
        with evaluating(transformer):
            pipe = self._pipeline(transformer)
            written = []
            steps = self.config.validation.num_inference_steps
            bases = self.motion.missing(self.mine) if self.motion is not None else []
            bar = tqdm(total=(len(self.mine) + len(bases)) * steps, desc=f"validation at step {step}", unit="step",
                       leave=False, disable=not self.shows_progress)
            if bases:  # once per run: the base model's videos, whose motion the LoRA's is measured against
                with adapter_disabled(transformer):
                    for i in bases:
                        frames = self._render_or_skip(pipe, i, bar, step)
                        if frames is not None:
                            self.motion.fresh[i] = motion(frames)
                            if self.writes_videos:
                                write_mp4(frames, base_sample_path(self.run_dir, i, self.prompts[i][0]),
                                          self.config.validation.fps)
            for i in self.mine:
                text = self.prompts[i][0]
                frames = self._render_or_skip(pipe, i, bar, step)
                if frames is None:
                    continue
                if self.motion is not None:
                    self.motion.tuned[i] = motion(frames)
                if keep_first and i == 0:
                    self.first_frames = frames
                if self.writes_videos:
                    path = write_mp4(frames, sample_path(self.run_dir, step, i, text), self.config.validation.fps)
                    written.append((i, text, str(path)))
            bar.close()
        if self.writes_videos:
            logger.info("validation at step %d: process %d wrote %d videos (prompts %s) in %s", step, self.rank,
                        len(written), [i for i, _, _ in written], self.run_dir / SAMPLES_DIR)
        return written
