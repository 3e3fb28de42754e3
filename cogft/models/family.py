"""The contract a model family fulfils; nothing outside `cogft/models/` needs more of a model than this.

A family (CogVideoX in `models/cogvideox/`; a test registers a toy one) is a set of `VariantSpec`s, each told
from a pipeline folder's own configs. A spec bound to one folder's configs and a precision is a `Variant`: the
trainer, prepare, sampling, export, estimate and bench ask it, and never branch on a model's name.

What a `Variant` answers, by stage:
- identity and geometry: the clip sizes it takes, latent frames, tokens, the native clip a config defaults to;
- prepare: what is cached per sample (`encode_sample`: an opaque dict of named tensors, conditions as keys) and
  the prompt embedding (`embed_prompts`); the cache, dataset and sampler carry those keys without reading them;
- training: `draw_inputs` turns a cached batch and the step's seeded draws into `ModelInputs`, `fixed_inputs`
  does it with fixed noise and timesteps (the held-out eval), `probe_inputs` for a given noisy input (the
  export check, bench); `predict` runs one forward and `loss` the objective, for all of them; the objective's
  options (`Objective`: timestep sampling, loss form and weighting) reach the draw through `TrainingDraws` and the
  loss as its argument, in a family that offers them (`objective_options`), and a loss mask rides in `ModelInputs`;
- sampling: the stock pipeline around in-memory parts (`assemble_pipeline`) and its conditioning arguments;
- adapters: the diffusers LoRA format the pipeline class loads (`lora_format`), other tools' key formats
  (`lora_key_formats`);
- blocks and attention: the transformer's `transformer_blocks` (checkpointing, offload, compile) and the
  processor that carries another attention kernel (`attention_processor`).
"""

from __future__ import annotations

import functools
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError
from .objective_options import REFERENCE, Objective

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DATA_SIZE_KEYS = ("data.num_frames", "data.height", "data.width", "data.min_frames")
# the batch key of a per-sample loss weight on the latent grid (values in [0, 1]; each family says its layout): the
# data side caches it with the sample, the family's `draw_inputs` / `fixed_inputs` put it in `ModelInputs.loss_mask`
LOSS_MASK = "loss_mask"


class UnsupportedModelError(ConfigError):
    """A pipeline whose configs match no registered variant; names what was found and what is supported."""


@dataclass(frozen=True)
class PipelineConfigs:
    """A pipeline folder's own configs: model_index.json and the components' config files."""

    model_index: dict
    transformer: dict
    vae: dict
    scheduler: dict
    text_encoder: dict = field(default_factory=dict)  # built-in configs only (tiny and random builds, bench)


@dataclass(frozen=True)
class ClipSize:
    """The clip a variant was trained on: the `data.*` defaults a config gets for it unless it says otherwise."""

    num_frames: int
    height: int
    width: int
    fps: float


@dataclass
class ModelInputs:
    """One batch as the objective sees it: the clean latents, the noise and timesteps, the prompt and the
    family's conditions (named tensors the family's `predict` lays out for its transformer)."""

    x0: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    # a weight per latent pixel, [B, F, 1, h, w] over x0's channels, values in [0, 1]: the loss is its weighted mean
    # (`objective_options.masked_mean`), so a zero region gets no gradient; None: every element counts alike
    loss_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class TrainingDraws:
    """What a step's seeded draws depend on beyond the batch: one generator per sample (keyed by the sample's place
    in the global batch, so a resumed run and any split over processes draw alike), the conditions' dropout and the
    objective's timestep options (`Objective.timestep_sampling`, its parameters and range)."""

    generators: Sequence[torch.Generator]
    condition_dropout: float = 0.0
    objective: Objective = REFERENCE


