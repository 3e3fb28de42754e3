"""The schema of a run's configuration: every key, its type, default, bounds and description, validated by pydantic.

Each key's description is written here, once: docs/configuration.md is rendered from them (`config_reference.py`).
Reading the config from YAML with overrides, and the messages its mistakes give, are `config_file.py`'s.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .optimizers import CLASS_PATH, DEFAULT_OPTIMIZER, OPTIMIZERS, check_arguments, imported_class


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


SEED_RANGE = dict(ge=0, lt=2**32)  # what every seeded library takes (numpy's is the narrowest)
# stills in one batch, one forward pass: 64 at 480x720 feed about six 49-frame clips' tokens, each with its prompt
# embedding (about 2 MB of host memory); 100000 ran the host out of memory
IMAGE_BATCH_LIMIT = 64
MODE_SCALE_MAX = 1.75  # 2/(π−2) ≈ 1.752 rounded down: beyond it `mode` sampling's map from u to t is not monotone


SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[x×X]\s*(\d+)\s*$")
# aspect ratios (width / height) of `data.buckets: auto`: landscape, portrait and square, as phones and cameras shoot
AUTO_ASPECTS = (16 / 9, 3 / 2, 4 / 3, 1.0, 3 / 4, 2 / 3, 9 / 16)


def parse_size(text: str) -> tuple[int, int]:
    """"480x720" (height x width, as data.height / data.width) -> (480, 720); ValueError naming the form otherwise."""
    match = SIZE_PATTERN.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a size; write HEIGHTxWIDTH, e.g. 480x720")
    height, width = int(match[1]), int(match[2])
    if min(height, width) < 8:
        raise ValueError(f"{text}: a side under 8 pixels; the model's own rule (checked when it loads) is stricter")
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
    """The pipeline to fine-tune, and how it computes."""

    path: str = Field(description=(
        "a diffusers pipeline folder; a hub id (`THUDM/CogVideoX-2b`, `THUDM/CogVideoX-5b`, `THUDM/CogVideoX1.5-5B`, "
        "`THUDM/CogVideoX-5b-I2V`, `THUDM/CogVideoX1.5-5B-I2V`); `tiny://NAME` with NAME one of `2b`, `5b`, `5b-i2v`, "
        "`1.5-5b`, `1.5-5b-i2v` (tiny random test models, built on first use under `$COGFT_HOME`, default "
        "`~/.cache/cogft`); or `random://NAME` (a full-size pipeline with random weights built from the built-in real "
        "configurations, for benchmarking and end-to-end checks on a GPU, never for real training; the log says so). "
        "The variant is read from the pipeline's own configs, never from its name"))
    revision: str | None = Field(None, description="the hub revision (branch, tag or commit) of a hub id; null: the "
                                                   "default branch")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="precision of the frozen weights and of autocast: `auto` = the variant's (fp16 with "
        "loss scaling for 2B, bf16 for the others); trainable master weights are fp32 either way")
    attention: Literal["auto", "sdpa", "fa4"] = Field("auto", description=(
        "attention kernel for training, validation and `cogft sample`: `fa4` (FlashAttention-4, "
        "`pip install -e \".[fa4]\"`, Hopper/Blackwell GPUs, fp16/bf16; refused by name where it cannot run), `sdpa` "
        "(torch's; cuDNN on Hopper) or `auto` (fa4 where it can run, else sdpa; logged). Both are exact; `cogft "
        "sample` of a run trained with fa4 falls back to sdpa with a warning where fa4 cannot run"))
    fp8_base: bool | Literal["auto"] = Field(False, description=(
        "LoRA: store the frozen transformer's linear weights in float8 (e4m3), each row scaled by a power of two so "
        "that small weights keep e4m3's full precision, and read each layer's weight upcast to the model's dtype in "
        "its forward and again in its backward, which keeps the float8 weight rather than an upcast copy (ordinary "
        "ops that autograd and `torch.compile` see: diffusers' layerwise-casting hooks broke the compiled, "
        "checkpointed backward). Every linear layer but the patch embedding's: 99.7 % of the 5B model's weights at "
        "about 1 byte instead of 2 (`cogft estimate` counts it). The prediction moves by 2.9 % (5B, bf16) and 3.1 % "
        "(2B, fp16) on random weights, half the 5.8 % of a plain cast that leaves the norm modulation in bf16 as "
        "diffusers does; `cogft bench --fp8-error` measures it on your `model.path`. The adapter's fp32 weights stay "
        "as they are. Refused for `train.mode: sft` and under DeepSpeed/FSDP. The export is the LoRA as usual, "
        "loaded into the stock pipeline in its normal dtype (the export check stores that pipeline's base in float8 "
        "too, as training rendered it). `auto`: float8 only where the memory plan (`train.memory_budget_gib`) is "
        "faster with it; the run logs and saves the choice"))
    control: bool = Field(False, description=(
        "train a control model from a text-to-video one (2B, 5B, 1.5-5B): the patch embedding gets input channels for "
        "a control video's latents, placed after the video's as diffusers' CogVideoX-Fun control pipeline places them, "
        "with zero weights (step 0 predicts exactly what the base model does), and trains whole beside the LoRA (or "
        "with the rest in `sft`). Each clip needs a control video (`data.control`, `controls.txt`, "
        "`data.control_column`) and each validation prompt one (`validation.controls`). The export holds the LoRA "
        "and the widened embedding (`trained_modules.safetensors`); `cogft export --merge` writes a folder that "
        "control pipeline loads. CogVideoX 1.5 then takes 8k+5 frames (an even latent count: that "
        "pipeline pads none). A CogVideoX-Fun Control folder (`alibaba-pai/CogVideoX-Fun-V1.1-5b-Pose`) already takes "
        "control videos: leave this out for it"))

def folder_can_be_made(value: str, key: str) -> str:
    """A folder path a key names, refused where a file stands on it (found at the first write, after the work)."""
    path = Path(value)
    for place in (path, *path.parents):
        if place.exists() and not place.is_dir():
            raise ValueError(f"{place} is a file, not a folder; choose another {key}")
    return value


BucketsValue = list[str] | Literal["auto"] | None


def bucket_list(value: list[str] | str | None) -> list[str] | str | None:
    """A `buckets` key's sizes as HEIGHTxWIDTH, each once (`auto` and null as they are)."""
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


