"""Load a CogVideoX pipeline's configs and components from a local folder, a hub id, `tiny://` or `random://`.

Every route ends in diffusers/transformers `from_pretrained` with the classes the variant's spec names,
so the built test models and the real checkpoints share one code path. The variant is identified from
the pipeline's own configs when it is loaded, before any clip is encoded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..config import Config, ConfigError, ModelConfig
from ..records import has_fields, read_json
from .build import RANDOM_SCHEME, TINY_SCHEME, resolve_built
from .cpu_conv import onednn_conv3d_on_cpu
from .family import PipelineConfigs, Variant
from .group_norm import spread_group_norms
from .lora_formats import check_export_formats
from .objective_options import Objective
from .registry import reference_for, spec_for, spec_named

_CONFIG_FILES = {"model_index": (None, "model_index.json"), "transformer": ("transformer", "config.json"),
                 "vae": ("vae", "config.json"), "scheduler": ("scheduler", "scheduler_config.json")}


def resolve_model_path(path: str) -> str:
    """A local pipeline folder for `tiny://` and `random://` names (built on first use); others unchanged."""
    return resolve_built(path)


def _read_config(path: str, part: str, revision: str | None) -> dict:
    subfolder, filename = _CONFIG_FILES[part]
    local = Path(path) / (subfolder or "") / filename
    if local.is_file():  # a download, or a folder cogft wrote (a merged export, a tiny model): named if damaged
        fix = f"{path} is not a whole diffusers pipeline folder: download, export or build it again"
        return has_fields(read_json(local, fix), local, fix)
    if Path(path).exists():
        raise FileNotFoundError(f"{local} not found: {path} is not a diffusers CogVideoX pipeline folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        return json.loads(Path(hf_hub_download(path, filename, subfolder=subfolder, revision=revision)).read_text())
    except HFValidationError:
        raise ConfigError(f"model.path {path}: no such folder, and not a hub id (OWNER/NAME); give a diffusers "
                          "pipeline folder, a hub id, tiny://2b or random://2b") from None
    except OSError as error:  # the hub's HTTP, offline-cache and not-found errors are OSErrors
        raise ConfigError(f"model.path {path}: cannot read {(subfolder + '/') if subfolder else ''}{filename} from "
                          f"the hub ({type(error).__name__}); check the id, and offline (HF_HUB_OFFLINE=1) the model "
                          "must be in the local cache (download it once with network), or give a local pipeline "
                          "folder") from None


def pipeline_configs(path: str, revision: str | None = None) -> PipelineConfigs:
    """The pipeline's configs: a local folder's, else the built-in copy for a known hub id or a `random://`
    name (no download, nothing built, unless a revision is asked for), else the hub's."""
    if path.startswith(RANDOM_SCHEME):
        return spec_named(path.removeprefix(RANDOM_SCHEME), RANDOM_SCHEME).reference
    path = resolve_model_path(path)
    builtin = None if Path(path).exists() or revision else reference_for(path)
    if builtin is not None:
        return builtin
    return PipelineConfigs(**{part: _read_config(path, part, revision) for part in _CONFIG_FILES})


def load_variant(path: str, dtype: str = "auto", revision: str | None = None, build: bool = True,
                 control: bool = False) -> Variant:
    """The variant of the pipeline at `path`, bound to its configs; an unsupported pipeline is refused by name.
    `build=False`: a `tiny://` model is not built, its configs are the spec's own (before the process group
    exists, every rank would build it at once). `control`: the model widened to read a control video too
    (`model.control`)."""
    if not build and path.startswith(TINY_SCHEME):
        configs = spec_named(path.removeprefix(TINY_SCHEME), TINY_SCHEME).tiny
    else:
        configs = pipeline_configs(path, revision)
    spec = spec_for(configs, path)
    if control:
        spec, configs = spec.with_control(configs)
    return spec.bind(configs, dtype)


def variant_of(model: ModelConfig, build: bool = True) -> Variant:
    """The variant a config's `model` section names (see `load_variant`)."""
    return load_variant(model.path, model.dtype, model.revision, build=build, control=model.control)


def load_for_config(config: Config, validates: bool = True) -> tuple[Config, Variant]:
    """The config's variant, and the config with the variant's native clip wherever `data.*` leaves it unset;
    a clip size the variant cannot take, a timestep range outside its schedule or an objective option it lacks, a
    LoRA export format it cannot be loaded in as trained, and (for work that `validates`) validation images or
    control videos it cannot use or lacks, are refused by key before any work. Benchmarks and estimates render no
    validation prompt."""
    variant = variant_of(config.model)
    config = variant.resolve(config)
    variant.check_objective(Objective.of(config.train))
    check_export_formats(config.lora.export_format, config, variant)
    if validates:
        variant.check_validation_conditions(config.validation.prompts, config.validation.images,
                                            config.validation.controls)
    return config, variant


def load_transformer(path: str, variant: Variant, revision: str | None = None, dtype: torch.dtype | None = None):
    """The pipeline folder's transformer as the variant takes it (`Variant.prepare_loaded`), in `dtype` (None: the
    variant's)."""
    return variant.prepare_loaded(variant.spec.diffusers_class("transformer").from_pretrained(
        resolve_model_path(path), subfolder="transformer", dtype=dtype or variant.dtype, revision=revision
    ))


def load_vae(path: str, variant: Variant, dtype: torch.dtype, revision: str | None = None):
    """The VAE with its group norms spread over the GPU (`SpreadGroupNorm`: the same numbers, a faster decode), and
    its convolutions through oneDNN on a machine without CUDA (`onednn_conv3d_on_cpu`)."""
    vae = variant.spec.diffusers_class("vae").from_pretrained(resolve_model_path(path), subfolder="vae", dtype=dtype,
                                                              revision=revision)
    spread_group_norms(vae)
    onednn_conv3d_on_cpu(vae)
    return vae


def load_scheduler(path: str, variant: Variant, revision: str | None = None):
    return variant.spec.diffusers_class("scheduler").from_pretrained(resolve_model_path(path), subfolder="scheduler",
                                                                     revision=revision)


def load_text_encoder(path: str, variant: Variant, dtype: torch.dtype, device: torch.device,
                      revision: str | None = None):
    """The text encoder in `dtype` on `device`. On a GPU its shards go straight there (`device_map`), so T5-XXL
    (9 GiB in bf16) is never built whole in host memory first."""
    load = functools.partial(variant.spec.diffusers_class("text_encoder").from_pretrained, resolve_model_path(path),
                             subfolder="text_encoder", dtype=dtype, revision=revision)
    return load(device_map=device) if device.type == "cuda" else load().to(device)


def load_pipeline(path: str, variant: Variant, dtype: torch.dtype, revision: str | None = None, **components):
    """The variant's stock pipeline around `load_vae`'s VAE, and the transformer and scheduler as the variant takes
    them (a widened control model's are not the folder's); pass `transformer=None` / `vae=None` to skip loading
    what is not needed."""
    if "vae" not in components:
        components["vae"] = load_vae(path, variant, dtype, revision)
    if "transformer" not in components:
        components["transformer"] = load_transformer(path, variant, revision, dtype)
    components.setdefault("scheduler", load_scheduler(path, variant, revision))
    return variant.spec.diffusers_class("pipeline").from_pretrained(resolve_model_path(path), dtype=dtype,
                                                                    revision=revision, **components)