@dataclass(frozen=True)
class VariantSpec(ABC):
    """One model of a family, as it is published: its names, classes, precision, native clip and configs."""

    name: str                 # "cogvideox-2b"
    family: str               # "cogvideox": the family's name (a model card's tag)
    short: str                # the name after tiny:// and random://
    hub_id: str               # the published checkpoint this spec describes
    dtype: str                # default precision: weights, autocast (and loss scaling for fp16)
    native: ClipSize          # what `data.num_frames/height/width/fps` default to for this variant
    reference: PipelineConfigs = field(repr=False)  # full-size configs of `hub_id` (bench, estimate, random://)
    tiny: PipelineConfigs = field(repr=False)       # tiny configs of the same classes (tests, quickstart)
    pipeline_class: str = ""
    transformer_class: str = ""
    vae_class: str = ""
    scheduler_class: str = ""
    text_encoder_class: str = "T5EncoderModel"  # a transformers class, built from `text_encoder` configs
    # the base model's license as the Hub names it, for the model card of what is trained from it
    license: str = "other"
    license_name: str | None = None
    license_link: str | None = None

    @abstractmethod
    def matches(self, configs: PipelineConfigs) -> bool:
        """Whether a pipeline with these configs is this variant."""

    @abstractmethod
    def bind(self, configs: PipelineConfigs, dtype: str = "auto") -> Variant:
        """This spec bound to one pipeline's configs, in `dtype` (auto: the spec's)."""

    def with_control(self, configs: PipelineConfigs) -> tuple[VariantSpec, PipelineConfigs]:
        """The spec and configs of this model widened to also read a control video (`model.control: true`); the
        widened variant's `prepare_loaded` makes its transformer so. Refused by key where the family has no such
        form."""
        raise ConfigError(f"model.control: {self.name} cannot be widened to take control videos; leave it out")

    def torch_dtype(self, dtype: str) -> torch.dtype:
        return DTYPES[self.dtype if dtype == "auto" else dtype]

    def diffusers_class(self, component: str):
        """The class of `component` ("pipeline", "transformer", "vae", "scheduler", "text_encoder"): a diffusers (or
        transformers) name, or the class itself where a family brings its own."""
        named = getattr(self, f"{component}_class")
        if not isinstance(named, str):
            return named
        import diffusers
        import transformers

        return getattr(transformers if component == "text_encoder" else diffusers, named)

    def class_name(self, component: str) -> str:
        named = getattr(self, f"{component}_class")
        return named if isinstance(named, str) else named.__name__


@dataclass(frozen=True)
class ModelFamily:
    """A family's registered variants, and what it says of configs that match none of them."""

    name: str
    specs: tuple[VariantSpec, ...]
    explain: Callable[[PipelineConfigs], str] = field(default=lambda configs: "", repr=False)