class DataSetConfig(_Section):
    """One source of `data.sets`: its own clips, how often an epoch draws them, and what they train towards."""

    path: str = Field(description="what `data.path` takes: a folder, a `.csv` / `.jsonl` list or an "
                                  "`hf://datasets/...` path; the set's columns are `data.*_column`'s")
    kind: Literal["clips", "prior"] = Field("clips", description=(
        "`clips`: trained towards its clips, as `data.path` is; `prior` (LoRA only): its samples train the adapter "
        "towards the base model's own prediction for them (the adapter switched off, no gradient), so the LoRA "
        "keeps the base model on prompts without the trigger word. Logged as `loss/prior`, weighted by "
        "`data.prior_weight`"))
    repeats: int | None = Field(None, ge=1, description=(
        "each sample of the set this many times an epoch (musubi-tuner's `num_repeats`); null: 1 unless `weight` "
        "is given. Not with `weight`"))
    weight: float | None = Field(None, gt=0, description=(
        "the set's share of an epoch's samples instead of a count: where every set has a weight they are relative "
        "shares of as many samples as the sets hold together; beside sets with repeats, a share of the whole epoch "
        "(the weights then sum to less than 1, the sets with repeats fill the rest). Drawn without replacement, a "
        "different subset each epoch from (seed, epoch); per bucket in proportion, so an epoch's batches stay the "
        "same. Not with `repeats`"))
    caption_prefix: str | None = Field(None, description="put in front of this set's captions, as "
                                                         "`data.caption_prefix` (null: that key's; `\"\"` for none, "
                                                         "e.g. a prior set without the trigger word)")
    buckets: BucketsValue = Field(None, description="this set's resolution buckets, as `data.buckets` takes them; "
                                                    "null (or left out): `data.buckets`")

    @field_validator("buckets")
    @classmethod
    def _sizes_parse(cls, value: list[str] | str | None) -> list[str] | str | None:
        return bucket_list(value)

    @model_validator(mode="after")
    def _one_count(self) -> DataSetConfig:
        if self.repeats is not None and self.weight is not None:
            raise ValueError(f"repeats={self.repeats} and weight={self.weight}: give one (repeats: a count per sample "
                             "and epoch; weight: the set's share of the epoch)")
        return self


