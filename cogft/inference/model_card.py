"""The model card (README.md) beside exported weights: the front matter the Hub reads (base model, library,
tags, the base model's license, trigger words) and what was trained, how to load it, and a validation sample.

Written with huggingface_hub's card helpers, so the Hub and `ModelCard.load` read it as they read any card.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

from .. import __version__
from ..config import Config
from ..data.captions import prefixed, validation_texts
from ..models.adapters import STOCK_LOADABLE
from ..models.family import Variant
from ..models.lora_formats import FORMATS, extra_formats
from ..models.trained_modules import TRAINED_MODULES
from ..optimizers import OPTIMIZERS
from ..run_dir import LORA_WEIGHTS, PEFT_WEIGHTS, SAMPLES_DIR

CARD_FILE = "README.md"
SAMPLE_FILE = "sample.mp4"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def _base_model(config: Config, variant: Variant) -> str | None:
    """The Hub id the weights were trained from: `model.path` where it is one, the variant's published checkpoint
    for a local folder holding its architecture (a download of it); None for a built test model (the Hub would
    reject a base_model that names no repository)."""
    path = config.model.path
    if _HUB_ID.match(path) and not Path(path).exists():
        return path
    reference = variant.spec.reference.transformer
    if Path(path).is_dir() and all(variant.configs.transformer.get(key) == value for key, value in reference.items()
                                   if not key.startswith("_")):
        return variant.spec.hub_id
    return None


def _literal(text: str) -> str:
    """`text` as a Python string literal, whatever quotes, backslashes or line breaks it holds."""
    return json.dumps(text, ensure_ascii=False)


def _text(text: str) -> str:
    """`text` (a prompt, a caption prefix, a path) as literal words in Markdown: no HTML, no markup, one line."""
    return _MARKDOWN.sub(r"\\\1", html.escape(" ".join(text.split()), quote=False))


def _latest_sample(run_dir: Path, step: int) -> Path | None:
    """The first validation prompt's video of the exported step, else its newest one."""
    videos = sorted((run_dir / SAMPLES_DIR).glob("step-*-00-*.mp4"))
    exact = [v for v in videos if v.name.startswith(f"step-{step:06d}-")]
    return (exact or videos or [None])[-1]


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def _optimizer(config: Config) -> str:
    train = config.train
    if train.optimizer not in OPTIMIZERS:  # an import path: its own arguments
        return f"{train.optimizer} ({', '.join(f'{k}={v!r}' for k, v in train.optimizer_args.items()) or 'defaults'})"
    return (f"{train.optimizer} (betas {train.adam_beta1}, {train.adam_beta2}, weight decay "
            f"{train.weight_decay:g})")


