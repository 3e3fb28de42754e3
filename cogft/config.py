"""The typed run configuration: YAML file + `section.key=value` overrides, validated by pydantic.

Every mistake is reported before any model is loaded, naming the file, the key, the bad value and
what is allowed, so a typo costs a second instead of a queued GPU job.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, ValidationInfo, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


SEED_RANGE = dict(ge=0, lt=2**32)  # what every seeded library takes (numpy's is the narrowest)


def frame_count_problem(frames: int) -> str | None:
    """Why a clip cannot have this many frames, or None: the VAE compresses time by 4 after the first frame."""
    if (frames - 1) % 4 == 0:
        return None
    lower = frames - (frames - 1) % 4
    return f"must be 4k+1 (the VAE compresses time by 4 after the first frame); try {lower} or {lower + 4}"


SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[x×X]\s*(\d+)\s*$")
# aspect ratios (width / height) of `data.buckets: auto`: landscape, portrait and square, as phones and cameras shoot
AUTO_ASPECTS = (16 / 9, 3 / 2, 4 / 3, 1.0, 3 / 4, 2 / 3, 9 / 16)


def parse_size(text: str) -> tuple[int, int]:
    """"480x720" (height x width, as data.height / data.width) -> (480, 720); ValueError naming the form otherwise."""
    match = SIZE_PATTERN.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a size; write HEIGHTxWIDTH, e.g. 480x720")
    height, width = int(match[1]), int(match[2])
    for name, value in (("height", height), ("width", width)):
        if value < 16 or value % 16:
            raise ValueError(f"{text}: the {name} {value} must be a multiple of 16 (VAE ×8, patch 2); "
                             f"try {max(16, value - value % 16)}")
    return height, width


def auto_sizes(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """`data.buckets: auto`: the configured size, then one size per common aspect ratio with about its area
    (multiples of 16), so every clip trains at about the same cost whatever its shape."""
    area = height * width
    sizes = [(height, width)]
    for aspect in AUTO_ASPECTS:
        size = (max(16, round((area / aspect) ** 0.5 / 16) * 16), max(16, round((area * aspect) ** 0.5 / 16) * 16))
        if all(abs(math.log(size[1] / size[0]) - math.log(w / h)) > 0.05 for h, w in sizes):
            sizes.append(size)
    return tuple(sizes)


class _Section(BaseModel):
    # no float key means anything as inf or nan (an inf learning rate once exported an all-NaN LoRA)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    path: str = Field(description="a diffusers pipeline folder; a hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b, "
                                  "THUDM/CogVideoX-5b-I2V, THUDM/CogVideoX1.5-5B, THUDM/CogVideoX1.5-5B-I2V); "
                                  "tiny://NAME (NAME: 2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v): tiny random test models "
                                  "built on first use under $COGFT_HOME; random://NAME: a full-size pipeline with random "
                                  "weights built from the built-in real configurations, for benchmarking and end-to-end "
                                  "checks on a GPU, never for real training (the log says so)")
    revision: str | None = None
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    attention: Literal["auto", "sdpa", "fa4"] = Field(
        "auto", description="attention kernel: fa4 (FlashAttention-4, Hopper/Blackwell GPUs, pip install "
        "'cogft[fa4]'), sdpa (torch's), auto: fa4 where it can run, sdpa elsewhere"
    )
    fp8_base: bool = Field(False, description="LoRA: keep the frozen transformer's linear weights in float8 (e4m3, "
                                              "scaled per row) and upcast each layer's weight for its forward; the "
                                              "patch embedding stays as it is. About half the base weights' memory")


class DataConfig(_Section):
    path: str = Field(description="folder with prompts.txt + videos.txt, a folder of clips with a .txt caption "
                                  "beside each, or a .csv / .jsonl metadata file")
    video_column: str = "video"
    caption_column: str = "caption"
    image_column: str = Field("image", description="image-to-video: the metadata column naming each clip's "
                                                   "conditioning image (empty or absent: the clip's first frame)")
    num_frames: int = Field(49, ge=1)
    min_frames: int | None = Field(None, ge=1, description="shortest frame bucket; null: min(17, num_frames)")
    height: int = Field(480, ge=8)
    width: int = Field(720, ge=8)
    fps: float | None = Field(8.0, gt=0, description="resample clips to this rate; null keeps every frame")
    resize: Literal["crop", "fit"] = Field("crop", description="crop: cover and centre-crop; fit: letterbox")
    windows: int = Field(1, ge=1, le=64, description="windows per clip, spread evenly over it and encoded once; "
                                                    "each epoch trains on one, drawn at random. 1: the clip's start")
    cache_dir: str | None = None
    vae_tiling: bool = False
    compile_vae: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the VAE encoder during prepare: faster encoding after a one-time "
                            "compile; auto: on CUDA when at least 600 clips are to be encoded, where it pays off"
    )
    decode_workers: int = Field(2, ge=1, description="processes decoding clips during prepare")
    dataloader_workers: int = Field(0, ge=0)
    image_noise_draws: int = Field(
        4, ge=1, le=64, description="image-to-video: noisy versions of each conditioning image that prepare encodes "
        "(pixel noise sigma = exp(N(-3, 0.5^2)), the reference recipe); each step trains on one, drawn at random. "
        "Each costs about one latent frame's encode")
    image_dropout: float = Field(0.05, ge=0, le=1, description="image-to-video: fraction of steps trained with the "
                                                              "image latents zeroed (the reference recipe's 0.05)")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="fraction of samples trained on the empty prompt "
                                                                "(as the negative prompt of guidance is), drawn from "
                                                                "the seeded generators")
    caption_prefix: str = Field("", description="put in front of every caption before it is embedded (a trigger word "
                                                "that summons the subject); part of the cache key")
    buckets: list[str] | Literal["auto"] | None = Field(
        None, description="training sizes as HEIGHTxWIDTH (e.g. [480x720, 720x480, 576x576]): each clip or image "
        "trains at the one nearest its aspect ratio, resized and cropped without distortion; auto: data.height x "
        "data.width plus one size per common aspect ratio (16:9 to 9:16) at about its area; null: data.height x "
        "data.width only")
    image_batch_size: int | None = Field(None, ge=1, description="batch size of still images trained beside the clips "
                                                                 "(they are single frames, far cheaper); null: "
                                                                 "train.batch_size")

    @field_validator("num_frames", "min_frames")
    @classmethod
    def _frames_4k_plus_1(cls, value: int | None) -> int | None:
        if value is not None and (problem := frame_count_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("min_frames")
    @classmethod
    def _min_frames_fits(cls, value: int | None, info: ValidationInfo) -> int | None:
        num_frames = info.data.get("num_frames")
        if value is not None and num_frames is not None and value > num_frames:
            raise ValueError(f"is larger than data.num_frames={num_frames}; use at most {num_frames} "
                             f"({num_frames} itself means no shorter buckets)")
        return value

    @field_validator("buckets")
    @classmethod
    def _sizes_parse(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("is empty; list at least one HEIGHTxWIDTH, or use auto, or null for data.height x "
                                 "data.width")
            sizes = [parse_size(item) for item in value]
            repeated = sorted({f"{h}x{w}" for h, w in sizes if sizes.count((h, w)) > 1})
            if repeated:
                raise ValueError(f"lists {', '.join(repeated)} more than once; list each size once")
            return [f"{h}x{w}" for h, w in sizes]
        return value

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The training sizes (height, width), in the order given (auto: the configured size first)."""
        if self.buckets is None:
            return ((self.height, self.width),)
        if self.buckets == "auto":
            return auto_sizes(self.height, self.width)
        return tuple(parse_size(size) for size in self.buckets)

    @property
    def largest_size(self) -> tuple[int, int]:
        """The size with the most pixels (the first of equals): memory budgets and validation plan for it."""
        return max(self.sizes, key=lambda size: size[0] * size[1])

    @property
    def shortest_bucket(self) -> int:
        return self.min_frames if self.min_frames is not None else min(17, self.num_frames)

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be a multiple of 16 (VAE ×8, patch 2); try {value - value % 16}")
        return value