class DataConfig(_Section):
    """The clips and captions, and how prepare turns them into the cache that training reads (data/README.md)."""

    path: str | None = Field(None, description=(
        "folder with `prompts.txt` + `videos.txt`, a folder of clips (and still images) with a `.txt` caption beside "
        "each, a folder with `metadata.csv` / `metadata.jsonl`, or a `.csv` / `.jsonl` file; clip paths are relative "
        "to it. `hf://datasets/OWNER/NAME[@REVISION][/SUBFOLDER]` reads a Hugging Face dataset repo, fetched once "
        "into the Hub cache (offline runs read the cache). Required unless `data.sets` lists the sources (then "
        "left out): the one-set shorthand"))
    sets: list[DataSetConfig] | None = Field(None, min_length=1, description=(
        "several sources mixed into one epoch (instead of `data.path`), each with its own `path`, `repeats` or "
        "`weight`, `caption_prefix`, `buckets` and `kind` (`clips` or `prior`): e.g. `[{path: clips/subject, "
        "repeats: 4}, {path: clips/style, weight: 0.2}, {path: clips/prior, kind: prior, caption_prefix: \"\"}]`. "
        "Each set is prepared on its own (the report and `cogft doctor` count per set) and a batch holds one set "
        "kind and one bucket; the order stays a pure function of (seed, epoch), so a resume is exact. "
        "data/README.md, \"Several sets and a prior\""))
    prior_weight: float = Field(1.0, gt=0, description=(
        "the loss of a `kind: prior` batch is multiplied by this before its backward pass: the step trains on "
        "`loss` (clip batches) + `prior_weight` × `loss/prior` (prior batches), each logged unweighted"))
    video_column: str = Field("video", description="the CSV/JSONL column with each clip's path (a Hub-style "
                                                   "metadata file's `file_name` column is read when this is left "
                                                   "`video` and the file has no such column)")
    caption_column: str = Field("caption", description="the CSV/JSONL column with each clip's caption")
    image_column: str = Field("image", description="image-to-video: the CSV/JSONL column naming each clip's "
                                                   "conditioning image (empty or absent: the clip's first frame); a "
                                                   "name other than `image` must be a column the list has")
    control_column: str = Field("control", description="control models: the CSV/JSONL column naming each clip's "
                                                       "control video; a name other than `control` must be a column "
                                                       "the list has")
    mask_column: str = Field("mask", description=(
        "the CSV/JSONL column naming each clip's loss mask (empty or absent: none, the whole frame counts), as "
        "`masks.txt` does beside `videos.txt`: an image (one mask for the whole clip) or a video (read as the clip "
        "is, frame by frame), grey levels as weights (white 1, black 0) on the loss, so a LoRA learns the subject "
        "and not the background; a name other than `mask` must be a column the list has. data/README.md, "
        "\"Loss masks\""))
    control: Literal["canny"] | None = Field(None, description=(
        "control models: make each clip's control video from the clip itself in prepare, from the very frames it "
        "trains on: `canny` (edges, kornia's Canny on the prepare device; `pip install cogft[control]`). null: each "
        "clip's control video is given, in `controls.txt` (paired line by line with `videos.txt`) or the "
        "`data.control_column` column; it is read like its clip (same frames by time, same resize and crop) and must "
        "cover the clip's frames and have its aspect ratio. With an extractor, `validation.controls` and `cogft sample "
        "--control` are source videos it runs on"))
    canny_thresholds: tuple[float, float] = Field((0.1, 0.2), description=(
        "`data.control: canny`: the low and high hysteresis thresholds on the gradient magnitude of frames in [0, 1] "
        "(kornia's); lower finds more edges"))
    num_frames: int = Field(49, ge=1, description=(
        "frames per clip, 4k+1 (8k+1 such as 9, 17, 49 decode back to the same length): the largest frame bucket. "
        "Left out: the model's (49; 81 for 1.5; 5B-I2V takes 49 only)"))
    min_frames: int | None = Field(None, ge=1, description=(
        "the shortest frame bucket (4k+1, at most `data.num_frames`): shorter clips are skipped, longer ones train "
        "in the largest bucket they fill (`data.num_frames`, each 8k+1 count below it, `data.min_frames`); null: "
        "min(17, `data.num_frames`), and `data.num_frames` for 5B-I2V"))
    height: int = Field(480, ge=8, description="training height, a multiple of 16 (and the base of `data.buckets: "
                                               "auto`). Left out: the model's (480; 768 for 1.5; 5B-I2V takes 480 "
                                               "only)")
    width: int = Field(720, ge=8, description="training width, a multiple of 16. Left out: the model's (720; 1360 "
                                              "for 1.5; 5B-I2V takes 720 only)")
    fps: float | None = Field(8.0, gt=0, description="resample clips to this frame rate before taking frames (a "
                                                     "clip is never sampled faster than its own rate); null takes "
                                                     "consecutive frames. Left out: the model's (8; 16 for 1.5)")
    resize: Literal["crop", "fit"] = Field("crop", description="`crop` (cover, then centre-crop) or `fit` (letterbox "
                                                               "with black bars); no distortion either way")
    windows: int = Field(1, ge=1, le=64, description=(
        "windows of `data.num_frames` per clip, spread evenly from its start to its end, each encoded once; each "
        "epoch trains on one, drawn at random from (seed, epoch, clip), so long clips are seen whole and a resume "
        "stays exact. 1 = the clip's start; raising it keeps that entry and encodes only the new windows"))
    cache_dir: str | None = Field(None, description="where prepare keeps latents and prompt embeddings "
                                                    "(content-hashed, shared by runs); null: `$COGFT_HOME/cache`")
    vae_tiling: bool = Field(False, description="tile the VAE during prepare's encoding and validation's decoding "
                                                "(less memory, a little slower)")
    compile_vae: bool | Literal["auto"] = Field("auto", description=(
        "`torch.compile` the VAE encoder during prepare: faster encoding after a one-time compile; `auto` = on CUDA "
        "when at least 600 clips are to be encoded, where it pays off"))
    decode_workers: int = Field(2, ge=1, description="processes decoding clips during prepare and doctor (a decoder "
                                                     "crash costs one clip, not the run)")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes reading the cache during "
                                                         "training")
    image_noise_draws: int = Field(4, ge=1, le=64, description=(
        "image-to-video: noisy encodings of each conditioning image that prepare caches (pixel noise of "
        "σ = exp(N(−3, 0.5²)), the reference recipe); each step trains on one, drawn at random. Each costs about one "
        "latent frame's encode"))
    image_dropout: float = Field(0.05, ge=0, le=1, description=(
        "image-to-video: fraction of samples trained with the image latents zeroed, drawn per sample from the "
        "seeded generators (the reference recipe's 0.05)"))
    caption_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "fraction of samples trained on the empty prompt (the one guidance's negative half uses), drawn per sample "
        "from the seeded generators, so a resume stays exact"))
    caption_prefix: str = Field("", description=(
        "put in front of every caption before it is embedded, e.g. a trigger word (`sks,` makes \"a dog runs\" "
        "\"sks, a dog runs\"), unless the caption begins with it already; a CSV/JSONL `id_token` column adds a "
        "per-clip trigger word the same way. Part of the cache key. Empty or missing captions are still skipped"))
    trigger: str | None = Field(None, description=(
        "a trigger word or phrase the captions already contain, anywhere in them (`ohwx` in \"a photo of ohwx man "
        "walking\"), for the held-out eval's `eval/trigger_gain` and `quality/bleed` (docs/quality.md): the captions "
        "are scored and the prompts predicted with it taken out as well, matched as whole words, case and all. Nothing "
        "is added to any caption (`data.caption_prefix` and the `id_token` column are triggers too, taken out the "
        "same way). A trigger no caption contains is refused before anything is encoded; captions without it are "
        "counted in the log. null: none beside the prefix and id tokens"))
    buckets: BucketsValue = Field(None, description=(
        "resolution buckets as HEIGHTxWIDTH, e.g. `[480x720, 720x480, 576x576]`: each clip or image trains at the one "
        "nearest its aspect ratio, without distortion (batches hold one bucket; the sampler's order, and so a "
        "resume, stays exact); `auto`: `data.height`×`data.width` plus one size per common aspect ratio from 16:9 "
        "to 9:16 at about its area; null: `data.height`×`data.width` only"))
    image_batch_size: int | None = Field(None, ge=1, description=(
        f"batch size of still images listed beside the clips (one-frame samples, far cheaper than clips), at most "
        f"{IMAGE_BATCH_LIMIT}: a batch is one forward pass, and {IMAGE_BATCH_LIMIT} stills at 480×720 already feed "
        "about six 49-frame clips' tokens (for more per optimizer step, raise `train.gradient_accumulation_steps`); "
        "null: `train.batch_size`"))

    @field_validator("trigger")
    @classmethod
    def _trigger_is_a_word(cls, value: str | None) -> str | None:
        if value is not None and (not any(c.isalnum() for c in value) or value != value.strip() or "\n" in value):
            raise ValueError(f"{value!r} is not a trigger word: give the word or phrase as the captions write it "
                             "(letters or digits, no surrounding spaces, one line), e.g. ohwx; or leave the key out")
        return value

    @field_validator("cache_dir")
    @classmethod
    def _cache_folder_can_be_made(cls, value: str | None) -> str | None:
        return value if value is None else folder_can_be_made(value, "data.cache_dir")

    @field_validator("canny_thresholds")
    @classmethod
    def _thresholds_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high < 1:
            raise ValueError(f"[{low}, {high}]: give [low, high] with 0 < low < high < 1 (gradient magnitudes of "
                             "frames in [0, 1]), e.g. [0.1, 0.2]")
        return value

    @field_validator("image_batch_size")
    @classmethod
    def _image_batch_bound(cls, value: int | None) -> int | None:
        if value is not None and value > IMAGE_BATCH_LIMIT:
            raise ValueError(f"at most {IMAGE_BATCH_LIMIT} stills go in one batch (one forward pass; "
                             f"{IMAGE_BATCH_LIMIT} at 480x720 already feed about six 49-frame clips' tokens); for more "
                             "stills per optimizer step raise train.gradient_accumulation_steps")
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
        return bucket_list(value)

    @model_validator(mode="after")
    def _path_or_sets(self) -> DataConfig:
        if self.sets is None and self.path is None:
            raise ValueError("data.path: required key is missing (or list the sources in data.sets)")
        if self.sets is not None and self.path is not None:
            raise ValueError("data.path and data.sets are both given: list data.path's source as one of data.sets "
                             "(data.path is the one-set shorthand)")
        if self.sets is not None:
            weighted = [s.weight for s in self.sets if s.weight is not None]
            if weighted and len(weighted) < len(self.sets) and sum(weighted) >= 1:
                raise ValueError(f"data.sets: the weights sum to {sum(weighted):g}, but beside sets with repeats a "
                                 "weight is a share of the whole epoch and the sets with repeats fill the rest; "
                                 "make the weights sum to less than 1, or give every set a weight")
            if all(s.kind == "prior" for s in self.sets):
                raise ValueError("data.sets: every set is kind: prior, which only keeps the base model; add a set of "
                                 "kind: clips to train on")
        return self

    def sizes_of(self, buckets: list[str] | str | None) -> tuple[tuple[int, int], ...]:
        """The training sizes (height, width) a `buckets` value gives, in the order given (auto: the configured size
        first)."""
        if buckets is None:
            return ((self.height, self.width),)
        if buckets == "auto":
            return auto_sizes(self.height, self.width)
        return tuple(parse_size(size) for size in buckets)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The training sizes (height, width), in the order given (auto: the configured size first); with
        `data.sets`, every set's, `data.buckets`' first."""
        sizes = self.sizes_of(self.buckets)
        for data_set in self.sets or ():
            if data_set.buckets is not None:
                sizes += tuple(s for s in self.sizes_of(data_set.buckets) if s not in sizes)
        return sizes

    @property
    def largest_size(self) -> tuple[int, int]:
        """The size with the most pixels (the first of equals): memory budgets and validation plan for it."""
        return max(self.sizes, key=lambda size: size[0] * size[1])

    @property
    def shortest_bucket(self) -> int:
        return self.min_frames if self.min_frames is not None else min(17, self.num_frames)


class TrainConfig(_Section):
    """The optimization: mode, steps, optimizer, checkpoints, and what makes a step fast or small."""

    mode: Literal["lora", "sft"] = Field("lora", description="`lora` (adapters on `lora.target_modules`) or `sft` "
                                                             "(the whole transformer)")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1, description="clips per micro-batch per process")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(1e-4, gt=0, description="the optimizer's learning rate (Prodigy's multiplier of "
                                                         "the step size it finds: 1.0 unless set)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="the learning rate's schedule over `train.max_steps`")
    lr_warmup_steps: int = Field(0, ge=0, description="warm-up steps")
    weight_decay: float = Field(1e-4, ge=0, description="decoupled weight decay (every optimizer)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="the first moment's decay (every optimizer)")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="the second moment's decay (every optimizer)")
    adam_epsilon: float = Field(1e-8, gt=0, description="the optimizer's epsilon")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (not with `adamw_bf16`, which updates "
                                                        "during the backward pass; the norm is still logged)")
    seed: int = Field(42, **SEED_RANGE, description="seeds data order, windows, noise and timesteps (per step and "
                                                     "rank, so a resume is exact) and the held-out clips")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (also written at the end and on "
                                                         "SIGINT/SIGTERM)")
    checkpoints_keep: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted, except the "
                                                       "one `best.json` names")
    resume: str | None = Field("latest", description=(
        "`latest` (the newest complete checkpoint, or a fresh start when there is none), null (start fresh; refused "
        "when the run dir holds checkpoints) or a checkpoint folder"))
    gradient_checkpointing: bool | float = Field(False, description=(
        "recompute activations in the backward pass: `true` (all blocks), `false`, or a fraction of the blocks in "
        "(0, 1] such as `0.25` (only as much memory saving as you need)"))
    offload_checkpoints: bool = Field(False, description=(
        "keep the checkpointed blocks' inputs in pinned host memory until the backward pass (with "
        "`train.gradient_checkpointing: true`: lean mode for small GPUs)"))
    blocks_to_swap: NonNegativeInt | Literal["auto", "all"] = Field(0, description=(
        "LoRA: keep the frozen weights of this many transformer blocks (the first ones; `all`: every block) in "
        "pinned host memory and copy each block's to the GPU on a side stream just before it runs, in the forward "
        "and again for the backward's recompute, overlapped with the compute (only host-to-device copies: the host "
        "copy is the master); at most two blocks' weights are on the GPU at once. A swapped block is also "
        "checkpointed (its inputs offloaded with `train.offload_checkpoints`). The numbers are the same bit for bit; "
        "the cost is PCIe time the compute does not hide (`cogft estimate` predicts it). `auto`: the fewest that "
        "`cogft estimate` predicts fit `train.memory_budget_gib` (without one, as its `auto`; none on a CPU). One "
        "process only; not for `train.mode: sft` (both refused by key)"))
    memory_budget_gib: PositiveFloat | Literal["auto"] | None = Field(None, description=(
        "when set, ignore the three keys above and use the fastest checkpointing/offloading/block swapping that "
        "`cogft estimate` predicts fits this many GiB (logged at start); `auto` = 90 % of the GPU's memory, and at "
        "most all but 0.75 GiB of it (on a small card the allocator's fragments need that; on a CPU, "
        "the three keys as written). `cogft estimate --gpu G` shows what a budget picks on that GPU"))
    compile: bool | Literal["auto"] = Field("auto", description="`torch.compile` each transformer block; `auto` = on "
                                                                "CUDA GPUs (a compile at start, faster steps)")
    compile_autotune: bool = Field(False, description=(
        "tune the compiled blocks' fused kernels (inductor's coordinate-descent tuning): slightly faster steps for a "
        "longer compile at start, cached on disk for later runs; worth it for long runs"))
    allow_tf32: bool = Field(True, description="TF32 matmuls on NVIDIA GPUs")
    ema_decay: float | None = Field(None, gt=0, lt=1, description=(
        "keep an exponential moving average of the trained weights (e.g. 0.999; fp32, on the GPU for a LoRA, in host "
        "memory for full fine-tuning), updated after every step the optimizer took and saved in checkpoints (a resume "
        "stays exact); validation videos and the export use it, and the trained weights are exported beside it in "
        "`raw/lora/` or `raw/transformer/`. Checkpoints hold the trained weights. Not with DeepSpeed or FSDP (refused "
        "by key); null: off"))
    optimizer: str = Field(  # a name of the optimizer table, or an import path
        DEFAULT_OPTIMIZER, description=" ".join(entry.describe() for entry in OPTIMIZERS.values()) + (
            " Or any torch optimizer by its import path `module.Class` (e.g. `torch.optim.Adafactor`), built with "
            "`train.learning_rate` as its `lr` and `train.optimizer_args` as its other keyword arguments (the "
            "`train.adam_*` and `train.weight_decay` keys are AdamW's and are not passed to it). "
            "Every optimizer's state is in each checkpoint, so a resume is exact; one that cannot run here (no GPU "
            "for `adamw8bit`, the package missing, a DeepSpeed config that offloads the optimizer, a path that does "
            "not import or is no `torch.optim.Optimizer`) is refused before prepare, naming the fix"))
    optimizer_args: dict[str, Any] = Field({}, description=(
        "keyword arguments of an import-path `train.optimizer`, e.g. `{beta2_decay: -0.8, eps: [null, 0.001]}` for "
        "`torch.optim.Adafactor`; checked before prepare against its signature and by building it once on a small "
        "CPU weight (a value it refuses is refused by key). The named optimizers take their settings from the "
        "`train.*` keys instead (refused here)"))
    cpu_adam: Literal["auto", "torch"] = Field("auto", description=(
        "with `accelerate_configs/deepspeed_zero2_offload.yaml` (the optimizer in host memory): `auto` = DeepSpeed's "
        "CPUAdam, compiled on first use (needs g++ and the Python headers), else torch's AdamW with a warning; "
        "`torch` = torch's AdamW, no compiler needed"))
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field("uniform", description=(
        "which of the scheduler's timesteps (0 to 999 for CogVideoX; larger is noisier) each sample trains on: "
        "`uniform` (every "
        "one alike, the reference recipe), `logit_normal` (most in the middle of the range, fewer at both ends, as "
        "SD3 trains; shaped by `train.logit_mean` / `train.logit_std`) or `mode` (a peak in the middle with heavy "
        "tails, by `train.mode_scale`). The draw is seeded per sample, so a resume stays exact; the held-out eval "
        "keeps its own fixed timesteps"))
    logit_mean: float = Field(0.0, description=(
        "`logit_normal`'s centre on the logit scale: 0 centres the draws on the middle of the range, a positive value "
        "moves them towards noisier timesteps (composition and motion), a negative one towards cleaner ones (detail)"))
    logit_std: float = Field(1.0, gt=0, description=(
        "`logit_normal`'s spread on the logit scale: smaller concentrates the draws around the centre, larger spreads "
        "them towards both ends"))
    mode_scale: float = Field(1.29, ge=-1, le=MODE_SCALE_MAX, description=(
        "`mode`'s shape: 0 is uniform, positive values favour the middle of the range (1.29, SD3's: the middle about "
        "9× as often as the ends), negative ones the ends"))
    min_timestep: int = Field(0, ge=0, description=(
        "the lowest timestep trained (with `train.max_timestep`: train only part of the schedule, e.g. 0-400 for a "
        "LoRA of fine detail and texture, 600-999 for coarse motion and composition). The sampler's shape is "
        "squeezed into the range; a range outside the model's schedule is refused before prepare"))
    max_timestep: int | None = Field(None, ge=0, description=(
        "the highest timestep trained (see `train.min_timestep`); null: the schedule's last (999)"))
    loss: Literal["mse", "huber"] = Field("mse", description=(
        "the error on each latent element of the predicted clean latents: `mse` (squared, the reference recipe) or "
        "`huber` (pseudo-Huber 2c·(√(r²+c²)−c): squared for small errors, growing only linearly for large ones, so "
        "a few odd frames or clips pull the LoRA less)"))
    huber_c: float = Field(0.1, gt=0, description=(
        "`huber`'s constant c, in latent units: errors well below it count as squared, above it linearly; larger is "
        "closer to `mse`"))
    loss_weighting: Literal["reference", "none", "min_snr"] = Field("reference", description=(
        "the weight of each sample's error by its timestep t (SNR = ᾱ_t/(1−ᾱ_t)): `reference` 1/(1−ᾱ_t), the "
        "reference recipe (the velocity's squared error); `none` 1 (the clean latents' error: clean timesteps count "
        "less); `min_snr` min(SNR, `train.min_snr_gamma`) (Min-SNR-γ for this v-prediction model: the nearly clean "
        "timesteps, which dominate `reference`, capped: the Min-SNR paper's faster convergence; the last timestep, "
        "where nothing of the clip is left, weighs 0). The held-out eval "
        "scores with `mse` and `reference` whatever is set here, so runs that differ here compare on it"))
    min_snr_gamma: float = Field(5.0, gt=0, description=(
        "`min_snr`'s cap γ on the weight (5 as in the Min-SNR paper); smaller weighs noisy timesteps relatively more"))

    @model_validator(mode="before")
    @classmethod
    def _optimizer_learning_rate(cls, data: Any) -> Any:
        """An optimizer whose learning rate means something else brings its default (Prodigy's multiplies the step
        size it finds: 1.0, not AdamW's 1e-4), unless one is given."""
        name = data.get("optimizer") if isinstance(data, dict) else None
        entry = OPTIMIZERS.get(name) if isinstance(name, str) else None
        if entry is not None and entry.learning_rate is not None and "learning_rate" not in data:
            return {**data, "learning_rate": entry.learning_rate}
        return data

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value in OPTIMIZERS:
            return value
        if not CLASS_PATH.match(value):
            names = ", ".join(f"'{name}'" for name in OPTIMIZERS)
            raise ValueError(f"'{value}' is neither one of {names} nor an import path `module.Class` such as "
                             "torch.optim.Adafactor")
        imported_class(value)  # imports it: an unknown path or a class that is no optimizer is refused here
        return value

    @field_validator("optimizer_args")
    @classmethod
    def _args_fit(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("optimizer")
        if name is None:  # the optimizer itself was refused
            return value
        if name in OPTIMIZERS:
            if value:
                raise ValueError(f"train.optimizer={name} takes its settings from the train.* keys "
                                 "(learning_rate, adam_beta1/2, adam_epsilon, weight_decay); optimizer_args is for an "
                                 "import-path optimizer such as torch.optim.Adafactor: leave it empty")
            return value
        check_arguments(imported_class(name), value, info.data.get("learning_rate", 1e-4))
        return value

    @field_validator("gradient_checkpointing")
    @classmethod
    def _fraction(cls, value: bool | float) -> bool | float:
        if not isinstance(value, bool) and not 0 < value <= 1:
            raise ValueError("must be true, false or a fraction of the blocks in (0, 1], e.g. 0.25")
        return value

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainConfig:
        if self.max_timestep is not None and self.min_timestep > self.max_timestep:
            raise ValueError(f"train.min_timestep={self.min_timestep} is above train.max_timestep={self.max_timestep}; "
                             "give the lowest timestep to train as min and the highest as max (both are trained)")
        return self


class LoraConfig(_Section):
    """The adapters of `train.mode: lora`."""

    rank: int = Field(128, ge=1, description="LoRA rank (saved with the weights)")
    alpha: float = Field(64, gt=0, description="LoRA alpha: the update is scaled by alpha / rank (saved with the "
                                               "weights)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (`lora`/`dora`; LoHa and LoKr have none: "
                                                        "refused for them)")
    type: Literal["lora", "dora", "loha", "lokr"] = Field("lora", description=(
        "the adapter, through peft: `lora` (low-rank B·A), `dora` (LoRA plus a learned magnitude per output row; "
        "each forward also normalises the adapted weight, a little slower and closer to full fine-tuning), "
        "`loha` (Hadamard product of two low-rank pairs) or `lokr` (Kronecker product; far fewer weights). "
        "`lora` and `dora` export in the diffusers format the stock pipeline's `load_lora_weights` reads; `loha` "
        "and `lokr` export peft's own files (`adapter_model.safetensors` + `adapter_config.json`, which "
        "`load_lora_weights` refuses rather than loading as nothing) and load with peft, or merged "
        "(`cogft export --merge`) as a stock pipeline. docs/adapters.md says which to pick"))
    rslora: bool = Field(False, description=(
        "rank-stabilised scaling (peft's `use_rslora`): the update is scaled by alpha / sqrt(rank) instead of alpha / "
        "rank, so a high rank still learns at the rate of a low one. `lora`/`dora` only (saved with the weights)"))
    plus_ratio: float | None = Field(None, gt=0, description=(
        "LoRA+: the learning rate of the B matrices (`lora_B`, the ones that start at zero) as a multiple of the A "
        "matrices' (and DoRA's magnitudes'), which keep `train.learning_rate`; its authors suggest 16. Two "
        "optimizer param groups; `lora`/`dora` only (LoHa's and LoKr's factors have no A/B roles: refused). null: "
        "one learning rate"))
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description=(
        "transformer modules that get adapters; names that match no linear layer are refused before prepare"))
    export_dtype: Literal["auto", "fp32"] = Field("auto", description=(
        "precision of the shared LoRA (`lora/`, `cogft export`): `auto` = the model's (fp16 for 2B, bf16 for the "
        "others; half the size of fp32, as the model computes it), `fp32` = the trained master weights. Its "
        "safetensors metadata names the base model, cogft's version, the rank, alpha and target modules. "
        "Checkpoints keep fp32 either way, so a resume is exact"))
    export_format: list[Literal["diffusers", "comfyui", "kohya"]] = Field(["diffusers"], min_length=1, description=(
        "the LoRA files of an export (`lora/`, `cogft export`; `cogft export --format` overrides it), one or a list: "
        "`diffusers` (always written: `pytorch_lora_weights.safetensors`, the stock `load_lora_weights`), `comfyui` "
        "(`lora_comfyui.safetensors`: ComfyUI's own LoRA loader, its model's layer names), `kohya` "
        "(`lora_kohya.safetensors`: `lora_unet_` keys on the diffusers layer names, as kijai's "
        "ComfyUI-CogVideoXWrapper merges them for the stock and the Fun models): the same weights in "
        "`lora.export_dtype`, each layer's alpha beside them, so they load at the trained strength. A format that "
        "cannot load the `lora.type` as trained is refused before prepare "
        "(`comfyui`: lora, loha, lokr; `kohya`: lora). docs/adapters.md says which file to use where"))

    @field_validator("export_format", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _lora_keys_fit_the_type(self) -> LoraConfig:
        if self.type in ("loha", "lokr"):
            for key, value, off in (("rslora", self.rslora, False), ("plus_ratio", self.plus_ratio, None),
                                    ("dropout", self.dropout, 0.0)):
                if value != off:
                    raise ValueError(f"lora.{key}={value} is for lora.type=lora or dora; peft's {self.type} has no "
                                     f"such setting (its factors have no A/B roles or input dropout): set "
                                     f"lora.{key}={'null' if off is None else str(off).lower()} or lora.type=lora")
        return self


class ValidationConfig(_Section):
    """Videos rendered during training from the model being trained, and the check of the export at the end; the
    rendering keys are also `cogft sample`'s defaults."""

    prompts: list[str] = Field([], description="prompts rendered during training (embedded during prepare)")
    images: list[str] = Field([], description=(
        "image-to-video (required there with prompts): one start image per prompt, in order, cropped to the "
        "training size as the clips are; paths relative to where cogft runs"))
    controls: list[str] = Field([], description=(
        "control models (required there with prompts): one control video per prompt, in order, read at the prompt's "
        "size and frame count as clips are (with `data.control` set: a source video the extractor runs on); paths "
        "relative to where cogft runs"))
    sizes: list[str] = Field([], description=(
        "one HEIGHTxWIDTH per prompt, in order, to render it at (a portrait prompt at `720x480`); empty: the largest "
        "of `data.buckets` (or `data.height`×`data.width`)"))
    prefix_prompts: bool = Field(True, description="put `data.caption_prefix` in front of each validation prompt too")
    every: int = Field(250, ge=1, description="steps between validations")
    num_inference_steps: int = Field(50, ge=1, description="denoising steps")
    guidance_scale: float = Field(6.0, ge=1, description="classifier-free guidance scale")
    seed: int = Field(0, **SEED_RANGE, description="seed of the first prompt (the next ones use seed+1, ...)")
    fps: int = Field(8, ge=1, description="frame rate of the written mp4")
    at_end: bool = Field(True, description="also validate after the last step")
    check_export: bool = Field(True, description=(
        "at the end of a finished run with validation prompts, load the export (`lora/` or `transformer/`) into a "
        "stock diffusers pipeline in a fresh process; render the first prompt with the final validation's seed, "
        "size, steps and guidance and compare with the in-training frames (not the lossy mp4), and predict once on a "
        "fixed input (the first prompt, timestep 500, noise from `validation.seed`) that the trained model predicted "
        "on before it was let go. The verdict is the prediction's: within 3× the kernel noise, which a LoRA run "
        "measures in place with the adapter off on both sides (at least 0.001 %), or within 2 % for full "
        "fine-tuning on GPUs (0.001 % on CPUs). Renders are reported, not judged: 50 denoising steps amplify kernel "
        "rounding (a correct tiny-5B export renders 1.4 levels off on an H200, more than its weak LoRA's effect). "
        "It warns when the export does not reproduce the trained model. With `model.fp8_base` the stock base is "
        "stored in float8 too, as training had it. Needs the final validation (`validation.at_end`); costs two "
        "forwards in training, then one process start, two renders of one video and two forwards, after the trainer "
        "has let go of its model. Off in the tiny configs"))
    cache: Literal["none", "pab", "first_block", "taylorseer"] = Field("none", description=(
        "approximate inference cache from diffusers, faster and not exact: `taylorseer` (the whole transformer on "
        "steps 0-2 and every 4th step, the rest predicted by a first-order Taylor expansion), `pab` (pyramid "
        "attention broadcast), `first_block` (first-block cache). Check a sample against `none` first"))

    @field_validator("sizes")
    @classmethod
    def _sizes_parse(cls, value: list[str]) -> list[str]:
        return [f"{h}x{w}" for h, w in map(parse_size, value)]


class EvalConfig(_Section):
    """The held-out eval loss: clips kept out of training, scored at fixed timesteps with fixed noise."""

    holdout: int | float = Field(0, description=(
        "clips kept out of training to measure a held-out eval loss on: a count (`8`) or a fraction in (0, 1) "
        "(`0.1`, at least one clip); chosen from `train.seed` and each clip's bytes (and its given image's), not "
        "the listing order, so the same on every rank and on resume; the same video listed twice goes out whole. "
        "Refused when it would leave no clip to train on. 0: off"))
    every: int | None = Field(None, ge=1, description=(
        "steps between evaluations besides the one at each checkpoint (every checkpoint, the last included, is "
        "evaluated, so the best can be exported; a Ctrl-C's checkpoint is not); null: at checkpoints only"))
    timesteps: list[int] | None = Field(None, min_length=1, description=(
        "the timesteps each held-out clip is scored at, e.g. `[100, 300, 500, 700, 900]` (each costs one forward pass "
        "per clip and evaluation); null: one per clip, the clips' spread evenly over the schedule, so 8 clips cost 8 "
        "forward passes (a LoRA's base model is scored once more, at the first evaluation: its weights do not "
        "change). The noise is fixed per "
        "clip and timestep, independent of the training step"))

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
            raise ValueError("list distinct timesteps from 0 to the schedule's length - 1 (999 for 1000 steps), "
                             "e.g. [100, 500, 900]")
        return value


class QualityConfig(_Section):
    """What makes a LoRA checkpoint acceptable: the limits of the quality measures the run logs, which the summary and
    report warn about and the recommended checkpoint (`cogft export --recommended`) must keep to."""

    motion: bool = Field(True, description=(
        "the motion guard of LoRA runs with `validation.prompts`: each prompt is also rendered with the adapter off at "
        "the same seed, size, steps and guidance, once per run (kept in `samples/base/` with its motion in "
        "`samples/base/motion.json`; a resume or a later validation renders it again only if those settings "
        "change), and every validation logs `quality/motion_ratio`. Costs one more render per prompt per run and "
        "about a second of CPU per validation video; needs OpenCV (`opencv-python-headless`, a dependency of cogft), "
        "refused before prepare without it. false: no base renders, no motion ratio"))
    min_motion_ratio: float = Field(0.7, ge=0, description=(
        "the least acceptable `quality/motion_ratio`: the validation videos' motion (mean optical-flow magnitude, "
        "OpenCV's Farneback) with the LoRA as a fraction of the base model's at the same seeds, over all prompts (the "
        "LoRA videos' total over the base videos' total). Below it at the last validation the summary and report warn "
        "that the LoRA freezes motion (often too many still images in the data: they say how many) and the checkpoint "
        "is not recommended; 0: never warned about"))
    max_bleed: float = Field(0.5, ge=0, description=(
        "the most acceptable `quality/bleed`: how much the LoRA changes the model's prediction on validation prompts "
        "without the trigger, as a fraction of how much it changes it with the trigger (0: prompts without the "
        "trigger are untouched; 1: the LoRA changes them as much as triggered ones). Predicted, not rendered: the norm "
        "of the change (adapter on against off) at fixed noise and timesteps, pooled over the validation prompts that "
        "carry a trigger once `data.caption_prefix` is in front, or the held-out clips' captions where none does; a "
        "LoRA that changes nothing has bleed 0 (docs/quality.md). Above it the summary and report "
        "warn that the LoRA leaks into other prompts and the checkpoint is not recommended. Measured only for a LoRA "
        "with a trigger (`data.caption_prefix`, per-clip `id_token` words or `data.trigger`), at each checkpoint, the "
        "last step and every `eval.every`"))


class TrackingConfig(_Section):
    """Where the metrics go besides `metrics.jsonl` and `report.html`, which are always written, and the Hub push."""

    report_to: Literal["wandb", "tensorboard", "none"] = Field("wandb", description=(
        "`wandb`, `tensorboard` (event files in `RUN/tensorboard/`: scalars and the config; needs "
        "`pip install \"cogft[tensorboard]\"`, refused before prepare without it) or `none`. With `wandb` online and "
        "no W&B login the run is refused before prepare (fixes: `wandb login`, `tracking.wandb_mode=offline`, "
        "`tracking.report_to=none`)"))
    push_to_hub: str | None = Field(None, description=(
        "`OWNER/NAME`: at the end of a finished run, upload the final export (weights, model card, `sample.mp4`) to "
        "this Hugging Face model repository, created public if it does not exist (create it private first to keep it "
        "private). The login (`hf auth login`, `huggingface-cli login` before huggingface_hub 1.0, or `HF_TOKEN`) is "
        "checked before training; a failed upload keeps the local export and says how to push it with "
        "`cogft export --push-to-hub`"))
    project: str = Field("cogft", description="W&B project")
    run_name: str | None = Field(None, description="the run's name in W&B and the trackers; null: the run "
                                                   "directory's name")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description=(
        "the W&B mode, unless the `WANDB_MODE` environment variable is set (it wins; a true `WANDB_DISABLED` means "
        "`disabled`); null: wandb's own settings"))
    log_every: int = Field(1, ge=1, description="steps between metric logs (the last step is always logged)")

class Config(_Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    validation: ValidationConfig = ValidationConfig()
    eval: EvalConfig = EvalConfig()
    quality: QualityConfig = QualityConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = Field(min_length=1, description="the run directory (`config.yaml`, checkpoints, samples, "
                                                      "metrics, the export); a run in it resumes")

    @field_validator("output_dir")
    @classmethod
    def _a_folder_can_be_made(cls, value: str) -> str:
        return folder_can_be_made(value, "output_dir")

    @model_validator(mode="after")
    def _validation_lists_pair(self) -> Config:
        prompts = self.validation.prompts
        for key, what in (("images", "image"), ("controls", "control video"), ("sizes", "size")):
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
    def _prior_is_for_lora(self) -> Config:
        priors = [i for i, s in enumerate(self.data.sets or ()) if s.kind == "prior"]
        if priors and self.train.mode != "lora":
            raise ValueError(f"data.sets[{priors[0]}].kind: prior trains the adapter towards the base model with the "
                             "adapter switched off, and full fine-tuning (train.mode=sft) has no adapter; use "
                             "train.mode=lora, or make the set kind: clips")
        return self

    @model_validator(mode="after")
    def _adapter_keys_are_for_lora(self) -> Config:
        if self.train.mode == "sft" and (self.lora.type != "lora" or self.lora.plus_ratio is not None):
            raise ValueError("lora.type and lora.plus_ratio shape the adapter of train.mode=lora, and train.mode=sft "
                             "trains the whole transformer: use train.mode=lora, or leave them out")
        if self.model.fp8_base and self.lora.type != "lora":
            raise ValueError(f"model.fp8_base is built for lora.type=lora, not {self.lora.type}: DoRA normalises the "
                             "base weight itself, which float8 storage would hand it unscaled, and LoHa/LoKr over a "
                             "float8 base are untested; use lora.type=lora or model.fp8_base=false")
        return self

    @model_validator(mode="after")
    def _fp8_base_is_for_lora(self) -> Config:
        if self.model.fp8_base is True and self.train.mode != "lora":
            raise ValueError("model.fp8_base stores the frozen base weights in float8, and full fine-tuning "
                             "(train.mode=sft) trains every weight; use train.mode=lora or model.fp8_base=false")
        return self

    @model_validator(mode="after")
    def _blocks_to_swap_is_for_lora(self) -> Config:
        if self.train.blocks_to_swap and self.train.mode != "lora":
            raise ValueError("train.blocks_to_swap keeps frozen base weights in host memory with host-to-device copies "
                             "only, and full fine-tuning (train.mode=sft) trains and updates every weight; use "
                             "train.mode=lora or train.blocks_to_swap=0")
        return self

    @model_validator(mode="after")
    def _validation_can_run(self) -> Config:
        if self.validation.prompts and self.validation.every > self.train.max_steps and not self.validation.at_end:
            raise ValueError(
                f"validation.every={self.validation.every} > train.max_steps={self.train.max_steps} with "
                "validation.at_end=false: no validation would ever run; set validation.at_end=true or "
                f"validation.every to at most {self.train.max_steps}, or leave out validation.prompts"
            )
        return self
