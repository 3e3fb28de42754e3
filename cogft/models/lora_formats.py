"""The LoRA in other tools' key formats (`lora.export_format`), written beside the diffusers file from its weights.

A tool such as ComfyUI reads a LoRA by matching each key's module part against names it makes from its own model,
and logs what it cannot match ("lora key not loaded") and drops it. A family that can be loaded there says, per
format, what its diffusers modules are called in that tool's model (`Variant.lora_key_formats`, a `ToolNames`);
this module writes the adapter's tensors under those names, with each module's strength in an `alpha` that the tool
divides by the dimension it reads off the tensors (alpha / rank, or alpha / sqrt(rank) under rsLoRA, becomes
scale x rank), and refuses by key what a tool would load as something other than what was trained.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..run_dir import adapter_file
from .family import _meta_model

DIFFUSERS = "diffusers"  # always written: the file a stock `load_lora_weights` reads


@dataclass(frozen=True)
class ToolNames:
    """How one tool names a family's modules: `module` maps a diffusers module path to the path in the tool's model
    (None: the tool's model has no such layer); `loads_in` says where the file goes, for the model card."""

    module: Callable[[str], str | None]
    loads_in: str


@dataclass(frozen=True)
class KeyFormat:
    """A key style: the file written, how a tool module path becomes a key prefix, the adapter types it reads as
    trained (the others with the reason), and whether it reads Linear layers only."""

    name: str
    file: str
    prefix: Callable[[str], str]
    refused: dict[str, str]
    linear_only: bool = False


# ComfyUI's `dora_scale` divides by the row norms of the base weight, peft's DoRA by those of the adapted weight
_DORA = ("{fmt} has no DoRA that matches peft's: a magnitude there rescales by the base weight's norm, not the "
         "adapted weight's, so the file would load at another strength")
FORMATS = {
    # ComfyUI's own loader: its model's state-dict names under `diffusion_model.`, kohya's lora_up/lora_down/alpha
    # and LyCORIS's hada_*/lokr_* suffixes
    "comfyui": KeyFormat("comfyui", "lora_comfyui.safetensors", lambda module: f"diffusion_model.{module}",
                         refused={"dora": _DORA.format(fmt="ComfyUI")}),
    # kohya's `lora_unet_` + the module path with underscores, lora_up/lora_down/alpha, Linear layers only
    "kohya": KeyFormat("kohya", "lora_kohya.safetensors", lambda module: "lora_unet_" + module.replace(".", "_"),
                       refused={"dora": "kohya-style files carry no DoRA magnitudes",
                                "loha": "kohya-style LoRA loaders read lora_up/lora_down pairs only",
                                "lokr": "kohya-style LoRA loaders read lora_up/lora_down pairs only"},
                       linear_only=True),
}
FORMAT_NAMES = (DIFFUSERS, *FORMATS)
_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # the rest keep LyCORIS's names
_KNOWN = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a",
          "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
          "lokr_t2")


def extra_formats(formats: list[str]) -> list[str]:
    """The formats written beside the diffusers file, in `FORMATS` order."""
    return [name for name in FORMATS if name in formats]


def check_export_formats(formats: list[str], config: Config, variant, key: str = "lora.export_format") -> None:
    """Refuse, by `key` and before any work, a format this family, this adapter type or this model cannot be loaded
    as trained in."""
    unknown = [name for name in formats if name not in FORMAT_NAMES]
    if unknown:
        raise ConfigError(f"{key}: unknown format {unknown[0]!r}; choose from {', '.join(FORMAT_NAMES)}")
    wanted = extra_formats(formats)
    if not wanted:
        return
    if config.train.mode != "lora":
        raise ConfigError(f"{key}={','.join(wanted)} writes a LoRA; a full fine-tune (train.mode={config.train.mode})"
                          f" exports a diffusers transformer: set {key}={DIFFUSERS}")
    names = variant.lora_key_formats
    for name in wanted:
        fix = f"leave {name} out of {key}"
        if name not in names:
            raise ConfigError(f"{key}={name}: the {variant.spec.family} family has no {name} key format; {fix}")
        if reason := FORMATS[name].refused.get(config.lora.type):
            raise ConfigError(f"{key}={name} cannot carry lora.type={config.lora.type}: {reason}. Use lora.type=lora "
                              f"for {name}, or {fix} (the diffusers or peft files are written either way)")
        if variant.trained_with_adapter:
            raise ConfigError(f"{key}={name}: this model's LoRA comes with whole trained layers "
                              f"({', '.join(variant.trained_with_adapter)}) that {name} loaders do not read; {fix}")
        adapted = _adapted(variant, list(config.lora.target_modules))
        missing = [n for n in adapted if names[name].module(n) is None]
        if missing:
            raise ConfigError(f"{key}={name}: lora.target_modules adapts {missing[0]}, which {name} loaders have no "
                              f"layer for; take it out of lora.target_modules or {fix}")
        not_linear = [n for n, linear in adapted.items() if not linear] if FORMATS[name].linear_only else []
        if not_linear:
            raise ConfigError(f"{key}={name}: lora.target_modules adapts {not_linear[0]}, not a Linear layer, and "
                              f"{name} loaders merge Linear layers only; name the Linear layers in "
                              f"lora.target_modules (e.g. net.0.proj, not proj) or {fix}")


