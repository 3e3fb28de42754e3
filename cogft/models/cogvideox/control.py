"""Control-video CogVideoX: the transformer reads a control video's latents beside the noisy latents (twice the
latent channels, the control after the video on the channel axis), as the stock `CogVideoXFunControlPipeline`
lays them out.

Two ways in. A CogVideoX-Fun Control pipeline folder, whose transformer already takes both. Or a stock
text-to-video model widened by `model.control: true` (`TextToVideoSpec.with_control`): its patch embedding gets
input channels for the control whose weights start at zero, so step 0 predicts exactly what the base model
predicts, and the embedding trains whole beside the LoRA. Either way the pipeline is the Fun Control one, with
`CogVideoXDDIMScheduler`: that pipeline calls `scheduler.step` as DDIM does, which the 2B's
`CogVideoXDPMScheduler` does not take (its first step fails); both share the training schedule's
`alphas_cumprod`, so the objective is unchanged.

The control latents are what the pipeline computes from the control video at inference: the VAE latent
distribution's mode × the scaling factor, at the video's frames, never noised or dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...config import Config, ConfigError
from ..family import DATA_SIZE_KEYS, PipelineConfigs, TrainingDraws
from .objective import frames_first
from .spec import CogVideoXSpec, CogVideoXVariant, frame_count_problem

CONTROL_PIPELINE = "CogVideoXFunControlPipeline"
CONTROL_SCHEDULER = "CogVideoXDDIMScheduler"
# the module trained whole beside the adapter when a text-to-video model is widened (its new input channels)
WIDENED_MODULE = "patch_embed.proj"


@dataclass(frozen=True)
class ControlSpec(CogVideoXSpec):
    """A video from a prompt and a control video (pose, depth, edges...). `widened`: made from a text-to-video spec
    by `model.control` (its folder holds the narrower patch embedding, widened when the model loads)."""

    widened: bool = False
    pipeline_class: str = CONTROL_PIPELINE
    scheduler_class: str = CONTROL_SCHEDULER

    def conditioning_matches(self, transformer: dict, latent_channels: int | None) -> bool:
        return (latent_channels is not None and transformer.get("in_channels") == 2 * latent_channels
                and not transformer.get("use_learned_positional_embeddings", False)
                and transformer.get("ofs_embed_dim") is None)

    @property
    def variant_class(self) -> type[ControlVariant]:
        return ControlVariant

    def with_control(self, configs: PipelineConfigs):
        raise ConfigError(f"model.control: {self.name} already takes a control video; leave model.control out")


@dataclass(frozen=True)
class TextToVideoSpec(CogVideoXSpec):
    """The text-to-video models (2B, 5B, 1.5-5B): the ones `model.control` widens into control models (here, beside
    the control spec it makes, so the base spec needs no import of this module)."""

    def with_control(self, configs: PipelineConfigs) -> tuple[ControlSpec, PipelineConfigs]:
        return widened_spec(self, configs)


def widened_spec(spec: CogVideoXSpec, configs: PipelineConfigs) -> tuple[ControlSpec, PipelineConfigs]:
    """`spec` and its pipeline's `configs` as the control model `model.control: true` makes of them: the same
    geometry and precision, twice the transformer's input channels, the control pipeline and its scheduler."""
    kept = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    control = ControlSpec(**{**kept, "name": f"{spec.name}-control", "pipeline_class": CONTROL_PIPELINE,
                             "scheduler_class": CONTROL_SCHEDULER, "widened": True,
                             "reference": widened_configs(spec.reference), "tiny": widened_configs(spec.tiny)})
    return control, widened_configs(configs)


def widened_configs(configs: PipelineConfigs) -> PipelineConfigs:
    """A text-to-video pipeline's configs with the control's input channels, pipeline and scheduler."""
    return dataclasses.replace(
        configs,
        model_index={**configs.model_index, "_class_name": CONTROL_PIPELINE},
        transformer={**configs.transformer, "in_channels": 2 * int(configs.vae["latent_channels"])},
        scheduler={**configs.scheduler, "_class_name": CONTROL_SCHEDULER},
    )


def widen_patch_embedding(transformer: torch.nn.Module, channels: int) -> None:
    """Give the patch embedding `channels` more input channels after its own, with zero weights: the same output for
    any control input until they train. The projection's input is laid out channel-major (Conv2d [out, C, p, p];
    CogVideoX 1.5's Linear flattens (C, p_t, p, p)), so the new inputs are a block after the old ones."""
    embed = transformer.patch_embed
    old = embed.proj
    if isinstance(old, torch.nn.Conv2d):
        new = torch.nn.Conv2d(old.in_channels + channels, old.out_channels, old.kernel_size, old.stride,
                              bias=old.bias is not None)
        per_channel = 1
    else:
        per_channel = old.in_features // transformer.config.in_channels
        new = torch.nn.Linear(old.in_features + channels * per_channel, old.out_features, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.weight.shape[1]] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    embed.proj = new
    transformer.register_to_config(in_channels=transformer.config.in_channels + channels)


