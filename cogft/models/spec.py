"""The contract every CogVideoX variant fulfils, and the registry that picks a variant from a pipeline's configs.

A variant (2B, 5B, 1.5, and their image-to-video models) is one `VariantSpec`: which configs it
matches, its diffusers classes and default dtype, its frame rules, what one training step gives the
transformer, how the pipeline is called for a video, and its tiny and full-size configurations. The
trainer, prepare, sampling, export, estimate and bench ask the spec instead of branching on a name.

A spec bound to one pipeline folder's configs is a `Variant`: every number (scale factors, patch
sizes, token counts, prompt length) is read from those configs, never from the path's name.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..config import Config, ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DATA_SIZE_KEYS = ("data.num_frames", "data.height", "data.width", "data.min_frames")


class UnsupportedModelError(ConfigError):
    """A pipeline whose configs match no registered variant; names what was found and what is supported."""


@dataclass(frozen=True)
class PipelineConfigs:
    """A pipeline folder's own configs: model_index.json and the components' config files."""

    model_index: dict
    transformer: dict
    vae: dict
    scheduler: dict

    def found(self) -> str:
        """What identifies a variant, as read from these configs (for error messages)."""
        t = self.transformer
        return (f"pipeline {self.model_index.get('_class_name')}, transformer in_channels {t.get('in_channels')} "
                f"(VAE latent channels {self.vae.get('latent_channels')}), rotary positions "
                f"{bool(t.get('use_rotary_positional_embeddings'))}, patch_size_t {t.get('patch_size_t')}, "
                f"ofs_embed_dim {t.get('ofs_embed_dim')}")


@dataclass(frozen=True)
class ClipSize:
    """The clip a variant was trained on: the `data.*` defaults a config gets for it unless it says otherwise."""

    num_frames: int
    height: int
    width: int
    fps: float


def frame_buckets(num_frames: int, min_frames: int) -> tuple[int, ...]:
    """The frame counts a clip may be cut to, largest first, e.g. (49, 41, 33, 25, 17) for 49 down to 17.

    `num_frames`, every 8k+1 count below it down to `min_frames`, and `min_frames` itself: 8k+1 frames
    make an odd number of latent frames, which decode back to the same length.
    """
    below = [f for f in range(num_frames - 1, min_frames - 1, -1) if f % 8 == 1]
    if min_frames < num_frames and min_frames not in below:
        below.append(min_frames)
    return (num_frames, *below)


@dataclass(frozen=True)
class VariantSpec:
    """Text-to-video CogVideoX: the behaviour of the 1.0 models; other conditionings subclass it."""

    name: str                 # "cogvideox-2b"
    short: str                # the name after tiny:// and random://
    hub_id: str               # the published checkpoint this spec describes
    dtype: str                # default precision: weights, autocast (and loss scaling for fp16)
    rotary: bool              # 3D RoPE (5B) or sincos positions (2B)
    native: ClipSize          # what `data.num_frames/height/width/fps` default to for this variant
    reference: PipelineConfigs = field(repr=False)  # full-size configs of `hub_id` (bench, estimate, random://)
    tiny: PipelineConfigs = field(repr=False)       # tiny configs of the same classes (tests, quickstart)
    pipeline_class: str = "CogVideoXPipeline"
    transformer_class: str = "CogVideoXTransformer3DModel"
    vae_class: str = "AutoencoderKLCogVideoX"
    scheduler_class: str = "CogVideoXDPMScheduler"
    patch_size_t: int | None = None  # CogVideoX 1.5 patches latent frames in pairs
    # the base model's license as the Hub names it, for the model card of what is trained from it
    license: str = "other"
    license_name: str | None = "cogvideox-license"
    license_link: str | None = "https://huggingface.co/THUDM/CogVideoX-5b/blob/main/LICENSE"

    @property
    def image_conditioned(self) -> bool:
        """Whether a video is made from an image as well as a prompt (prepare caches the image, sampling needs one)."""
        return False

    # identity ---------------------------------------------------------------------------------
    def matches(self, configs: PipelineConfigs) -> bool:
        """The pipeline class, positions and frame patching every variant is told by, then its conditioning."""
        t = configs.transformer
        return (configs.model_index.get("_class_name", self.pipeline_class) == self.pipeline_class
                and bool(t.get("use_rotary_positional_embeddings", False)) == self.rotary
                and t.get("patch_size_t") == self.patch_size_t
                and self.conditioning_matches(t, configs.vae.get("latent_channels")))

    def conditioning_matches(self, transformer: dict, latent_channels: int | None) -> bool:
        """Text only: the transformer reads the latents alone, with no learned positions and no `ofs` input."""
        return (transformer.get("in_channels") == latent_channels
                and not transformer.get("use_learned_positional_embeddings", False)
                and transformer.get("ofs_embed_dim") is None)

    def bind(self, configs: PipelineConfigs, dtype: str = "auto") -> "Variant":
        return Variant(self, configs, DTYPES[self.dtype if dtype == "auto" else dtype])

    def diffusers_class(self, component: str):
        """The diffusers class of `component` ("pipeline", "transformer", "vae", "scheduler")."""
        import diffusers

        return getattr(diffusers, getattr(self, f"{component}_class"))

    # data -------------------------------------------------------------------------------------
    def clip_entry(self, latent_dist) -> dict[str, torch.Tensor]:
        """What prepare caches per clip window (the dataset hands every field to the step): the VAE's latent
        distribution, from which each step samples afresh. Its cache key is the clip's bytes, the decode
        settings and the VAE's identity."""
        return {"latent_mean": latent_dist.mean[0], "latent_logvar": latent_dist.logvar[0]}

    # training ---------------------------------------------------------------------------------
    def transformer_inputs(self, x_t: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                           rotary: tuple[torch.Tensor, torch.Tensor] | None,
                           image_latents: torch.Tensor | None = None) -> dict[str, Any]:
        """The keyword arguments of one training forward, laid out as the stock pipeline lays them out."""
        return {"hidden_states": x_t, "encoder_hidden_states": prompt_embeds, "timestep": timesteps,
                "image_rotary_emb": rotary}

    # sampling ---------------------------------------------------------------------------------
    def pipeline_inputs(self, *, prompt: str | None, prompt_embeds: torch.Tensor | None,
                        negative_prompt_embeds: torch.Tensor | None, image=None) -> dict[str, Any]:
        """The conditioning part of the pipeline call for a validation video or `cogft sample`."""
        return {"prompt": prompt, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}