class TrainConfig(_Section):
    mode: Literal["lora", "sft"] = "lora"
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(42, **SEED_RANGE)
    checkpoint_every: int = Field(500, ge=1)
    checkpoints_keep: int = Field(3, ge=1)
    resume: str | None = "latest"
    gradient_checkpointing: bool | float = Field(
        False, description="true: all blocks; a fraction in (0, 1]: that share of the blocks; false: none"
    )
    offload_checkpoints: bool = False
    memory_budget_gib: PositiveFloat | Literal["auto"] | None = Field(
        None, description="choose checkpointing/offloading from `cogft estimate` to fit this many GiB; "
        "auto: 90 % of the GPU's memory"
    )
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile each block; auto: on CUDA GPUs")
    compile_autotune: bool = Field(
        False, description="tune the compiled blocks' fused kernels (inductor's coordinate-descent tuning): "
        "slightly faster steps for a longer compile at start, cached on disk for later runs; worth it for long runs"
    )
    allow_tf32: bool = True
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the trained "
                                    "weights (e.g. 0.999; on the GPU for a LoRA, in host memory for full fine-tuning) "
                                    "and validate and export it, the raw weights exported beside it in raw/; null: off")
    optimizer: Literal["adamw", "adamw_bf16", "adamw8bit", "prodigy"] = Field(
        "adamw", description="adamw: fp32 master weights and state; adamw_bf16 (SFT, bf16 variant): bf16 weights with "
        "stochastic rounding and bf16 state, applied during the backward pass (5B SFT on one 80 GB GPU; no clipping); "
        "adamw8bit: bitsandbytes' 8-bit AdamW state (CUDA GPUs, pip install 'cogft[bnb]'); prodigy: Prodigy, which "
        "finds the step size itself (train.learning_rate is its multiplier, 1.0 unless set; pip install "
        "'cogft[prodigy]')"
    )
    cpu_adam: Literal["auto", "torch"] = Field(
        "auto", description="optimizer in host memory (DeepSpeed offload): auto = DeepSpeed's CPUAdam, compiled on "
        "first use, else torch's AdamW; torch = torch's AdamW, no compiler needed"
    )

    @model_validator(mode="before")
    @classmethod
    def _prodigy_learning_rate(cls, data: Any) -> Any:
        """Prodigy's learning rate multiplies the step size it finds: 1.0, not AdamW's 1e-4, unless one is given."""
        if isinstance(data, dict) and data.get("optimizer") == "prodigy" and "learning_rate" not in data:
            return {**data, "learning_rate": 1.0}
        return data

    @field_validator("gradient_checkpointing")
    @classmethod
    def _fraction(cls, value: bool | float) -> bool | float:
        if not isinstance(value, bool) and not 0 < value <= 1:
            raise ValueError("must be true, false or a fraction of the blocks in (0, 1], e.g. 0.25")
        return value