@dataclass(frozen=True)
class ControlVariant(CogVideoXVariant):
    """Prepare caches the control video's latent distribution mode beside the clip's (control_latents [C, F', h, w]);
    each step puts it, scaled, after the noisy latents on channels."""

    spec: ControlSpec

    @property
    def conditions(self) -> tuple[str, ...]:
        return ("control",)

    @property
    def trained_with_adapter(self) -> tuple[str, ...]:
        return (WIDENED_MODULE,) if self.spec.widened else ()

    def prepare_loaded(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """A widened model's transformer, loaded from its text-to-video folder, gets its control inputs."""
        if self.spec.widened and transformer.config.in_channels == self.latent_channels:
            widen_patch_embedding(transformer, self.latent_channels)
        return transformer

    def single_frame_problem(self) -> str | None:
        return f"{self.name} trains on clips beside their control videos, not on still images"

    # frames: CogVideoX 1.5's control pipeline takes only an even number of latent frames (it pads none) --------
    def _even_latents(self) -> bool:
        return self.patch_size_t > 1

    def frame_buckets(self, num_frames: int, min_frames: int) -> tuple[int, ...]:
        if not self._even_latents():
            return super().frame_buckets(num_frames, min_frames)
        below = [f for f in range(num_frames - 1, min_frames - 1, -1) if f % 8 == 5]
        if min_frames < num_frames and min_frames not in below:
            below.append(min_frames)
        return (num_frames, *below)

    def check_clip_size(self, num_frames: int, height: int, width: int, shortest_bucket: int | None = None,
                        names: tuple[str, str, str, str] = DATA_SIZE_KEYS) -> None:
        super().check_clip_size(num_frames, height, width, shortest_bucket, names)
        if not self._even_latents():
            return
        for key, value in ((names[0], num_frames), (names[3], shortest_bucket)):
            if value is not None and not frame_count_problem(value) and self.latent_frames(value) % 2:
                raise ConfigError(
                    f"{key}={value}: {self.name} takes an even number of latent frames (the stock "
                    f"{CONTROL_PIPELINE} pads none for patch_size_t=2): 8k+5 frames; try {value - 4} or {value + 4}")

    def check_validation_conditions(self, prompts: list[str], images: list[str], controls: list[str]) -> None:
        super().check_validation_conditions(prompts, images, [])
        if prompts and len(controls) != len(prompts):
            raise ConfigError(f"validation.controls: {self.name} makes a video from a prompt and a control video; give "
                              f"one control video per validation prompt ({len(prompts)} prompts, {len(controls)} "
                              "controls), or set validation.prompts=[]")
        self._check_files("validation.controls", controls, "a video file")

    # prepare ------------------------------------------------------------------------------------------
    def encode_sample(self, vae, frames: np.ndarray, conditions: dict[str, np.ndarray | None], seed: int,
                      config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The clip's latents and its control video's (the window's control frames, uint8 [F, H, W, 3])."""
        control = conditions.get("control")
        if control is None or control.shape != frames.shape:
            got = "none" if control is None else f"{control.shape}"
            raise ValueError(f"{self.name}: each window needs control frames shaped like its {frames.shape}; got {got}")
        entry = super().encode_sample(vae, frames, conditions, seed, config, device, dtype)
        pixels = torch.from_numpy(control).to(device).permute(3, 0, 1, 2).unsqueeze(0).to(dtype) / 127.5 - 1.0
        with torch.no_grad():
            entry["control_latents"] = vae.encode(pixels).latent_dist.mode()[0]
        return entry

    # training -----------------------------------------------------------------------------------------
    def _control(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"control_latents": frames_first(batch["control_latents"].float() * self.scaling_factor,
                                                self.patch_size_t)}

    def draw_conditions(self, batch: dict[str, torch.Tensor], draws: TrainingDraws,
                        frames: int) -> dict[str, torch.Tensor]:
        return self._control(batch)

    def fixed_conditions(self, batch: dict[str, torch.Tensor], frames: int) -> dict[str, torch.Tensor]:
        return self._control(batch)

    def neutral_conditions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"control_latents": torch.zeros_like(x)}

    @property
    def latents_beside(self) -> str:
        return "control_latents"

    def synthetic_batch(self, config: Config, batch_size: int, num_frames: int, height: int, width: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Also the control latents, shaped like the clip's."""
        batch = super().synthetic_batch(config, batch_size, num_frames, height, width, generator)
        mean = batch["latent_mean"]
        batch["control_latents"] = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=self.dtype)
        return batch

    # sampling -----------------------------------------------------------------------------------------
    def pipeline_inputs(self, *, prompt: str | None, prompt_embeds: torch.Tensor | None,
                        negative_prompt_embeds: torch.Tensor | None, image=None, control=None) -> dict[str, Any]:
        if control is None:
            raise ValueError(f"{self.name} makes a video from a control video: give one")
        return {**super().pipeline_inputs(prompt=prompt, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds), "control_video": control}

    def render_latents(self, pipe, conditioning: dict[str, Any], *, num_frames: int, height: int, width: int,
                       steps: int, guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
        """The control video's length is the video's (the pipeline takes no frame count)."""
        if len(conditioning["control_video"]) != num_frames:
            raise ValueError(f"{len(conditioning['control_video'])} control frames for a {num_frames}-frame video")
        return pipe(**conditioning, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generator, output_type="latent",
                    max_sequence_length=self.max_text_seq_length).frames