@dataclass(frozen=True)
class Variant:
    """A spec bound to one pipeline's configs and a precision: the geometry every consumer asks for."""

    spec: VariantSpec
    configs: PipelineConfigs = field(repr=False)
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def use_rotary(self) -> bool:
        return bool(self.configs.transformer.get("use_rotary_positional_embeddings", False))

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    @functools.cached_property
    def transformer_config(self) -> dict:
        """The transformer's config with the class's defaults filled in, as the loaded model sees it."""
        parameters = inspect.signature(self.spec.diffusers_class("transformer").__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.configs.transformer}

    @property
    def transformer_layout(self) -> tuple[int, dict[str, tuple[int, int]]]:
        """(parameters, {Linear layer name: (in, out) features}) of the transformer, built on the meta device."""
        return _meta_layout(self.spec.transformer_class, json.dumps(self.configs.transformer, sort_keys=True))

    def unmatched_lora_targets(self, targets: list[str]) -> list[str]:
        """The `lora.target_modules` entries that name no Linear layer (PEFT's rule: the name or its last parts)."""
        names = self.transformer_layout[1]
        return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """Encoders and inference run in the variant's dtype on accelerators; CPUs get fp32 (half
        convolutions are slow there)."""
        return torch.float32 if device.type == "cpu" else self.dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.configs.vae["scaling_factor"])

    @property
    def max_text_seq_length(self) -> int:
        return int(self.configs.transformer["max_text_seq_length"])

    @property
    def text_embed_dim(self) -> int:
        return int(self.configs.transformer["text_embed_dim"])

    @property
    def vae_scale_spatial(self) -> int:
        """Pixels per latent pixel: 2^(VAE blocks - 1)."""
        return 2 ** (len(self.configs.vae["block_out_channels"]) - 1)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.configs.vae.get("temporal_compression_ratio", 4))

    @property
    def patch_size(self) -> int:
        return int(self.configs.transformer["patch_size"])

    @property
    def patch_size_t(self) -> int:
        return int(self.configs.transformer.get("patch_size_t") or 1)

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

    def frame_buckets(self, num_frames: int, min_frames: int) -> tuple[int, ...]:
        return frame_buckets(num_frames, min_frames)

    @property
    def fixed_clip(self) -> ClipSize | None:
        """The only clip a learned position table fits (5B-I2V: 49 frames at 480x720), read from the transformer's
        sample size; None where positions are computed for any size."""
        t = self.transformer_config
        if not t.get("use_learned_positional_embeddings"):
            return None
        return ClipSize(num_frames=int(t["sample_frames"]), height=int(t["sample_height"]) * self.vae_scale_spatial,
                        width=int(t["sample_width"]) * self.vae_scale_spatial, fps=self.spec.native.fps)

    def resolve(self, config: Config) -> Config:
        """`config` with the variant's native clip for every `data.num_frames/height/width/fps` it leaves unset
        (CogVideoX 1.5 trains 81 frames at 16 fps, 768x1360, not the schema's 1.0 defaults; a fixed-size model
        gets no shorter frame buckets); a clip size the variant cannot take is refused by key."""
        native = self.fixed_clip or self.spec.native
        unset = {key: getattr(native, key) for key in ("num_frames", "height", "width", "fps")
                 if key not in config.data.model_fields_set}
        if self.fixed_clip and "min_frames" not in config.data.model_fields_set:
            unset["min_frames"] = native.num_frames
        if unset:
            config = config.model_copy(update={"data": config.data.model_copy(update=unset)})
        data = config.data
        self.check_clip_size(data.num_frames, data.height, data.width, data.shortest_bucket)
        self.check_sizes(config)
        return config

    def check_sizes(self, config: Config) -> None:
        """Refuse, by key, a `data.buckets` or `validation.sizes` entry this variant cannot train or render at; a
        size `data.buckets: auto` derived is named as such, not as an entry the user never wrote."""
        sizes, auto = config.data.sizes, config.data.buckets == "auto"
        derived = ", ".join(f"{h}x{w}" for h, w in sizes)
        given = [] if config.data.buckets is None else [
            (f"data.buckets=auto derives {h}x{w} from data.height x data.width (all: {derived}):" if auto
             else f"data.buckets[{i}]={h}x{w}:", "data.buckets", (h, w)) for i, (h, w) in enumerate(sizes)]
        given += [(f"validation.sizes[{i}]={h}x{w}:", "validation.sizes", (h, w))
                  for i, (h, w) in ((i, config.validation_size(i)) for i in range(len(config.validation.sizes)))]
        side, fixed = self.vae_scale_spatial * self.patch_size, self.fixed_clip
        for where, key, (height, width) in given:
            if height % side or width % side:
                raise ConfigError(f"{where} {self.name} needs multiples of {side} "
                                  f"(VAE ×{self.vae_scale_spatial}, patch {self.patch_size})")
            if fixed is not None and (height, width) != (fixed.height, fixed.width):
                raise ConfigError(f"{where} {self.name} takes only {fixed.height}x{fixed.width} (its "
                                  "learned position table fits that size alone, and the stock pipeline refuses others); "
                                  f"leave {key} out")

    def single_frame_problem(self) -> str | None:
        """Why this variant cannot train on a still image (a one-frame sample), or None where it can."""
        if self.fixed_clip is not None:
            return f"{self.name} takes only {self.fixed_clip.num_frames}-frame clips (its learned position table)"
        if self.spec.image_conditioned:
            return f"{self.name} makes a video from an image: a still image would be its own conditioning"
        return None

    def check_validation_images(self, prompts: list[str], images: list[str]) -> None:
        """An image-to-video model validates from one image per prompt; a text-to-video one takes none."""
        if self.spec.image_conditioned and prompts and not images:
            raise ConfigError(f"validation.images: {self.name} makes a video from an image and a prompt; give one "
                              "image per validation prompt (a clip's first frame will do), or set validation.prompts=[]")
        if images and not self.spec.image_conditioned:
            raise ConfigError(f"validation.images: {self.name} is text-to-video and takes no image; remove the key")
        for image in images:
            if not Path(image).is_file():
                what = "is a folder, not an image file" if Path(image).is_dir() else "not found"
                raise ConfigError(f"validation.images: {image} {what} (paths are relative to where cogft runs)")

    def check_clip_size(self, num_frames: int, height: int, width: int, shortest_bucket: int | None = None,
                        names: tuple[str, str, str, str] = DATA_SIZE_KEYS) -> None:
        """Refuse, naming the key, a training size this variant cannot take (before any clip is encoded); the
        schema has already checked what holds for every variant (4k+1 frames). `names`: what the four values
        (frames, height, width, shortest bucket) are called where they were given (config keys, or flags)."""
        side = self.vae_scale_spatial * self.patch_size
        frames_key, height_key, width_key, shortest_key = names
        for key, value in ((height_key, height), (width_key, width)):
            if value % side:
                raise ConfigError(f"{key}={value}: {self.name} needs a multiple of {side} "
                                  f"(VAE ×{self.vae_scale_spatial}, patch {self.patch_size}); "
                                  f"try {value - value % side}")
        fixed = self.fixed_clip
        if fixed is None:
            return
        asked = ((frames_key, num_frames, fixed.num_frames), (height_key, height, fixed.height),
                 (width_key, width, fixed.width),
                 (shortest_key, num_frames if shortest_bucket is None else shortest_bucket, fixed.num_frames))
        for key, value, wanted in asked:
            if value != wanted:
                raise ConfigError(
                    f"{key}={value}: {self.name} takes only {fixed.num_frames} frames at {fixed.height}x{fixed.width} "
                    f"(its learned position table fits that size alone, and the stock pipeline refuses others); "
                    f"set {key}={wanted} or leave it out")

    def rotary_embedding(self, height: int, width: int, latent_frames: int, device: torch.device):
        """3D RoPE as the stock pipeline computes it at inference (its own helper, its base grid from the
        transformer config's sample size); None for sincos models."""
        if not self.use_rotary:
            return None
        config = SimpleNamespace(**self.transformer_config)
        host = SimpleNamespace(transformer=SimpleNamespace(config=config),
                               vae_scale_factor_spatial=self.vae_scale_spatial)
        pipeline = self.spec.diffusers_class("pipeline")
        return pipeline._prepare_rotary_positional_embeddings(host, height, width, latent_frames, device)

    def predict(self, model: torch.nn.Module, x_t: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                rotary, image_latents: torch.Tensor | None = None) -> torch.Tensor:
        """One transformer forward as training runs it: under the variant's autocast, with the inputs laid out as
        the stock pipeline lays them out (`transformer_inputs`)."""
        with torch.autocast(x_t.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            kwargs = self.spec.transformer_inputs(x_t, prompt_embeds, timesteps, rotary, image_latents)
            return model(**kwargs, return_dict=False)[0]


@functools.lru_cache(maxsize=8)
def _meta_layout(class_name: str, config_json: str) -> tuple[int, dict[str, tuple[int, int]]]:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name).from_config(json.loads(config_json))
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    return sum(p.numel() for p in model.parameters()), linears


def identify(configs: PipelineConfigs, specs: tuple[VariantSpec, ...], where: str) -> VariantSpec:
    """The one spec whose identity matches `configs`; refused by name otherwise."""
    found = [spec for spec in specs if spec.matches(configs)]
    if len(found) == 1:
        return found[0]
    supported = ", ".join(f"{s.name} ({s.hub_id})" for s in specs)
    t, latent = configs.transformer, configs.vae.get("latent_channels")
    if latent and t.get("in_channels") not in (latent, 2 * latent):
        what = (f"transformer in_channels {t.get('in_channels')} is neither 1x nor 2x the VAE's {latent} latent "
                "channels: not a CogVideoX pipeline cogft knows")
    else:
        what = "a combination no registered variant matches"
    raise UnsupportedModelError(f"model.path {where}: {what}. Found {configs.found()}. Supported: {supported}")