def _adapted(variant, targets: list[str]) -> dict[str, bool]:
    """{module: whether it is a Linear layer} of the modules peft puts an adapter on for `targets` (its rule: the
    name or its last parts; layers peft adapts: Linear, convolutions, embeddings), on the meta-device build."""
    model = _meta_model(variant.spec.diffusers_class("transformer"),
                        json.dumps(variant.configs.transformer, sort_keys=True))
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    return {n: isinstance(m, torch.nn.Linear) for n, m in model.named_modules()
            if isinstance(m, kinds) and any(n == t or n.endswith("." + t) for t in targets)}


def lora_scale(config: Config) -> float:
    """What the adapter's update is multiplied by: alpha / rank, or alpha / sqrt(rank) under rsLoRA."""
    lora = config.lora
    return lora.alpha / (math.sqrt(lora.rank) if lora.rslora else lora.rank)


def _by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{diffusers module path: {peft suffix: tensor}} of a diffusers LoRA file's or peft's state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        key = key.removeprefix("transformer.")
        suffix = next((s for s in _KNOWN if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"adapter key {key}: not a LoRA, LoHa or LoKr tensor cogft knows how to convert")
        modules[key[:-len(suffix) - 1]][suffix] = tensor
    return modules


def _carried(parts: dict[str, torch.Tensor], scale: float) -> tuple[dict[str, torch.Tensor], float | None]:
    """A module's tensors and the alpha that makes the loader's scale (alpha / the rank it reads) equal `scale`.
    A LoKr whose factors are both whole has no rank to divide by (the loader's scale is 1): `scale` is folded into
    its first factor instead, kept in fp32 (it is the small one) so the product stays the trained one."""
    if "lora_magnitude_vector" in parts:
        raise ValueError("a DoRA magnitude has no equivalent in these formats")
    if "lora_A.weight" in parts:
        return parts, scale * parts["lora_A.weight"].shape[0]
    if "hada_w1_b" in parts:
        return parts, scale * parts["hada_w1_b"].shape[0]
    rank_of = next((parts[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)  # the loader reads w2's first
    if rank_of is not None:
        return parts, scale * rank_of.shape[0]
    return {**parts, "lokr_w1": parts["lokr_w1"].float() * scale}, None


def convert(state: dict[str, torch.Tensor], fmt: KeyFormat, names: ToolNames, scale: float) -> dict[str, torch.Tensor]:
    """The adapter `state` (diffusers LoRA or peft keys) under `fmt`'s keys, one fp32 `alpha` per module (the
    weights keep the export's dtype; an alpha such as 64 x sqrt(128) is not exact in bf16)."""
    out = {}
    for module, parts in sorted(_by_module(state).items()):
        tool_module = names.module(module)
        if tool_module is None:
            raise ValueError(f"{module}: {fmt.name} loaders have no layer for it")
        if fmt.linear_only and any(t.ndim != 2 for t in parts.values()):
            raise ValueError(f"{module}: {fmt.name} loaders merge Linear layers only, and this one is not")
        tensors, alpha = _carried(parts, scale)
        prefix = fmt.prefix(tool_module)
        out.update({f"{prefix}.{_SUFFIX.get(suffix, suffix)}": tensor.contiguous()
                    for suffix, tensor in tensors.items()})
        if alpha is not None:
            out[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def write_key_formats(folder: Path, config: Config, variant, formats: list[str] | None = None) -> list[Path]:
    """Beside the adapter file in `folder` (an export, in its dtype), the same adapter in each extra format of
    `formats` (default `lora.export_format`), with its metadata and the format's name; the written files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    wanted = extra_formats(config.lora.export_format if formats is None else formats)
    if not wanted:
        return []
    source = adapter_file(folder)
    with safe_open(str(source), "pt") as handle:
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != "lora_adapter_metadata"}
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    written = []
    for name in wanted:
        fmt, names = FORMATS[name], variant.lora_key_formats[name]
        target = folder / fmt.file
        tmp = target.with_name(f".{target.name}.tmp")
        save_file(convert(state, fmt, names, lora_scale(config)), str(tmp),
                  metadata={**metadata, "key_format": name, "loads_in": names.loads_in})
        tmp.replace(target)
        written.append(target)
    return written