@dataclass(frozen=True)
class Variant(ABC):
    """A spec bound to one pipeline's configs and a precision: the geometry and behaviour every consumer asks for."""

    spec: VariantSpec
    configs: PipelineConfigs = field(repr=False)
    dtype: torch.dtype

    # identity -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    @property
    def num_train_timesteps(self) -> int:
        """The length of the training schedule (timesteps 0 .. T-1): the scheduler config's, else its class's
        default."""
        configured = self.configs.scheduler.get("num_train_timesteps")
        if configured is None:
            init = inspect.signature(self.spec.diffusers_class("scheduler").__init__)
            configured = init.parameters["num_train_timesteps"].default
        return int(configured)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """Encoders and inference run in the variant's dtype on accelerators; CPUs get fp32 (half
        convolutions are slow there)."""
        return torch.float32 if device.type == "cpu" else self.dtype

    @functools.cached_property
    def transformer_config(self) -> dict:
        """The transformer's config with the class's defaults filled in, as the loaded model sees it."""
        parameters = inspect.signature(self.spec.diffusers_class("transformer").__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.configs.transformer}

    @property
    def transformer_layout(self) -> tuple[int, dict[str, tuple[int, int]]]:
        """(parameters, {Linear layer name: (in, out) features}) of the transformer, built on the meta device."""
        return _meta_layout(self.spec.diffusers_class("transformer"), json.dumps(self.configs.transformer,
                                                                                  sort_keys=True))

    @property
    def trained_with_adapter_parameters(self) -> int:
        """Parameters of the `trained_with_adapter` modules, counted on the meta-device build."""
        if not self.trained_with_adapter:
            return 0
        model = _meta_model(self.spec.diffusers_class("transformer"),
                            json.dumps(self.configs.transformer, sort_keys=True))
        return sum(p.numel() for name in self.trained_with_adapter for p in model.get_submodule(name).parameters())

    def unmatched_lora_targets(self, targets: list[str]) -> list[str]:
        """The `lora.target_modules` entries that name no Linear layer (PEFT's rule: the name or its last parts)."""
        names = self.transformer_layout[1]
        return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]

    # geometry (read from the configs by diffusers' conventions; a family whose configs differ overrides) ---------
    @property
    def max_text_seq_length(self) -> int:
        """Tokens of a prompt embedding."""
        return int(self.configs.transformer["max_text_seq_length"])

    @property
    def text_embed_dim(self) -> int:
        """Width of a prompt embedding."""
        return int(self.configs.transformer["text_embed_dim"])

    @property
    def vae_scale_spatial(self) -> int:
        """Pixels per latent pixel: 2^(VAE blocks - 1)."""
        return 2 ** (len(self.configs.vae["block_out_channels"]) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        """Frames per latent frame (after the first)."""
        return int(self.configs.vae.get("temporal_compression_ratio", 1))

    @property
    def latent_channels(self) -> int:
        """Channels of one latent frame."""
        return int(self.configs.vae["latent_channels"])

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side."""
        return int(self.configs.transformer["patch_size"])

    @property
    def patch_size_t(self) -> int:
        """Latent frames per token (1: every frame its own)."""
        return 1

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames the VAE makes of `num_frames` frames."""
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def padded_latent_frames(self, num_frames: int) -> int:
        """Latent frames the transformer sees: rounded up to a multiple of `patch_size_t`."""
        frames, p = self.latent_frames(num_frames), self.patch_size_t
        return -(-frames // p) * p

    def video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Patches of one clip: padded latent frames / patch_size_t × latent height and width / patch_size."""
        side = self.vae_scale_spatial * self.patch_size
        return self.padded_latent_frames(num_frames) // self.patch_size_t * (height // side) * (width // side)

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        """The transformer's sequence: the prompt's tokens and the clip's patches."""
        return self.max_text_seq_length + self.video_tokens(num_frames, height, width)

    @abstractmethod
    def frame_buckets(self, num_frames: int, min_frames: int) -> tuple[int, ...]:
        """The frame counts a clip may be cut to, largest first."""

    @abstractmethod
    def resolve(self, config: Config) -> Config:
        """`config` with the variant's native clip wherever `data.*` leaves it unset; a size it cannot take refused
        by key."""

    @abstractmethod
    def check_clip_size(self, num_frames: int, height: int, width: int, shortest_bucket: int | None = None,
                        names: tuple[str, str, str, str] = DATA_SIZE_KEYS) -> None:
        """Refuse, naming the key (or flag) in `names`, a size this variant cannot make."""

    @abstractmethod
    def single_frame_problem(self) -> str | None:
        """Why this variant cannot train on a still image (a one-frame sample), or None where it can."""

    # conditions -----------------------------------------------------------------------------------
    @property
    def conditions(self) -> tuple[str, ...]:
        """The inputs besides the prompt a video is made from ("image": image-to-video, "control": a control video);
        () for text-to-video."""
        return ()

    def check_validation_conditions(self, prompts: list[str], images: list[str], controls: list[str]) -> None:
        """Refuse, by key, validation inputs this variant cannot use or lacks."""
        takes_image = "image" in self.conditions
        if takes_image and prompts and not images:
            raise ConfigError(f"validation.images: {self.name} makes a video from an image and a prompt; give one "
                              "image per validation prompt (a clip's first frame will do), "
                              "or set validation.prompts=[]")
        if images and not takes_image:
            raise ConfigError(f"validation.images: {self.name} is text-to-video and takes no image; remove the key")
        if controls and "control" not in self.conditions:
            raise ConfigError(f"validation.controls: {self.name} takes no control video; remove the key, or train a "
                              "control model (model.control: true)")
        self._check_files("validation.images", images, "an image file")

    @staticmethod
    def _check_files(key: str, paths: list[str], kind: str) -> None:
        from pathlib import Path

        for path in paths:
            if not Path(path).is_file():
                what = f"is a folder, not {kind}" if Path(path).is_dir() else "not found"
                raise ConfigError(f"{key}: {path} {what} (paths are relative to where cogft runs)")

    # loading --------------------------------------------------------------------------------------
    def prepare_loaded(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The transformer loaded from the pipeline folder, made into this variant's (a control model widened from a
        text-to-video one gets its new inputs); as loaded for the others."""
        return transformer

    @property
    def trained_with_adapter(self) -> tuple[str, ...]:
        """Modules trained whole beside the adapter in LoRA mode (a widened input), saved beside the LoRA."""
        return ()

    # prepare --------------------------------------------------------------------------------------
    def cache_identity(self, config: Config) -> list:
        """What, beside the VAE and the decode settings, the cached samples depend on (their cache key)."""
        return []

    @abstractmethod
    def encode_sample(self, vae, frames: np.ndarray, conditions: dict[str, np.ndarray | None], seed: int,
                      config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What prepare caches for one window of uint8 frames [F, H, W, 3]: named tensors, one sample each (no batch
        axis). `conditions`: each of `self.conditions` given for the clip (None: the family's default, e.g. the
        window's first frame); `seed`: the window's own, for draws made at encoding."""

    @abstractmethod
    def embed_prompts(self, pipe, texts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The prompt embeddings [N, L, D] of `texts` through the pipeline's text encoder."""

    # training -------------------------------------------------------------------------------------
    @property
    def objective_options(self) -> bool:
        """Whether `draw_inputs` and `loss` honour `Objective`'s options and `ModelInputs.loss_mask`; a family that
        does not trains its reference objective alone, and any other choice is refused by key."""
        return False

    def check_objective(self, objective: Objective) -> None:
        """Refuse, by key and before prepare, a timestep range outside the schedule or an option this family cannot
        train with."""
        schedule = self.num_train_timesteps
        for key in ("min_timestep", "max_timestep"):
            value = getattr(objective, key)
            if value is not None and value >= schedule:
                raise ConfigError(f"train.{key}={value}: {self.name}'s schedule has {schedule} timesteps; use 0 to "
                                  f"{schedule - 1}")
        departures = objective.departures()
        if departures and not self.objective_options:
            raise ConfigError(f"{departures[0]}: {self.name} trains only its reference objective (uniform timesteps "
                              "over the whole schedule, its own loss); leave the key out")

    @abstractmethod
    def batch_geometry(self, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
        """(samples, frames, height, width) of a batch of cached samples, read from shapes (no device sync)."""

    @abstractmethod
    def draw_inputs(self, batch: dict[str, torch.Tensor], draws: TrainingDraws, scheduler) -> ModelInputs:
        """A training batch's inputs, every random draw from the per-sample generators in a fixed order."""

    @abstractmethod
    def fixed_inputs(self, batch: dict[str, torch.Tensor], noise_generator: torch.Generator,
                     timestep: int) -> ModelInputs:
        """One cached sample's inputs with no sampling: its latent mean, noise from `noise_generator` (CPU), the given
        timestep, its conditions undropped (the held-out eval)."""

    @abstractmethod
    def probe_inputs(self, num_frames: int, height: int, width: int, prompt_embeds: torch.Tensor,
                     generator: torch.Generator, timestep: int, device: torch.device) -> ModelInputs:
        """A fixed input for one prediction at a clip size: its x0 is the noisy input itself (drawn from the CPU
        `generator`), with neutral conditions, the same wherever it is built (the export check, bench)."""

    def neutral_conditions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditions for a probe input `x` that are the same wherever it is built (zeros where the model takes
        any); none for a model that takes none."""
        return {}

    @abstractmethod
    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, inputs: ModelInputs,
                cast_inputs: bool = False) -> torch.Tensor:
        """One forward as training runs it (under the variant's autocast, laid out as the stock pipeline lays it
        out). `cast_inputs`: hand the model its inputs in the variant's dtype (DeepSpeed turns autocast off)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, inputs: ModelInputs, scheduler, cast_inputs: bool = False,
             objective: Objective = REFERENCE,
             target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The training objective of `model` on `inputs` (fp32), with `objective`'s loss form and weighting.
        `target(x_t, t)`: a prediction, in `predict`'s form, that the model is trained towards instead of the clean
        latents (a prior sample: the base model's own, made without gradient); None: the clean latents, as always."""

    def sample_losses(self, model: torch.nn.Module, inputs: ModelInputs, scheduler, cast_inputs: bool = False,
                      objective: Objective = REFERENCE,
                      target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """`loss` per sample, [B] (fp32), of the same forward: `loss` is their mean. The trainer steps on their mean
        and records each clip's (`cogft doctor --losses`); optional: a family without it trains on `loss` and its
        clips' losses go unrecorded (`gives_sample_losses`)."""
        raise NotImplementedError(f"{self.name} gives its loss per batch only")

    @property
    def gives_sample_losses(self) -> bool:
        """Whether `sample_losses` is there: the training step then records each sample's loss at no extra cost."""
        return type(self).sample_losses is not Variant.sample_losses

    @abstractmethod
    def reference_loss(self, transformer: torch.nn.Module, batch: dict[str, torch.Tensor], scheduler) -> torch.Tensor:
        """The family's published training recipe written plainly (diffusers' example script): the baseline
        `cogft bench --baseline` times beside cogft's step."""

    @abstractmethod
    def synthetic_batch(self, config: Config, batch_size: int, num_frames: int, height: int, width: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random tensors shaped and typed as a batch of `encode_sample` entries and prompt embeddings, on the
        generator's device (bench)."""

    def synthetic_loss_mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """A random `LOSS_MASK` for a synthetic batch, shaped as the cache carries it (`cogft bench --loss-mask`)."""
        raise ConfigError(f"--loss-mask: {self.name} takes no loss mask")

    def loss_mask_latents(self, mask: torch.Tensor) -> torch.Tensor:
        """A window's pixel loss mask [F, H, W] (weights in [0, 1] on its frames at the training size) as prepare
        caches it under `LOSS_MASK`, on the latent grid `loss_mask` reads; a family without one refuses masks."""
        raise ConfigError(f"masks need a family that maps them: {self.name} takes no loss mask")

    @property
    def maps_loss_masks(self) -> bool:
        """Whether clips may bring loss masks: the family maps them (`loss_mask_latents`) and its loss honours them
        (`objective_options`)."""
        return type(self).loss_mask_latents is not Variant.loss_mask_latents and self.objective_options

    # sampling -------------------------------------------------------------------------------------
    def assemble_pipeline(self, transformer, vae, scheduler):
        """The stock pipeline around components already in memory, without the text encoder (prompts come as
        cached embeddings)."""
        pipe = self.spec.diffusers_class("pipeline")(tokenizer=None, text_encoder=None, vae=vae,
                                                     transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @abstractmethod
    def pipeline_inputs(self, *, prompt: str | None, prompt_embeds: torch.Tensor | None,
                        negative_prompt_embeds: torch.Tensor | None, image=None, control=None) -> dict[str, Any]:
        """The conditioning part of the pipeline call for a validation video or `cogft sample`: `image` a PIL
        image, `control` a list of PIL frames, each at the video's size, for variants with those conditions."""

    @abstractmethod
    def render_latents(self, pipe, conditioning: dict[str, Any], *, num_frames: int, height: int, width: int,
                       steps: int, guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
        """Denoise through the pipeline to the latents of `num_frames` frames (padding dropped)."""

    def video_to_video(self, pipe):
        """A pipeline that renders from a source video (SDEdit: the video noised to `strength`, then denoised under
        the prompt) around `pipe`'s components, for `cogft sample --video`; None where the variant has none."""
        return None

    def render_from_video(self, pipe, conditioning: dict[str, Any], video: list, strength: float, *, height: int,
                          width: int, steps: int, guidance_scale: float, generator: torch.Generator) -> torch.Tensor:
        """Denoise `video_to_video`'s pipeline from `video` (PIL frames at the size) to latents."""
        raise NotImplementedError(f"{self.name} renders from a prompt, not from a video")

    @abstractmethod
    def decode(self, pipe, latents: torch.Tensor) -> np.ndarray:
        """Latents to float frames [F, H, W, 3] in [0, 1]."""

    # adapters, blocks, attention --------------------------------------------------------------------
    @property
    def lora_format(self):
        """The diffusers class whose `save_lora_weights` / `lora_state_dict` write and read this family's LoRA files
        (the pipeline class, which a stock `load_lora_weights` is called on)."""
        return self.spec.diffusers_class("pipeline")

    @property
    def lora_key_formats(self) -> dict:
        """{format name: `lora_formats.ToolNames`}: the other tools' key formats (`lora.export_format`) this family's
        LoRA can be written in, with how each tool names its modules; none by default (refused by key)."""
        return {}

    @abstractmethod
    def attention_processor(self, kernel, name: str):
        """An attention processor of this family's transformer that runs `kernel` (a `KernelProcessor`)."""


@functools.lru_cache(maxsize=8)
def _meta_model(transformer_class, config_json: str) -> torch.nn.Module:
    """The transformer of these configs on the meta device: shapes without weights, built once."""
    with torch.device("meta"):
        return transformer_class.from_config(json.loads(config_json))


@functools.lru_cache(maxsize=8)
def _meta_layout(transformer_class, config_json: str) -> tuple[int, dict[str, tuple[int, int]]]:
    model = _meta_model(transformer_class, config_json)
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    return sum(p.numel() for p in model.parameters()), linears