class LoraConfig(_Section):
    rank: int = Field(128, ge=1)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    export_dtype: Literal["auto", "fp32"] = Field(
        "auto", description="precision of the exported LoRA (lora/, cogft export): auto = the model's (fp16 for 2B, "
        "bf16 for the others: half the size, as the model computes it); fp32 = the trained master weights as they "
        "are. Checkpoints keep fp32 either way, so a resume is exact")


class ValidationConfig(_Section):
    prompts: list[str] = []
    images: list[str] = Field([], description="image-to-video: one image file per prompt, in order (paths as "
                                              "written, relative to where cogft runs)")
    sizes: list[str] = Field([], description="one HEIGHTxWIDTH per prompt, in order, to render each at (e.g. a portrait "
                                             "prompt at 720x480); empty: the largest of data.buckets")
    prefix_prompts: bool = Field(True, description="put data.caption_prefix in front of each validation prompt too")
    every: int = Field(250, ge=1)
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(6.0, ge=1)
    seed: int = Field(0, **SEED_RANGE)
    fps: int = Field(8, ge=1)
    at_end: bool = True
    check_export: bool = Field(
        True, description="at the end of a finished run, load the export into a stock diffusers pipeline in a fresh "
        "process, render the first validation prompt as the final validation did, and report the pixel difference "
        "(a warning beyond rounding noise)")
    cache: Literal["none", "pab", "first_block", "taylorseer"] = Field(
        "none", description="approximate inference cache from diffusers (faster, not exact)"
    )

    @field_validator("sizes")
    @classmethod
    def _sizes_parse(cls, value: list[str]) -> list[str]:
        return [f"{h}x{w}" for h, w in map(parse_size, value)]