def model_card(config: Config, variant: Variant, step: int, sample: str | None = None,
               formats: list[str] | None = None):
    """The card of weights trained by `config` for `step` steps; `sample`: a validation video beside it; `formats`:
    the LoRA key formats written beside the diffusers file (default `lora.export_format`)."""
    from huggingface_hub import ModelCard, ModelCardData

    spec, lora = variant.spec, config.train.mode == "lora"
    from_image = "image" in variant.conditions
    pipeline_class, transformer_class = spec.class_name("pipeline"), spec.class_name("transformer")
    task = "image-to-video" if from_image else "text-to-video"
    trigger = config.data.caption_prefix.strip()
    base = _base_model(config, variant)
    data = ModelCardData(
        base_model=base, library_name="diffusers", license=spec.license,
        license_name=spec.license_name, license_link=spec.license_link, pipeline_tag=task,
        tags=[task, "diffusers", spec.family, spec.name, config.lora.type if lora else "full-fine-tune", "cogft"],
        instance_prompt=trigger or config.data.trigger,
    )
    adapter = ADAPTER_NAMES[config.lora.type]
    rslora = ", rsLoRA scaling" if config.lora.rslora else ""
    what = (f"A {adapter} (rank {config.lora.rank}, alpha {config.lora.alpha:g}{rslora}, on "
            f"{', '.join(config.lora.target_modules)})" if lora else "A fully fine-tuned transformer")
    load = [f'pipe.transformer = {transformer_class}.from_pretrained("PATH_OR_REPO", torch_dtype=dtype)']
    if lora and config.lora.type in STOCK_LOADABLE:
        load = ['pipe.load_lora_weights("PATH_OR_REPO")  # this folder']
    elif lora:  # peft's own files, which load_lora_weights does not read (docs/adapters.md)
        load = ['folder = "PATH"  # this folder (a Hub repo: huggingface_hub.snapshot_download("REPO"))',
                "pipe.transformer.add_adapter(PeftConfig.from_pretrained(folder))",
                f'set_peft_model_state_dict(pipe.transformer, load_file(f"{{folder}}/{PEFT_WEIGHTS}"))']
    image = ', image=load_image("start.png")' if from_image else ""
    image += ', control_video=load_video("control.mp4")' if "control" in variant.conditions else ""
    prompt = prefixed((config.validation.prompts or ["a prompt"])[0], trigger)
    validated = (validation_texts(config) or [prompt])[0]  # the first validation prompt, as it was rendered
    source = base or config.model.path  # a local download is named by its Hub id, not by a path on one machine
    dtype = f"dtype = torch.{str(variant.dtype).removeprefix('torch.')}"
    if lora and variant.trained_with_adapter:
        snippet = _widened_snippet(variant, source, pipeline_class, transformer_class, dtype)
    else:
        snippet = [
            "import torch",
            f"from diffusers import {pipeline_class}" + (", " + transformer_class if not lora else ""),
            "",
            dtype,
            f"pipe = {pipeline_class}.from_pretrained({_literal(source)}, torch_dtype=dtype)",
        ]
    readers = [f"from diffusers.utils import {reader}" for wanted, reader in
               ((from_image, "load_image"), ("control" in variant.conditions, "load_video")) if wanted]
    if lora and config.lora.type not in STOCK_LOADABLE:
        readers += ["from peft import PeftConfig, set_peft_model_state_dict", "from safetensors.torch import load_file"]
    snippet[1:1] = readers
    snippet += [*load, f"video = pipe(prompt={_literal(prompt)}{image}).frames[0]"]
    fence = "`" * max([3, *(len(run) + 1 for line in snippet for run in re.findall(r"`{3,}", line))])
    body = [
        f"# {what} of {_text(source)}",
        "",
        f"{what} of {spec.name} ({_text(source)}), trained for {step} steps with "
        f"cogft {__version__}.",
        "",
        "## Use",
        "",
        f"{fence}python",
        *snippet,
        fence,
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| steps | {step} |",
        f"| clip | {config.data.num_frames} frames at {config.data.fps or 'native'} fps, "
        f"{', '.join(f'{h}x{w}' for h, w in config.data.sizes)} |",
        f"| batch | {config.train.batch_size} x {config.train.gradient_accumulation_steps} accumulated |",
        f"| learning rate | {config.train.learning_rate:g} ({config.train.lr_scheduler}, "
        f"{config.train.lr_warmup_steps} warm-up steps) |",
        f"| optimizer | {_optimizer(config)} |",
        f"| precision | {str(variant.dtype).removeprefix('torch.')} |",
        f"| seed | {config.train.seed} |",
    ]
    if lora and config.lora.plus_ratio is not None:
        body.append(f"| LoRA+ | B matrices at {config.lora.plus_ratio:g}x the learning rate |")
    if config.data.caption_dropout:
        body.append(f"| caption dropout | {config.data.caption_dropout:g} |")
    if trigger:
        body += ["", "## Trigger words", "", f"Start prompts with **{_text(trigger)}**."]
    elif config.data.trigger:  # a word the captions contain where they name the subject
        body += ["", "## Trigger words", "", f"Name the subject **{_text(config.data.trigger)}** in prompts, as the "
                 "training captions did."]
    other = extra_formats(config.lora.export_format if formats is None else formats) if lora else []
    if other:
        body += ["", "## Other loaders", "", "The same weights, with the same strength (alpha per layer):", "",
                 *(f"- `{FORMATS[name].file}`: {_text(variant.lora_key_formats[name].loads_in)}" for name in other),
                 "", f"`{LORA_WEIGHTS}` is the one for diffusers (above), and for loaders that call diffusers' "
                 "`load_lora_weights` (recent enough to read its alpha from the file)." if config.lora.type in
                 STOCK_LOADABLE else f"`{PEFT_WEIGHTS}` is the one for diffusers with peft (above)."]
    if sample:
        body += ["", "## Validation sample", "",
                 f"[{SAMPLE_FILE}]({SAMPLE_FILE}): \"{_text(validated)}\", step {step}."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _widened_snippet(variant: Variant, source: str, pipeline_class: str, transformer_class: str,
                     dtype: str) -> list[str]:
    """How a stock pipeline takes a LoRA whose model was widened (a control LoRA on a text-to-video model): the base
    transformer with its wider input (left random by diffusers, then overwritten by `TRAINED_MODULES`), the pipeline's
    scheduler, then the LoRA."""
    scheduler_class = variant.spec.class_name("scheduler")
    in_channels = variant.configs.transformer["in_channels"]
    return [
        "import torch",
        f"from diffusers import {pipeline_class}, {scheduler_class}, {transformer_class}",
        "from safetensors.torch import load_file",
        "",
        dtype,
        f"# the base transformer, its input widened to {in_channels} channels; {TRAINED_MODULES} (this folder) holds",
        "# the trained input weights",
        f"transformer = {transformer_class}.from_pretrained({_literal(source)}, subfolder=\"transformer\", "
        f"in_channels={in_channels}, low_cpu_mem_usage=False, ignore_mismatched_sizes=True, torch_dtype=dtype)",
        f"transformer.load_state_dict(load_file(\"PATH_OR_REPO/{TRAINED_MODULES}\"), strict=False)",
        f"scheduler = {scheduler_class}.from_pretrained({_literal(source)}, subfolder=\"scheduler\")",
        f"pipe = {pipeline_class}.from_pretrained({_literal(source)}, transformer=transformer, scheduler=scheduler, "
        "torch_dtype=dtype)",
    ]


def write_model_card(folder: Path, config: Config, variant: Variant, step: int, run_dir: Path,
                     formats: list[str] | None = None) -> Path:
    """README.md (and the first validation prompt's video, as sample.mp4) into an export folder."""
    sample = _latest_sample(run_dir, step)
    if sample is not None:
        shutil.copy2(sample, folder / SAMPLE_FILE)
    card = model_card(config, variant, step, SAMPLE_FILE if sample is not None else None, formats)
    card.save(folder / CARD_FILE)
    return folder / CARD_FILE