class EvalConfig(_Section):
    holdout: int | float = Field(
        0, description="clips kept out of training to measure the eval loss on: a count, or a fraction in (0, 1) of "
        "the clips (at least one); chosen from train.seed and each clip's bytes, so the same on every rank and "
        "resume; 0: no eval loss")
    every: int | None = Field(None, ge=1, description="steps between evaluations besides the one at each checkpoint "
                                                      "(every checkpoint is evaluated, so the best can be exported); "
                                                      "null: at checkpoints only")
    timesteps: list[int] | None = Field(
        None, min_length=1, description="the timesteps each held-out clip is scored at (each costs one forward pass "
        "per clip); null: one per clip, the clips' spread evenly over the schedule")

    @field_validator("holdout", mode="before")
    @classmethod
    def _not_a_flag(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("is a count of clips (e.g. 8) or a fraction in (0, 1) (e.g. 0.1), not true/false")
        return value

    @field_validator("holdout")
    @classmethod
    def _count_or_fraction(cls, value: int | float) -> int | float:
        if value == 0:
            return 0
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a fraction of the clips must be in (0, 1), e.g. 0.1; for a count write an integer, "
                             "e.g. 8")
        if value < 0:
            raise ValueError("must be 0 (no eval loss), a count of clips, or a fraction in (0, 1)")
        return value

    @field_validator("timesteps")
    @classmethod
    def _distinct_timesteps(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (min(value) < 0 or len(set(value)) < len(value)):
            raise ValueError("list distinct timesteps from 0 to the schedule's length - 1 (999 for CogVideoX), "
                             "e.g. [100, 500, 900]")
        return value


class TrackingConfig(_Section):
    report_to: Literal["wandb", "tensorboard", "none"] = Field(
        "wandb", description="wandb; tensorboard (event files in RUN/tensorboard/, pip install 'cogft[tensorboard]'); "
        "none. metrics.jsonl and report.html are written either way")
    push_to_hub: str | None = Field(
        None, description="OWNER/NAME: upload the final export (weights, model card, sample) to this Hugging Face "
        "model repository at the end of a finished run, creating it (public) if missing; needs a login "
        "(hf auth login or HF_TOKEN), checked before training")
    project: str = "cogft"
    run_name: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    log_every: int = Field(1, ge=1)


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = Field(min_length=1)

    @field_validator("output_dir")
    @classmethod
    def _a_folder_can_be_made(cls, value: str) -> str:
        path = Path(value)
        for place in (path, *path.parents):
            if place.exists() and not place.is_dir():
                raise ValueError(f"{place} is a file, not a folder; choose another output_dir")
        return value

    @model_validator(mode="after")
    def _validation_lists_pair(self) -> "Config":
        prompts = self.validation.prompts
        for key, what in (("images", "image"), ("sizes", "size")):
            given = getattr(self.validation, key)
            if given and len(given) != len(prompts):
                raise ValueError(f"validation.{key} has {len(given)} entries for {len(prompts)} validation.prompts; "
                                 f"give one {what} per prompt, in the same order")
        return self

    def validation_size(self, index: int) -> tuple[int, int]:
        """(height, width) of validation prompt `index`: its validation.sizes entry, else the largest bucket."""
        sizes = self.validation.sizes
        return parse_size(sizes[index]) if sizes else self.data.largest_size

    @model_validator(mode="after")
    def _fp8_base_is_for_lora(self) -> "Config":
        if self.model.fp8_base and self.train.mode != "lora":
            raise ValueError("model.fp8_base stores the frozen base weights in float8, and full fine-tuning (train.mode="
                             "sft) trains every weight; use train.mode=lora or model.fp8_base=false")
        return self

    @model_validator(mode="after")
    def _validation_can_run(self) -> "Config":
        if self.validation.prompts and self.validation.every > self.train.max_steps and not self.validation.at_end:
            raise ValueError(
                f"validation.every={self.validation.every} > train.max_steps={self.train.max_steps} with "
                "validation.at_end=false: no validation would ever run"
            )
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings → a nested dict; values are YAML-typed (3 → int, [a, b] → list)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=100")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            section = Config
            for part in item["loc"][:-1]:
                field = section.model_fields.get(str(part))
                section = field.annotation if field else section
            allowed = ", ".join(sorted(getattr(section, "model_fields", {})))
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (PyYAML keeps the last one without a word)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key, line = loader.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(f"line {line}: {key!r} is written a second time (first on line {first_line[key]}); "
                              "merge the two, the second would silently replace the first")
        first_line[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, validate. Relative data/model/output paths stay as written."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder, not a YAML file' if path.is_dir() else 'not found'}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    raw = _merge(raw, parse_overrides(overrides or []))
    return build_config(raw, source=str(path))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
